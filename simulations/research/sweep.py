"""Sweeps: run one base experiment over a grid of settings, then tabulate and overlay the results.

A sweep file (TOML)::

    base = "digits_dirichlet.toml"          # the experiment, relative to this file
    name = "digits-sweep"                   # optional (default: the file's stem)
    output = "sweeps"                       # optional: results go to <output>/<name>-<timestamp>/
    set = { rounds = 5 }                    # optional: fixed overrides for every run

    [grid]                                  # dotted keys to lists; every combination runs
    "strategy.name" = ["FedAvg", "FedAdam"]
    "data.partition.alpha" = [0.1, 1.0]

Settings that go together (a strategy with its own learning rates) are named cases, each a
table of overrides; every case runs with every grid combination, and ``average_over`` gives the
mean and standard deviation over the grid keys it names (seeds, say)::

    average_over = ["seed"]

    [cases.FedAvg]
    "train.lr" = 0.001

    [cases.FedAdam]
    "strategy.name" = "FedAdamPaper"
    "strategy.args" = { eta = 0.01, beta_2 = 0.999, tau = 1e-8 }
    "train.lr" = 0.01

    [grid]
    seed = [42, 43, 44, 45, 46]

Every combination is validated (experiment schema, dataset and partition) before the first run
starts. The sweep folder holds ``runs/`` (one run folder per combination), ``summary.csv``,
``summary.md``, ``overlay.png`` and, with ``average_over``, ``averaged.csv`` and ``averaged.md``.
Besides the last round's aggregates, every row has ``sites.<metric>``: the unweighted mean over
the sites of the final model's metric on each site's own test split (FLamby's "client average").
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowerbed.exception import ConfigError, FlowerbedError
from flowerbed.experiment import Experiment, apply_override, parse_experiment

__all__ = [
    "Sweep",
    "SweepResult",
    "SweepRow",
    "load_sweep",
    "run_sweep",
    "to_markdown",
]

_SWEEP_KEYS = {"base", "name", "output", "set", "grid", "cases", "average_over"}
CASE = "case"
_MAIN_METRICS = ("central.accuracy", "evaluate.accuracy", "central.loss", "evaluate.loss")


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: one experiment per grid combination.

    Attributes
    ----------
    path : Path
        The sweep file.
    name : str
        Names the sweep folder and every run (``<name>-<index>``).
    output : Path
        Parent of the sweep folder.
    keys : tuple[str, ...]
        ``"case"`` (when the file has cases), then the grid's dotted keys, in file order.
    combinations : tuple[tuple[Any, ...], ...]
        One value per key for every run, in ``itertools.product`` order.
    experiments : tuple[Experiment, ...]
        The resolved experiment of every combination (``output`` not yet set).
    average_over : tuple[str, ...]
        Grid keys the averaged table takes means over.
    """

    path: Path
    name: str
    output: Path
    keys: tuple[str, ...]
    combinations: tuple[tuple[Any, ...], ...]
    experiments: tuple[Experiment, ...]
    average_over: tuple[str, ...] = ()

    def label(self, index: int) -> str:
        """A short legend label, e.g. ``FedAdam, alpha=0.1``."""
        return ", ".join(_short(k, v) for k, v in zip(self.keys, self.combinations[index], strict=True))


@dataclass
class SweepRow:
    """One finished (or failed) combination."""

    index: int
    values: dict[str, Any]
    label: str
    run_dir: Path | None
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class SweepResult:
    """The sweep folder and what it holds."""

    folder: Path
    rows: list[SweepRow]
    csv_path: Path
    markdown_path: Path
    plot_path: Path | None


def load_sweep(path: str | Path, *, check_data: bool = True) -> Sweep:
    """Read a sweep file and validate every combination; nothing runs.

    Parameters
    ----------
    path : str or Path
        The sweep file (TOML).
    check_data : bool (default: True)
        Also load each distinct dataset and partition, so that a bad dataset, too many clients or
        an impossible partition fails now rather than after the first runs.

    Raises
    ------
    ConfigError
        Naming the sweep file (or the base experiment and the combination) and every bad key.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(source, ["file not found (give the path to a sweep .toml)"])
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    allowed = ", ".join(sorted(_SWEEP_KEYS))
    problems = [f"{k}: unknown key (allowed: {allowed})" for k in doc if k not in _SWEEP_KEYS]
    if not isinstance(doc.get("base"), str):
        problems.append("base: required, the experiment file this sweep varies (a path)")
    grid = _flatten(doc.get("grid"), "grid", problems)
    cases = _cases(doc.get("cases"), problems)
    if not grid and not cases:
        problems.append('grid: required (or cases), a table of dotted keys to lists, e.g. "seed" = [0, 1]')
    fixed = _flatten(doc.get("set"), "set", problems)
    average_over = doc.get("average_over", [])
    if not isinstance(average_over, list) or any(k not in grid for k in average_over):
        problems.append(f'average_over = {average_over!r}: must be a list of grid keys (e.g. ["seed"])')
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            problems.append(f"grid.{key} = {values!r}: must be a non-empty list of values")
    if problems:
        raise ConfigError(source, problems)

    base_path = (path.parent / doc["base"]).resolve()
    if not base_path.is_file():
        raise ConfigError(source, [f"base = {doc['base']!r}: no such file ({base_path})"])
    try:
        base = tomllib.loads(base_path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(base_path), [f"not valid TOML: {exc}"]) from None
    name = str(doc.get("name") or path.stem)
    keys = ((CASE,) if cases else ()) + tuple(grid)
    axes = ([list(cases)] if cases else []) + [grid[k] for k in grid]
    combinations = tuple(itertools.product(*axes))
    experiments = []
    for index, combo in enumerate(combinations):
        where = f"{base_path} with " + ", ".join(f"{k}={v!r}" for k, v in zip(keys, combo, strict=True))
        data = copy.deepcopy(base)
        chosen = dict(zip(keys, combo, strict=True))
        case = cases.get(chosen.pop(CASE, None), {})
        for key, value in [*fixed.items(), *case.items(), *chosen.items()]:
            apply_override(data, f"{key}={_toml_literal(value, where)}", where)
        apply_override(data, f"name={_toml_literal(f'{name}-{index:02d}', where)}", where)
        experiment = parse_experiment(data, where)
        _check_grid_applies(experiment, (*keys, *case), where)
        experiments.append(experiment)
    if check_data:
        _check_data(experiments, keys, combinations, base_path)
    return Sweep(
        path=path,
        name=name,
        output=Path(str(doc.get("output", "sweeps"))),
        keys=keys,
        combinations=combinations,
        experiments=tuple(experiments),
        average_over=tuple(average_over),
    )


def _cases(table: Any, problems: list[str]) -> dict[str, dict[str, Any]]:
    """``[cases.NAME]`` tables of overrides, flattened to dotted keys."""
    if table is None:
        return {}
    if not isinstance(table, Mapping) or not all(isinstance(v, Mapping) for v in table.values()):
        problems.append('cases: must hold one table of overrides per case, e.g. [cases.FedAvg] "train.lr" = 0.001')
        return {}
    return {str(name): _flatten(values, f"cases.{name}", problems) for name, values in table.items()}


def run_sweep(
    path: str | Path,
    *,
    quiet: bool = True,
    folder: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """Validate a sweep, run every combination with ``simulate``, and write the tables and plot.

    Parameters
    ----------
    path : str or Path
        The sweep file.
    quiet : bool (default: True)
        Passed to ``simulate`` (no per-round display).
    folder : str or Path or None (default: None)
        The sweep folder; default ``<output>/<name>-<UTC timestamp>``.
    progress : Callable[[str], None] or None (default: None)
        Called with one line before and after each run (e.g. ``print``).

    Returns
    -------
    SweepResult
        A combination that fails is recorded as a failed row (with the error's type when it is
        not a ``FlowerbedError``) and the sweep goes on; only an interrupt stops it.
    """
    from flowerbed.simulations.research.report import final_metrics, load_run
    from flowerbed.simulations.simulate import simulate

    sweep = load_sweep(path)
    if folder is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        folder = sweep.output / f"{sweep.name}-{stamp}"
    folder = Path(folder)
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _line: None)
    rows: list[SweepRow] = []
    total = len(sweep.experiments)
    for index, experiment in enumerate(sweep.experiments):
        label = sweep.label(index)
        values = dict(zip(sweep.keys, sweep.combinations[index], strict=True))
        experiment = experiment.model_copy(update={"output": str(folder / "runs")})
        say(f"[{index + 1}/{total}] {label}")
        start = time.perf_counter()
        try:
            run_dir = simulate(experiment, quiet=quiet)
        except Exception as exc:  # one failed run is a failed row; the sweep goes on
            reason = str(exc) if isinstance(exc, FlowerbedError) else f"{type(exc).__name__}: {exc}"
            rows.append(SweepRow(index, values, label, None, time.perf_counter() - start, error=reason))
            say(f"[{index + 1}/{total}] failed: {reason}")
        else:
            seconds = time.perf_counter() - start
            try:
                summary = json.loads((run_dir / "summary.json").read_text())
            except (OSError, ValueError):
                summary = {}
            if not summary.get("rounds_completed", 1):  # every site refused, or the loop stopped before round 1
                reason = f"no round completed: {summary.get('stopped') or 'no reason recorded'}"
                rows.append(SweepRow(index, values, label, None, seconds, error=reason))
                say(f"[{index + 1}/{total}] failed: {reason}")
            else:
                metrics = {**final_metrics(load_run(run_dir)), **site_means(run_dir)}
                rows.append(SweepRow(index, values, label, run_dir, seconds, metrics))
                say(f"[{index + 1}/{total}] done in {seconds:.1f} s: {run_dir}")
        _write_tables(sweep.keys, folder, rows)  # an interrupted sweep keeps what it finished
    csv_path, markdown_path = _write_tables(sweep.keys, folder, rows)
    if sweep.average_over:
        _write_averages(sweep.keys, sweep.average_over, folder, rows)
    done = [r for r in rows if r.run_dir is not None]
    plot_path = _overlay(folder / "overlay.png", done, sweep.name) if done else None
    return SweepResult(folder, rows, csv_path, markdown_path, plot_path)


def to_markdown(keys: tuple[str, ...], rows: list[SweepRow]) -> str:
    """The sweep's summary as a Markdown table: grid values, final metrics, seconds, run folder."""
    header, body = _table(keys, rows)
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(":---" if i < len(keys) or i == len(header) - 1 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def _write_tables(keys: tuple[str, ...], folder: Path, rows: list[SweepRow]) -> tuple[Path, Path]:
    header, body = _table(keys, rows)
    csv_path = folder / "summary.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body)
    markdown_path = folder / "summary.md"
    markdown_path.write_text(to_markdown(keys, rows))
    return csv_path, markdown_path


def site_means(run_dir: Path) -> dict[str, float]:
    """``sites.<metric>``: the unweighted mean over the sites of the final model's metric on their own test splits."""
    summary_path = run_dir / "summary.json"
    sites = json.loads(summary_path.read_text()).get("final", {}).get("sites", {}) if summary_path.is_file() else {}
    names = {m for values in sites.values() for m in values if m != "num-examples"}
    out = {}
    for metric in sorted(names):
        values = [v.get(metric) for v in sites.values()]
        if all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            out[f"sites.{metric}"] = float(sum(values) / len(values))
    return out


def averaged(keys: tuple[str, ...], over: tuple[str, ...], rows: list[SweepRow]) -> tuple[list[str], list[list[str]]]:
    """Mean ± standard deviation (sample, n - 1) of every metric over the ``over`` keys, per other combination."""
    kept = [k for k in keys if k not in over]
    groups: dict[tuple[str, ...], list[SweepRow]] = {}
    for row in rows:
        if row.run_dir is not None:
            groups.setdefault(tuple(_cell(row.values[k]) for k in kept), []).append(row)
    metrics = sorted({m for row in rows for m in row.metrics if m != "rounds"})
    metrics = [m for m in metrics if m.startswith("sites.")] + [m for m in metrics if not m.startswith("sites.")]
    header = [*kept, *metrics, "runs"]
    body = []
    for group, members in groups.items():
        cells = list(group)
        for metric in metrics:
            values = [r.metrics[metric] for r in members if metric in r.metrics]
            if not values:
                cells.append("")
                continue
            mean = sum(values) / len(values)
            sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            cells.append(f"{mean:.3f} ± {sd:.3f}")
        cells.append(str(len(members)))
        body.append(cells)
    return header, body


def _write_averages(keys: tuple[str, ...], over: tuple[str, ...], folder: Path, rows: list[SweepRow]) -> None:
    header, body = averaged(keys, over, rows)
    with open(folder / "averaged.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(body)
    rule = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    (folder / "averaged.md").write_text("\n".join(lines) + "\n")


def _overlay(path: Path, rows: list[SweepRow], name: str) -> Path:
    from flowerbed.simulations.research.plots import plot_panels
    from flowerbed.simulations.research.report import epsilon_panels, global_panels, load_run

    runs = [load_run(r.run_dir) for r in rows if r.run_dir is not None]
    labels = [r.label for r in rows]
    panels = global_panels(runs, labels)
    wanted = ["central accuracy", "federated accuracy", "central loss", "federated loss"]
    chosen = {k: panels[k] for k in wanted if k in panels} or panels
    chosen.update(epsilon_panels(runs, labels) if len(runs) > 1 else {})
    ncols = 2 if len(chosen) <= 6 else 3
    return plot_panels(chosen, path, title=f"sweep {name}", ncols=ncols)


def _table(keys: tuple[str, ...], rows: list[SweepRow]) -> tuple[list[str], list[list[str]]]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row.metrics:
            if key != "rounds":
                seen[key] = None
    metrics = [m for m in _MAIN_METRICS if m in seen] + sorted(m for m in seen if m not in _MAIN_METRICS)
    header = [*keys, *metrics, "rounds", "seconds", "run"]
    body = []
    for row in rows:
        cells = [_cell(row.values[k]) for k in keys]
        cells += [_number(row.metrics.get(m)) for m in metrics]
        cells.append(str(int(row.metrics.get("rounds", 0))))
        cells.append(f"{row.seconds:.1f}")
        cells.append(row.run_dir.name if row.run_dir else f"failed: {_first_line(row.error)}")
        body.append(cells)
    return header, body


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return ""
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("name") or json.dumps(value, sort_keys=True))
    return str(value).replace("|", "/")


def _first_line(text: str | None) -> str:
    lines = [line.strip(" -") for line in (text or "").splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else "").replace("|", "/")[:120]


def _short(key: str, value: Any) -> str:
    if isinstance(value, dict):
        return _cell(value)
    if key.endswith(".name"):
        return str(value)
    return f"{key.rsplit('.', 1)[-1]}={value}"


def _flatten(table: Any, where: str, problems: list[str]) -> dict[str, Any]:
    """``{"a": {"b": [1, 2]}}`` and ``{"a.b": [1, 2]}`` both become ``{"a.b": [1, 2]}``."""
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        problems.append(f"{where} must be a table of dotted keys")
        return {}
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            nested = _flatten(value, f"{where}.{key}", problems)
            out.update({f"{key}.{k}": v for k, v in nested.items()})
        else:
            out[key] = value
    return out


def _toml_literal(value: Any, where: str) -> str:
    """``value`` as a TOML literal, so that ``apply_override`` parses it back unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(where, [f"{value!r}: grid values must be finite numbers"])
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(v, where) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{json.dumps(str(k))} = {_toml_literal(v, where)}" for k, v in value.items())
        return "{" + items + "}"
    raise ConfigError(where, [f"{value!r}: grid values must be TOML values, not {type(value).__name__}"])


def _check_grid_applies(experiment: Experiment, keys: tuple[str, ...], where: str) -> None:
    """A grid over privacy or secagg settings means nothing while that feature is off."""
    for section in ("privacy", "secagg"):
        touched = [k for k in keys if k.startswith(f"{section}.") and k != f"{section}.enabled"]
        if touched and not getattr(experiment, section).enabled:
            raise ConfigError(
                where,
                [
                    f"grid varies {', '.join(touched)} but {section}.enabled = false; set "
                    f"{section}.enabled = true in the base experiment or in the sweep's set table"
                ],
            )


def _check_data(
    experiments: list[Experiment],
    keys: tuple[str, ...],
    combinations: tuple[tuple[Any, ...], ...],
    base_path: Path,
) -> None:
    from flowerbed.tasks.data.catalog import load_federation

    checked: set[str] = set()
    for experiment, combo in zip(experiments, combinations, strict=True):
        token = json.dumps([experiment.data.model_dump(mode="json"), experiment.seed])
        if token in checked:
            continue
        checked.add(token)
        try:
            load_federation(experiment.data, experiment.seed)
        except ConfigError as exc:
            where = f"{base_path} with " + ", ".join(f"{k}={v!r}" for k, v in zip(keys, combo, strict=True))
            raise ConfigError(where, exc.problems) from None
