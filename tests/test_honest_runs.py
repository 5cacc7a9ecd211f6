"""A run says what happened: a round trained twice, a failure that leaves nothing, the budget that is left."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flowerbed.client.node_round import SIM_NODE_CONFIG_ENV
from flowerbed.privacy.ledger import PrivacyLedger
from flowerbed.server import checkpoint, run_folder
from flowerbed.server.run_folder import read_metrics, read_summary

from .conftest import HEART_TOML


class Interrupted(Exception):
    """The coordinator dies after a round's training went out, before its checkpoint."""


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, server_round: int, *, after_next_went_out: bool = False) -> None:
    """Fail ``server_round``'s checkpoint (``after_next_went_out``: once the next round's training went out)."""
    save, note, went_out = checkpoint.save_checkpoint, run_folder.note_rounds_sent, threading.Event()

    def save_or_die(run_dir, state, **how):
        if state.round == server_round:
            if after_next_went_out:
                assert went_out.wait(60)
            raise Interrupted
        return save(run_dir, state, **how)

    def noted(run_dir, rounds):
        note(run_dir, rounds)
        if max(rounds) == server_round + 1:
            went_out.set()

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_or_die)
    monkeypatch.setattr(run_folder, "note_rounds_sent", noted)


def test_a_resumed_run_says_which_rounds_it_trained_twice(heart_experiment, monkeypatch) -> None:
    """The nodes' ledgers charge the interrupted rounds twice; the run says so, and reports what they charged.

    Checkpoints are written in the background: here round 3's training goes out before round 2's
    checkpoint fails, so both rounds are trained twice, and said so.
    """
    from flowerbed.simulations.simulate import resume_simulation, simulate

    monkeypatch.setenv(SIM_NODE_CONFIG_ENV, json.dumps({"*": {"dp-test-seed": 0}}))
    experiment = heart_experiment(
        "privacy.enabled=true", "privacy.noise_multiplier=1.0", "train.local_epochs=1", "evaluate.central=false"
    )
    _interrupt_at(monkeypatch, 2, after_next_went_out=True)
    with pytest.raises(Interrupted):
        simulate(experiment, quiet=True)
    (run_dir,) = Path(experiment.output).iterdir()
    monkeypatch.undo()
    monkeypatch.setenv(SIM_NODE_CONFIG_ENV, json.dumps({"*": {"dp-test-seed": 0}}))
    resume_simulation(run_dir, quiet=True)

    records, summary = read_metrics(run_dir), read_summary(run_dir)
    sites = ["cleveland", "hungarian", "switzerland", "va"]
    lost = [int(r) for r in summary["retrained"]]
    assert lost == [2, 3]
    assert [r.get("retrained") for r in records] == [sites if r["round"] in lost else None for r in records]
    assert summary["retrained"] == {str(r): sites for r in lost}
    ledger = PrivacyLedger(run_dir / "nodes" / "ledger.sqlite")
    for dataset in ledger.datasets():
        trained = [r.round for r in ledger.releases(dataset)]
        assert sorted(trained) == sorted([1, 2, 3, *lost]), "each lost round was charged twice at every site"
        site = ledger.releases(dataset)[0].site
        assert summary["epsilon"]["per_site"][site] == pytest.approx(ledger.epsilon(dataset, 1e-5), rel=1e-12)
    assert summary["epsilon"]["scope"].startswith("cumulative at each node's ledger")


def test_a_run_that_fails_before_its_first_round_leaves_no_folder(heart_experiment, monkeypatch) -> None:
    from flowerbed.simulations.simulate import simulate

    experiment = heart_experiment("rounds=1", "evaluate.central=false")
    _interrupt_at(monkeypatch, 1)
    with pytest.raises(Interrupted):
        simulate(experiment, quiet=True)
    assert not Path(experiment.output).exists() or not any(Path(experiment.output).iterdir())


def test_node_budget_shows_budget_spent_and_left_per_dataset(tmp_path: Path) -> None:
    import typer

    from flowerbed.client.commands import register
    from flowerbed.privacy.planner import DPPlan

    app = typer.Typer()
    register(app)
    state = tmp_path / "kit" / "state"
    state.mkdir(parents=True)
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    plan = DPPlan(noise_multiplier=1.0, sample_rate=0.1, steps_per_round=10, rounds=2, max_grad_norm=1.0, delta=1e-5)
    for run in ("run-a", "run-b"):
        ledger.charge(dataset="d" * 64, run_id=run, round=1, plan=plan, site="va")
    spent = ledger.epsilon("d" * 64, 1e-5)
    # the node config `flowerbed node start` writes in its state folder
    (state / "node-config.toml").write_text(f'"ledger" = "{tmp_path / "ledger.sqlite"}"\n"budget-epsilon" = 8.0\n')

    result = CliRunner().invoke(app, ["node", "budget", "--kit", str(tmp_path / "kit"), "--format", "json"])
    assert result.exit_code == 0, result.output
    (dataset,) = json.loads(result.output)
    assert dataset["budget"] == 8.0 and dataset["epsilon"] == pytest.approx(spent)
    assert dataset["left"] == pytest.approx(8.0 - spent)
    table = CliRunner().invoke(app, ["node", "budget", "--state", str(state)], terminal_width=100)
    assert table.exit_code == 0 and "left" in table.output and f"{8.0 - spent:.3f}" in table.output
    bare = CliRunner().invoke(app, ["node", "budget", "--ledger", str(tmp_path / "ledger.sqlite")])
    assert "not set" in bare.output and "no budget set" in " ".join(bare.output.split())
    missing = CliRunner().invoke(app, ["node", "budget", "--state", str(tmp_path)])
    assert missing.exit_code != 0 and "node-config.toml" in str(missing.exception)


def test_a_run_every_site_refused_says_why_writes_no_model_and_reports_around_it(heart_experiment, monkeypatch) -> None:
    from flowerbed.cli import _register, app
    from flowerbed.simulations.simulate import simulate

    base = ("rounds=1", "evaluate.central=false", "train.local_epochs=1", "evaluate.plots=true")
    done = simulate(heart_experiment(*base), quiet=True)
    monkeypatch.setenv(SIM_NODE_CONFIG_ENV, json.dumps({"*": {"dp-test-seed": 0, "budget-epsilon": 0.05}}))
    refused = simulate(heart_experiment(*base, "privacy.enabled=true", "privacy.noise_multiplier=1.0"), quiet=True)
    summary = read_summary(refused)
    sites = ["cleveland", "hungarian", "switzerland", "va"]
    assert summary["rounds_completed"] == 0 and sorted(summary["budget_exhausted"]) == sites
    assert summary["stopped"].startswith("round 1: 0 usable replies") and "va (BUDGET_EXHAUSTED)" in summary["stopped"]
    assert not (refused / "model.safetensors").exists() and not (refused / "model.pt2").exists()

    _register()  # `flowerbed report runs/heart-*` draws the run that has rounds and says why it leaves out the other
    result = CliRunner().invoke(app, ["report", str(done), str(refused)])
    assert result.exit_code == 0, result.output
    assert "no round completed" in " ".join(result.output.split())
    assert (done / "plots" / "global.png").is_file() and not (refused / "plots").exists()

    from flowerbed.simulations.research.sweep import run_sweep

    sweep = Path(done).parent / "refused.toml"  # in a sweep, such a run is a failed row with its reason
    sweep.write_text(
        f'base = "{HEART_TOML}"\nset = {{ rounds = 1, evaluate = {{ central = false, local_baselines = false }}, '
        "privacy = { enabled = true, noise_multiplier = 1.0 } }\n[grid]\nseed = [0]\n"
    )
    (row,) = run_sweep(sweep, folder=Path(done).parent / "sweep").rows
    assert row.run_dir is None and row.error.startswith("no round completed: round 1: 0 usable replies")
