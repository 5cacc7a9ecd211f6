"""Reports from run folders written by hand in the documented format (docs/architecture.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flowerbed.exception import RunError
from flowerbed.simulations.research.report import (
    epsilon_panels,
    final_metrics,
    global_panels,
    load_run,
    site_panels,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(folder: Path, name: str, rounds: int, sites: list[str], dp: bool, drop: str | None = None) -> Path:
    """A run folder as the round loop writes it: experiment.json, metrics.jsonl, summary.json."""
    folder.mkdir(parents=True)
    (folder / "experiment.json").write_text(json.dumps({"name": name, "seed": 0, "rounds": rounds}))
    lines = []
    for r in range(1, rounds + 1):
        present = [s for s in sites if not (drop == s and r % 2 == 0)]
        per_site = {
            s: {
                "train-num-examples": 50 + i,
                "train-loss": 1.0 / (r + i),
                "accuracy": 0.5 + 0.04 * r + 0.01 * i,
                **({"epsilon": 0.3 * r + 0.05 * i, "delta": 1e-5} if dp else {}),
            }
            for i, s in enumerate(sites)
            if s in present
        }
        lines.append(
            {
                "round": r,
                "time": 1.5 * r,
                "train": {"train-loss": 1.0 / r, "num-examples": 200},
                "evaluate": {"loss": 0.9 / r, "accuracy": 0.5 + 0.04 * r},
                "central": {"loss": 0.8 / r, "accuracy": 0.55 + 0.04 * r},
                "sites": per_site,
                "participants": present,
                "refused": {},
                "epsilon_max": max(v["epsilon"] for v in per_site.values()) if dp else None,
            }
        )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / "summary.json").write_text(json.dumps({"accuracy": {"pooled": 0.9}}))
    return folder


def _png_shape(path: Path) -> tuple[int, ...]:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    return imread(path).shape


def test_one_run_gives_global_site_and_epsilon_plots(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "heart-1", "heart", 5, ["cleveland", "hungary", "va"], dp=True)
    written = write_report([run])
    assert [p.name for p in written] == ["global.png", "sites.png", "epsilon.png", "report.html"]
    assert all(p.parent == run / "plots" for p in written)
    for path in written[:-1]:
        height, width, _ = _png_shape(path)
        assert height > 200 and width > 300


def test_panels_carry_the_recorded_values(tmp_path: Path) -> None:
    run = load_run(_write_run(tmp_path / "r", "r", 4, ["a", "b"], dp=True, drop="b"))
    panels = global_panels([run])
    assert set(panels) == {
        "train-loss",
        "federated loss",
        "federated accuracy",
        "central loss",
        "central accuracy",
        "participants",
    }, "num-examples is not plotted; participants are, because site b drops in even rounds"
    rounds, values = panels["central accuracy"]["r"]
    assert rounds == [1, 2, 3, 4]
    assert np.allclose(values, [0.59, 0.63, 0.67, 0.71])
    assert panels["participants"]["r"][1] == [2, 1, 2, 1]

    sites = site_panels(run)
    assert set(sites) == {"site train-loss", "site accuracy"}, "epsilon apart, constant delta out"
    assert sites["site accuracy"]["b"][0] == [1, 3], "rounds where b did not reply are gaps"

    eps = epsilon_panels([run])["epsilon per site"]
    assert set(eps) == {"a", "b", "max"}
    assert eps["max"][1] == pytest.approx([0.35, 0.6, 0.95, 1.2])

    final = final_metrics(run)
    assert final["central.accuracy"] == pytest.approx(0.71)
    assert final["epsilon_max"] == pytest.approx(1.2)
    assert final["rounds"] == 4
    assert "train.num-examples" not in final


def test_no_dp_means_no_epsilon_plot(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "plain", "plain", 3, ["a", "b"], dp=False)
    assert epsilon_panels([load_run(run)]) == {}
    assert [p.name for p in write_report([run], tmp_path / "out")] == ["global.png", "sites.png", "report.html"]


def test_several_runs_overlay_one_line_per_run(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "runs" / "fedavg-1", "fedavg", 3, ["a", "b"], dp=True)
    b = _write_run(tmp_path / "runs" / "fedprox-1", "fedprox", 5, ["a", "b"], dp=False)
    runs = [load_run(a), load_run(b)]
    panels = global_panels(runs)
    assert set(panels["central accuracy"]) == {"fedavg", "fedprox"}
    assert len(panels["central accuracy"]["fedprox"][0]) == 5
    assert set(epsilon_panels(runs)["max epsilon over sites"]) == {"fedavg"}
    written = write_report([a, b])
    assert [p.name for p in written] == ["global.png", "epsilon.png"]
    assert written[0].parent == tmp_path / "runs" / "overlay"


def test_same_experiment_name_falls_back_to_folder_names(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "x-1", "same", 2, ["a"], dp=False)
    b = _write_run(tmp_path / "x-2", "same", 2, ["a"], dp=False)
    assert set(global_panels([load_run(a), load_run(b)])["central accuracy"]) == {"x-1", "x-2"}


def test_a_folder_without_metrics_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RunError, match=r"no metrics\.jsonl here"):
        load_run(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"round": 1}\n{not json\n')
    with pytest.raises(RunError, match=r"metrics\.jsonl:2: not valid JSON"):
        load_run(bad)


def test_report_command_redraws_and_reports_errors(tmp_path: Path) -> None:
    from flowerbed.cli import _register, app

    _register()
    run = _write_run(tmp_path / "r-1", "r", 3, ["a", "b"], dp=True)
    result = CliRunner().invoke(app, ["report", str(run), "--out", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "png" / "epsilon.png").is_file()
    assert "central.accuracy" in result.output
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert isinstance(missing.exception, RunError)
