"""Sweeps: grid expansion and validation before anything runs, then a real two-run sweep."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flowerbed.exception import ConfigError
from flowerbed.simulations.research.sweep import load_sweep

EXPERIMENTS = Path(__file__).resolve().parents[1] / "simulations" / "experiments"
BASE = EXPERIMENTS / "digits_dirichlet.toml"
SWEEPS = EXPERIMENTS.parent / "sweeps"


def _sweep_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(f'base = "{BASE.as_posix()}"\n{body}')
    return path


def test_grid_expands_to_every_combination_in_order(tmp_path: Path) -> None:
    path = _sweep_file(
        tmp_path,
        'name = "grid"\nset = { rounds = 3, train = { lr = 0.2 } }\n'
        '[grid]\n"strategy.name" = ["FedAvg", "FedAdagrad"]\n'
        "data.partition.alpha = [0.1, 1.0, 10.0]\n",
    )
    sweep = load_sweep(path)
    assert sweep.keys == ("strategy.name", "data.partition.alpha")
    assert len(sweep.experiments) == 6
    pairs = [(e.strategy.name, e.data.partition.alpha) for e in sweep.experiments]
    assert pairs == [(s, a) for s in ("FedAvg", "FedAdagrad") for a in (0.1, 1.0, 10.0)]
    assert all(e.rounds == 3 and e.train.lr == 0.2 for e in sweep.experiments)
    assert all(e.train.momentum == 0.9 for e in sweep.experiments), "base keys are kept"
    assert [e.name for e in sweep.experiments][:2] == ["grid-00", "grid-01"]
    assert sweep.label(4) == "FedAdagrad, alpha=1.0"


def test_whole_sections_can_be_grid_values(tmp_path: Path) -> None:
    path = _sweep_file(
        tmp_path,
        '[grid]\nstrategy = [{ name = "FedAvg" }, { name = "FedAvgM", args = { server_momentum = 0.5 } }]\n',
    )
    sweep = load_sweep(path, check_data=False)
    assert sweep.experiments[1].strategy.args == {"server_momentum": 0.5}
    assert sweep.label(1) == "FedAvgM"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[grid]\n"seed" = [0]\n[extra]\nx = 1\n', r"extra: unknown key"),
        ('[grid]\n"seed" = 3\n', r"grid\.seed = 3: must be a non-empty list"),
        ("", r"grid: required"),
        ('[grid]\n"data.partition.alfa" = [0.1]\n', r"data\.partition\.alfa: unknown key"),
        ('[grid]\n"data.partition.alpha" = [1.0, 0.0]\n', r"data\.partition\.alpha = 0\.0"),
        ('[grid]\n"rounds" = ["many"]\n', r"rounds = 'many'"),
        ('[grid]\n"privacy.target_epsilon" = [1.0]\n', r"privacy\.enabled = false"),
        ('[grid]\n"data.partition.num_clients" = [20, 5000]\n', r"num_clients = 5000"),
        ('[grid]\n"data.dataset" = ["mnist-typo"]\n', r"data\.dataset = 'mnist-typo'"),
    ],
)
def test_bad_sweeps_fail_before_any_run_naming_the_key(tmp_path: Path, body: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_sweep(_sweep_file(tmp_path, body))
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_sweep_is_valid(path: Path) -> None:
    sweep = load_sweep(path)
    assert len(sweep.experiments) >= 2


def test_missing_base_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('base = "nope.toml"\n[grid]\nseed = [1]\n')
    with pytest.raises(ConfigError, match=r"base = 'nope\.toml': no such file"):
        load_sweep(path)


@pytest.mark.slow
def test_two_run_sweep_writes_table_and_overlay(tmp_path: Path) -> None:
    from flowerbed.cli import _register, app

    _register()
    path = _sweep_file(
        tmp_path,
        # the sweep's mechanics do not depend on the engine: the one-process backend starts fastest
        'name = "alpha"\nset = { rounds = 2, backend = { name = "inline" }, train = { clients_per_round = 4 },'
        " data = { partition = { num_clients = 6 } } }\n"
        '[grid]\n"data.partition.alpha" = [0.1, 10.0]\n',
    )
    folder = tmp_path / "out"
    result = CliRunner().invoke(app, ["sweep", str(path), "--out", str(folder), "--quiet"])
    assert result.exit_code == 0, result.output

    rows = list(csv.DictReader((folder / "summary.csv").open()))
    assert [r["data.partition.alpha"] for r in rows] == ["0.1", "10.0"]
    for row in rows:
        assert 0.0 <= float(row["central.accuracy"]) <= 1.0
        assert row["rounds"] == "2"
        run = folder / "runs" / row["run"]
        assert (run / "metrics.jsonl").read_text().count("\n") == 2
        assert run.name.startswith("alpha-0")
        resolved = json.loads((run / "experiment.json").read_text())
        assert resolved["backend"]["name"] == "inline"
        assert resolved["data"]["partition"]["alpha"] == float(row["data.partition.alpha"])
    markdown = (folder / "summary.md").read_text()
    assert markdown.splitlines()[0].startswith("| data.partition.alpha | central.accuracy |")
    assert len(markdown.splitlines()) == 4
    assert "central.accuracy" in result.output
    assert (folder / "overlay.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failing_run_is_recorded_and_the_command_exits_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowerbed.cli import main

    # valid for the schema, but the task cannot be imported once the run starts
    path = _sweep_file(tmp_path, 'set = { rounds = 1 }\n[grid]\n"task.name" = ["no_such_module:task"]\n')
    monkeypatch.setattr("sys.argv", ["flowerbed", "sweep", str(path), "--out", str(tmp_path / "s")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    rows = list(csv.DictReader((tmp_path / "s" / "summary.csv").open()))
    assert rows[0]["run"].startswith("failed: task.name = 'no_such_module:task' cannot be imported")
    assert "1 of 1 runs failed" in capsys.readouterr().out
    assert not (tmp_path / "s" / "overlay.png").exists()


def test_a_run_that_crashes_is_a_failed_row_and_the_sweep_goes_on(tmp_path: Path, monkeypatch) -> None:
    from flowerbed.simulations import simulate as simulate_module
    from flowerbed.simulations.research import sweep as sweep_module

    real = simulate_module.simulate

    def simulate(experiment, **kwargs):
        if experiment.strategy.name == "FedAdagrad":
            raise RuntimeError("the engine broke")  # not a FlowerbedError: e.g. Flower's InconsistentMessageReplies
        return real(experiment, **kwargs)

    monkeypatch.setattr(simulate_module, "simulate", simulate)
    path = _sweep_file(
        tmp_path,
        "set = { rounds = 1, backend = { name = 'inline' }, evaluate = { plots = false } }\n"
        '[grid]\n"strategy.name" = ["FedAdagrad", "FedAvg"]\n',
    )
    result = sweep_module.run_sweep(path, folder=tmp_path / "s")
    failed, done = result.rows
    assert failed.error == "RuntimeError: the engine broke" and failed.run_dir is None
    assert done.error is None and done.run_dir is not None
