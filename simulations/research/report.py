"""Read run folders and draw their reports.

A run folder (docs/architecture.md) holds ``experiment.json``, ``metrics.jsonl`` (one JSON object
per round: ``round``, ``time``, ``train``, ``evaluate``, ``central``, ``sites``, ``participants``,
``refused``, ``epsilon_max``) and ``summary.json``. ``write_report`` turns one run into
``plots/global.png`` (aggregated metrics per round), ``plots/sites.png`` (each site's metrics) and,
when DP is on, ``plots/epsilon.png`` (epsilon per site and the maximum); several runs become one
overlay of each global metric and of the maximum epsilon.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowerbed.exception import RunError
from flowerbed.simulations.research.plots import Series, plot_panels

__all__ = [
    "RunRecord",
    "epsilon_panels",
    "final_metrics",
    "global_panels",
    "load_run",
    "site_panels",
    "write_report",
]

#: Where each aggregate of a round line comes from, and how panels name it.
SOURCES = {"train": "train", "evaluate": "federated", "central": "central"}
_SKIP_SUFFIXES = ("num-examples", "num_examples")


@dataclass
class RunRecord:
    """One run folder, read.

    Attributes
    ----------
    path : Path
        The run folder.
    rounds : list[dict]
        The lines of ``metrics.jsonl``, in file order.
    experiment : dict
        ``experiment.json`` (empty if missing).
    summary : dict
        ``summary.json`` (empty if missing: the run may still be going).
    """

    path: Path
    rounds: list[dict[str, Any]]
    experiment: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The experiment's name, else the folder's."""
        return str(self.experiment.get("name") or self.path.name)


def load_run(path: str | Path) -> RunRecord:
    """Read a run folder.

    Raises
    ------
    RunError
        The folder or its ``metrics.jsonl`` is missing, or a line is not a JSON object with a
        ``round``; the message names the file and line.
    """
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise RunError(
            f"{path}: no metrics.jsonl here; give a run folder made by flowerbed simulate (runs/<name>-<timestamp>/)"
        )
    rounds = []
    for number, line in enumerate(metrics.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunError(f"{metrics}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "round" not in record:
            raise RunError(f"{metrics}:{number}: expected a JSON object with a 'round' key")
        rounds.append(record)
    return RunRecord(path, rounds, _read_json(path / "experiment.json"), _read_json(path / "summary.json"))


def global_panels(runs: Sequence[RunRecord], labels: Sequence[str] | None = None) -> dict[str, dict[str, Series]]:
    """Aggregated metrics per round: ``{"central accuracy": {run label: (rounds, values)}}``.

    ``labels`` name the runs' lines (default: experiment names, else folder names). Panels come
    grouped by metric (whatever the task's ``metrics_fn`` records, such as accuracy or a C-index,
    in name order; then losses), each as train, federated, central; where the federated and the
    central curves are the same (the sites' test splits are the pooled test set), one panel,
    ``federated = central <metric>``. A
    ``participants`` panel is added when the number of replying sites changes between rounds
    (dropouts, refusals, late joiners).
    """
    labels = list(labels) if labels is not None else _labels(runs)
    found: dict[tuple[str, str], dict[str, Series]] = {}
    for run, label in zip(runs, labels, strict=True):
        for key in SOURCES:
            for metric in _metric_names(r.get(key) for r in run.rounds):
                series = _series(run.rounds, lambda r, k=key, m=metric: (r.get(k) or {}).get(m))
                found.setdefault((metric, key), {})[label] = series
    order = list(SOURCES)
    for metric in {m for m, _ in found}:
        if found.get((metric, "central")) and _same_lines(found.get((metric, "evaluate")), found[(metric, "central")]):
            del found[(metric, "central")]  # the same curve: the federated figure is the pooled test set's
            found[(metric, "evaluate=central")] = found.pop((metric, "evaluate"))
    sources = {**SOURCES, "evaluate=central": "federated = central"}
    order.append("evaluate=central")
    panels = {
        _panel_title(sources[key], metric): found[(metric, key)]
        for metric, key in sorted(found, key=lambda mk: ("loss" in mk[0], mk[0], order.index(mk[1])))
    }
    counts = {
        label: _series(run.rounds, lambda r: _count(r.get("participants")))
        for run, label in zip(runs, labels, strict=True)
    }
    if any(len(set(values)) > 1 for _, values in counts.values()):
        panels["participants"] = {k: v for k, v in counts.items() if v[0]}
    return panels


def site_panels(run: RunRecord) -> dict[str, dict[str, Series]]:
    """Each site's metrics per round: ``{"site accuracy": {site: series}}``.

    Epsilon has its own plot; a metric with one value everywhere (such as ``delta``) is left out.
    """
    sites = sorted({s for r in run.rounds for s in (r.get("sites") or {})})
    metrics = _metric_names(v for r in run.rounds for v in (r.get("sites") or {}).values())
    panels: dict[str, dict[str, Series]] = {}
    for metric in (m for m in metrics if m != "epsilon"):
        lines = {site: _series(run.rounds, lambda r, s=site, m=metric: _site_value(r, s, m)) for site in sites}
        lines = {k: v for k, v in lines.items() if v[0]}
        if len({value for _, values in lines.values() for value in values}) > 1:
            panels[f"site {metric}"] = lines
    return panels


def epsilon_panels(runs: Sequence[RunRecord], labels: Sequence[str] | None = None) -> dict[str, dict[str, Series]]:
    """Epsilon spent: per site and the maximum for one run, the maximum per run for several.

    ``labels`` name the runs' lines when there are several. Empty when no run recorded an
    epsilon (DP off).
    """
    panels: dict[str, dict[str, Series]] = {}
    if len(runs) == 1:
        run = runs[0]
        sites = sorted({s for r in run.rounds for s in (r.get("sites") or {})})
        lines = {site: _series(run.rounds, lambda r, s=site: _site_value(r, s, "epsilon")) for site in sites}
        lines = {k: v for k, v in lines.items() if v[0]}
        top = _series(run.rounds, lambda r: r.get("epsilon_max"))
        if top[0]:
            lines["max"] = top
        if lines:
            panels["epsilon per site"] = lines
        return panels
    lines = {
        label: _series(run.rounds, lambda r: r.get("epsilon_max"))
        for run, label in zip(runs, labels if labels is not None else _labels(runs), strict=True)
    }
    lines = {k: v for k, v in lines.items() if v[0]}
    if lines:
        panels["max epsilon over sites"] = lines
    return panels


def final_metrics(run: RunRecord) -> dict[str, float]:
    """The last round's aggregates, flat: ``{"central.accuracy": 0.91, "epsilon_max": 2.9}``."""
    out: dict[str, float] = {"rounds": float(len(run.rounds))}
    if not run.rounds:
        return out
    last = run.rounds[-1]
    for key in SOURCES:
        for metric, value in (last.get(key) or {}).items():
            if not metric.endswith(_SKIP_SUFFIXES) and _number(value) is not None:
                out[f"{key}.{metric}"] = float(value)
    if _number(last.get("epsilon_max")) is not None:
        out["epsilon_max"] = float(last["epsilon_max"])
    return out


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Draw the PNGs of one run, or overlays of several; return the files written.

    One run also gets its clinical figures (``roc.png``, ``calibration.png``, ``confusion.png``,
    ``subgroups.png``, ``comparison.png``, where the run has them) and ``report.html``, one page
    with every image inlined; the local-only models' figures are drawn as dashed lines.

    Parameters
    ----------
    run_dirs : Sequence[str or Path]
        One or more run folders.
    out : str or Path or None (default: None)
        Output folder; default ``RUN_DIR/plots`` for one run and ``<parent of the first>/overlay``
        for several.
    """
    if not run_dirs:
        raise RunError("give at least one run folder")
    runs = [load_run(p) for p in run_dirs]
    if out is None:
        out = runs[0].path / "plots" if len(runs) == 1 else runs[0].path.parent / "overlay"
    out = Path(out)
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs"
    panels = global_panels(runs)
    ncols = 2 if len(panels) <= 6 else 3
    references = local_only_references(runs[0], panels) if len(runs) == 1 else {}
    written = [plot_panels(panels, out / "global.png", title=title, ncols=ncols, references=references)]
    if len(runs) == 1:
        sites = site_panels(runs[0])
        if sites:
            written.append(plot_panels(sites, out / "sites.png", title=f"{title}: per site"))
    eps = epsilon_panels(runs)
    if eps:
        written.append(plot_panels(eps, out / "epsilon.png", title=f"{title}: epsilon", highlight="max", ncols=1))
    if len(runs) == 1:
        from flowerbed.simulations.research.clinical_report import clinical_figures, write_html

        written += clinical_figures(runs[0].summary, out)
        written.append(write_html(runs[0].summary, title, written, out / "report.html"))
    return written


def local_only_references(run: RunRecord, panels: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Dashed lines for the local-only models (``summary.json``'s ``comparison``) on the pooled-test panel."""
    comparison = run.summary.get("comparison") or {}
    metric = comparison.get("metric")
    target = next((p for p in (f"federated = central {metric}", f"central {metric}") if p in panels), None)
    if not metric or target is None:
        return {}
    lines = {
        f"{site} only": float(v["pooled"])
        for site, v in (comparison.get("local_only") or {}).items()
        if _number((v or {}).get("pooled")) is not None
    }
    mean = _number(comparison.get("local_only_mean_pooled"))
    if mean is not None:
        lines["local-only mean"] = mean
    return {target: lines}


def _same_lines(a: dict[str, Series] | None, b: dict[str, Series]) -> bool:
    """Whether two panels' lines are the same curves (to float rounding: a weighted mean of site figures)."""
    if a is None or set(a) != set(b):
        return False
    return all(
        list(a[k][0]) == list(b[k][0]) and all(abs(x - y) <= 1e-6 for x, y in zip(a[k][1], b[k][1], strict=True))
        for k in a
    )


def _panel_title(source: str, metric: str) -> str:
    """``central accuracy``; ``train-loss`` rather than ``train train-loss``."""
    return metric if metric.startswith(f"{source}-") else f"{source} {metric}"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: not valid JSON ({exc.msg})") from None
    return data if isinstance(data, dict) else {}


def _labels(runs: Sequence[RunRecord]) -> list[str]:
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    folders = [r.path.name for r in runs]
    if len(set(folders)) == len(folders):
        return folders
    return [str(r.path) for r in runs]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _metric_names(dicts: Any) -> list[str]:
    names: dict[str, None] = {}
    for d in dicts:
        for key, value in (d or {}).items():
            if not key.endswith(_SKIP_SUFFIXES) and _number(value) is not None:
                names[key] = None
    return list(names)


def _series(rounds: list[dict[str, Any]], get: Any) -> Series:
    xs, ys = [], []
    for record in rounds:
        value = _number(get(record))
        if value is not None:
            xs.append(float(record["round"]))
            ys.append(value)
    return xs, ys


def _site_value(record: dict[str, Any], site: str, metric: str) -> Any:
    return ((record.get("sites") or {}).get(site) or {}).get(metric)


def _count(participants: Any) -> int | None:
    if isinstance(participants, int | float) and not isinstance(participants, bool):
        return int(participants)
    if isinstance(participants, list | tuple | dict):
        return len(participants)
    return None
