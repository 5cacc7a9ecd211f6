"""The simulation harness end to end: a 20-client Dirichlet federation on digits, reproducibility,
reports from a real run, and bad experiment files rejected before anything runs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from flowerbed.exception import ConfigError
from flowerbed.experiment import load_experiment

EXPERIMENT = Path(__file__).resolve().parents[1] / "simulations" / "experiments" / "digits_dirichlet.toml"
# Failures on top of the bundled experiment, so that both runs below also exercise the scenario
# path of the round loop: dropouts, and stragglers slower than the 600 s round timeout.
SCENARIO = [
    "scenario.dropout=0.15",
    "scenario.straggler_fraction=0.1",
    "scenario.straggler_delay=900.0",
]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The bundled experiment, run once for the tests below: (run folder, seconds)."""
    from flowerbed.simulations.simulate import simulate

    output = tmp_path_factory.mktemp("digits")
    experiment = load_experiment(EXPERIMENT, [*SCENARIO, f"output={str(output)!r}"])
    start = time.perf_counter()
    run_dir = simulate(experiment, quiet=True)
    return run_dir, time.perf_counter() - start


@pytest.mark.slow
def test_twenty_client_dirichlet_digits_runs_in_under_two_minutes(
    digits_run: tuple[Path, float],
) -> None:
    from flowerbed.simulations.research.report import write_report

    run_dir, seconds = digits_run
    experiment = load_experiment(EXPERIMENT)
    assert experiment.data.partition.kind == "dirichlet"
    assert experiment.data.partition.num_clients == 20
    # The figure is reported, not asserted: timings belong in benchmarks, never in test verdicts.
    print(f"20-client Dirichlet digits, {experiment.rounds} rounds: {seconds:.1f} s")

    rounds = _metrics(run_dir)
    assert [r["round"] for r in rounds] == list(range(1, experiment.rounds + 1))
    sampled = experiment.train.clients_per_round
    assert all(len(r["sampled"]) == sampled for r in rounds)
    assert all(len(r["participants"]) + len(r["refused"]) == sampled for r in rounds)
    reasons = [why for r in rounds for why in r["refused"].values()]
    assert any("dropped out" in why for why in reasons)
    assert any("straggler" in why for why in reasons)
    assert len({s for r in rounds for s in r["participants"]}) > 15, "sampling reaches most clients"
    assert rounds[-1]["central"]["accuracy"] > 0.5, "ten classes: chance is 0.1"
    assert rounds[-1]["central"]["accuracy"] > rounds[0]["central"]["accuracy"]

    written = write_report([run_dir])
    names = [p.name for p in written]
    assert names[:2] == ["global.png", "sites.png"] and "epsilon.png" not in names, "no DP, so no epsilon plot"
    assert names[-1] == "report.html"
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written if p.suffix == ".png")


@pytest.mark.slow
def test_same_experiment_and_seed_give_identical_metrics(digits_run: tuple[Path, float], tmp_path: Path) -> None:
    from flowerbed.simulations.simulate import simulate

    experiment = load_experiment(EXPERIMENT, [*SCENARIO, f"output={str(tmp_path)!r}"])
    again = simulate(experiment, quiet=True)
    first, second = _metrics(digits_run[0]), _metrics(again)
    assert len(first) == len(second) == 10
    # every site's losses and accuracies, to the last bit: the files are byte-identical
    assert (digits_run[0] / "metrics.jsonl").read_bytes() == (again / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("rounds", r"train\.learning_rate: unknown key"),
        ("type", r"rounds = 'ten'"),
        ("alpha", r"data\.partition\.alpha = 0"),
        ("clients", r"data\.partition\.num_clients = 5000"),
        ("dataset", r"data\.dataset = 'digitz'"),
    ],
)
def test_bad_experiment_files_are_rejected_before_anything_runs(tmp_path: Path, edit: str, expected: str) -> None:
    from flowerbed.simulations.simulate import simulate

    text = EXPERIMENT.read_text()
    text = {
        "rounds": text.replace("lr = 0.05", "learning_rate = 0.05"),
        "type": text.replace("rounds = 10", 'rounds = "ten"'),
        "alpha": text.replace("alpha = 0.5", "alpha = 0"),
        "clients": text.replace("num_clients = 20", "num_clients = 5000"),
        "dataset": text.replace('dataset = "digits"', 'dataset = "digitz"'),
    }[edit]
    path = tmp_path / "bad.toml"
    path.write_text(text)
    output = tmp_path / "runs"
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=expected) as err:
        simulate(load_experiment(path, [f"output={str(output)!r}"]), quiet=True)
    assert time.perf_counter() - start < 20, "rejected up front, not after an engine started"
    assert not output.exists(), "no run folder is made for a rejected experiment"
    if edit in ("rounds", "type", "alpha"):
        assert err.value.source == str(path), "schema errors name the file"


def test_cli_reports_a_bad_key_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowerbed.cli import main

    path = tmp_path / "typo.toml"
    path.write_text(EXPERIMENT.read_text().replace("[data.partition]", "[data.partiton]"))
    monkeypatch.setattr(sys, "argv", ["flowerbed", "simulate", str(path), "-o", str(tmp_path / "r")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "data.partiton: unknown key" in err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_an_inline_run_leaves_the_garbage_collector_as_it_found_it(heart_experiment) -> None:
    import gc

    from flowerbed.simulations.simulate import simulate

    before = gc.get_threshold()
    simulate(heart_experiment("rounds=1", "evaluate.central=false"), quiet=True)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0 and gc.isenabled()
