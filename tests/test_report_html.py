"""The clinical report page renders in a real headless browser and shows the subgroup tables."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flowerbed.simulations.research.report import write_report
from flowerbed.tasks import clinical

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _site_statistics(seed: int, n: int, women: int) -> clinical.Statistics:
    """A node's release for n patients, ``women`` of them women, after suppression at the node."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    logits = np.stack([np.zeros(n), 1.5 * (2 * y - 1) + rng.normal(0, 1, n)], axis=1)
    sex = np.array(["female"] * women + ["male"] * (n - women), dtype=object)
    age = np.array(["<45", "45 to <55", "55 to <65", "≥65"], dtype=object)[rng.integers(0, 4, n)]
    cells = clinical.cell_statistics(logits, y, kind="binary", groups={"sex": sex, "age band": age}, threshold=0.5,
                                     bins=20)  # fmt: skip
    text = clinical.to_text(clinical.release("binary", clinical.suppress(cells, 10), split="test", threshold=0.5,
                                             bins=20, min_count=10))  # fmt: skip
    return clinical.parse_statistics(text, "site")


def _run_folder(folder: Path, sites: int) -> Path:
    """A run folder as the coordinator leaves it, with clinical figures and a local-only comparison."""
    folder.mkdir(parents=True)
    names = [f"hospital-{i:02d}" for i in range(sites)]
    (folder / "experiment.json").write_text(json.dumps({"name": "clinic", "rounds": 3}))
    lines = [
        {
            "round": r,
            "evaluate": {"accuracy": 0.6 + 0.05 * r, "loss": 1 / r},
            "central": {"accuracy": 0.6 + 0.05 * r, "loss": 1 / r},
            "train": {"train-loss": 1 / r},
            "sites": {s: {"eval-accuracy": 0.5 + 0.05 * r + 0.01 * i} for i, s in enumerate(names)},
            "participants": names,
            "refused": {},
        }
        for r in (1, 2, 3)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    released = {s: _site_statistics(i, 60 + 7 * i, 4 if i == 0 else 25) for i, s in enumerate(names)}
    declared = {"sex": ["female", "male", "other", "missing"], "age band": ["<45", "45 to <55", "55 to <65", "≥65"]}
    figures = clinical.clinical_summary(released, declared)
    figures["rejected"] = {}
    comparison = {
        "metric": "accuracy",
        "federated": {"sites": {s: 0.8 for s in names}, "pooled": 0.8},
        "local_only": {s: {"own": 0.7, "pooled": 0.65} for s in names},
        "local_only_mean_pooled": 0.65,
        "verdict": "pooled test set (accuracy, higher is better): federated 0.800 beats the mean 0.650",
    }
    summary = {"strategy": "FedAvg", "rounds_completed": 3, "rounds_planned": 3, "model": {"round": 3},
               "final": {"clinical": figures}, "comparison": comparison}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_the_report_page_renders_in_a_headless_browser_with_its_subgroup_tables(tmp_path: Path) -> None:
    run = _run_folder(tmp_path / "clinic-1", sites=4)
    written = {p.name: p for p in write_report([run])}
    assert {"roc.png", "calibration.png", "confusion.png", "subgroups.png", "comparison.png"} <= set(written)
    page = written["report.html"]
    source = page.read_text()
    assert "data:image/png;base64," in source and 'src="http' not in source, "one file, nothing fetched"
    browser = _browser()
    if browser is None:
        pytest.skip(f"no headless browser on this machine (looked for {', '.join(BROWSERS)}); apt-get install chromium")
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = result.stdout
    assert result.returncode == 0 and "<table" in dom, result.stderr[-2000:]
    assert 'id="subgroups-sex"' in dom and 'id="subgroups-age-band"' in dom
    # hospital-00 has 4 women: its sex cells are marked suppressed in the rendered table.
    sex_table = dom.split('id="subgroups-sex"')[1].split("</table>")[0]
    assert "hospital-00" in sex_table and 'class="suppressed"' in sex_table
    assert "suppressed at the node (fewer than 10 patients)" in sex_table
    assert dom.count("<img") >= 6


def test_many_sites_are_drawn_as_a_median_and_a_band(tmp_path: Path) -> None:
    from flowerbed.simulations.research.plots import quantile_band

    lines = {f"c{i}": ([1.0, 2.0, 3.0], [0.1 * i, 0.1 * i + 0.1, 0.1 * i + 0.2]) for i in range(21)}
    band = quantile_band(lines)
    assert band["median"] == pytest.approx([1.0, 1.1, 1.2]) and band["count"] == [21.0] * 3
    assert band["low"] == pytest.approx([0.2, 0.3, 0.4]) and band["high"] == pytest.approx([1.8, 1.9, 2.0])
    run = _run_folder(tmp_path / "many-1", sites=14)
    names = [p.name for p in write_report([run])]
    assert "roc.png" in names and "report.html" in names
