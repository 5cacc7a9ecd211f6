"""The clinical report of one run: ROC, calibration, confusion and subgroup figures, and one HTML page.

Everything is drawn from the run folder alone (``summary.json``'s ``final.clinical``, the
statistics the nodes released, and ``comparison`` when local-only models were trained), so a
simulated run and a deployed run collected from the coordinator give the same page. The page is
one file: its images are inlined as base64 PNGs, and nothing is fetched when it is opened.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flowerbed.simulations.research.plots import pyplot
from flowerbed.tasks import clinical

__all__ = ["clinical_figures", "write_html"]

_MAX_SITES = 12  # beyond this many sites, per-site curves become a median and a quantile band
_POOLED = "pooled"

#: Columns of the headline and subgroup tables: (key, heading).
HEADLINE = {
    "binary": [
        ("n", "patients"),
        ("accuracy", "accuracy"),
        ("balanced_accuracy", "balanced accuracy"),
        ("sensitivity", "sensitivity (recall)"),
        ("specificity", "specificity"),
        ("precision", "precision (PPV)"),
        ("f1", "F1"),
        ("auroc", "AUROC"),
        ("auprc", "AUPRC"),
        ("brier", "Brier score"),
        ("ece", "ECE"),
    ],
    "multiclass": [
        ("n", "patients"),
        ("accuracy", "accuracy"),
        ("balanced_accuracy", "balanced accuracy"),
        ("precision", "macro precision"),
        ("sensitivity", "macro recall"),
        ("f1", "macro F1"),
        ("brier", "Brier score"),
        ("ece", "ECE (top class)"),
    ],
    "regression": [("n", "patients"), ("mae", "MAE"), ("rmse", "RMSE")],
}
SUBGROUP = {
    "binary": [
        ("n", "patients"),
        ("prevalence", "prevalence"),
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
        ("positive_rate", "predicted positive"),
        ("auroc", "AUROC"),
        ("ece", "ECE"),
        ("observed_expected", "observed / expected"),
    ],
    "multiclass": [("n", "patients"), ("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy")],
    "regression": [("n", "patients"), ("mae", "MAE"), ("rmse", "RMSE")],
}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.{digits}f}"


def _metric_text(metrics: Mapping[str, Any], key: str) -> str:
    """A metric with how it was made: ``0.897 ± 0.010 (20 bins)`` for a binned AUROC."""
    text = _fmt(metrics.get(key))
    if key in (metrics.get("approximate") or []) and metrics.get(key) is not None:
        bound = metrics.get(f"{key}_bound")
        text += f" ± {bound:.3f}" if bound is not None else " (≈)"
    return text


# ---------------------------------------------------------------------------------------- figures


def _sites_statistics(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each site's whole-split cell, and the pooled one, from the released statistics."""
    kind = summary.get("kind")
    cells: dict[str, dict[str, Any]] = {}
    for site, stats in (summary.get("statistics") or {}).items():
        whole = next((c for c in stats.get("cells", []) if c["group"] == clinical.ALL), None)
        if whole is not None:
            cells[site] = whole
    if cells and kind:
        cells[_POOLED] = clinical.pool_cells(list(cells.values()), kind)
    return cells


def _roc_figure(cells: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 5.0), constrained_layout=True)
    sites = {s: c for s, c in cells.items() if s != _POOLED}
    if len(sites) > _MAX_SITES:
        grid = np.linspace(0, 1, 51)
        curves = []
        for c in sites.values():
            fpr, tpr = clinical.roc_points(c["pos"], c["neg"])
            curves.append(np.interp(grid, fpr, tpr))
        q = np.quantile(np.asarray(curves), [0.1, 0.5, 0.9], axis=0)
        ax.fill_between(grid, q[0], q[2], alpha=0.25, label="sites: 10th-90th percentile")
        ax.plot(grid, q[1], linewidth=1.4, label=f"sites: median of {len(sites)}")
    else:
        for site, c in sites.items():
            fpr, tpr = clinical.roc_points(c["pos"], c["neg"])
            auroc = ((summary.get("sites") or {}).get(site) or {}).get("all", {}).get("auroc")
            ax.plot(fpr, tpr, marker="o", markersize=2, linewidth=1.2, label=f"{site} (AUROC {_fmt(auroc)})")
    if _POOLED in cells:
        fpr, tpr = clinical.roc_points(cells[_POOLED]["pos"], cells[_POOLED]["neg"])
        pooled = (summary.get("pooled") or {}).get("all") or {}
        label = f"pooled (AUROC {_metric_text(pooled, 'auroc')})"
        ax.plot(fpr, tpr, color="black", linewidth=2.2, label=label, zorder=3)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(f"ROC curves, from {summary.get('bins')} score bins per site")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _calibration_figure(cells: Mapping[str, Mapping[str, Any]], summary: Mapping[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 5.0), constrained_layout=True)
    sites = {s: c for s, c in cells.items() if s != _POOLED}
    bins = clinical.ece_bins(int(summary.get("bins") or 10))
    mids = (np.arange(bins) + 0.5) / bins
    if len(sites) > _MAX_SITES:
        rates = np.full((len(sites), bins), np.nan)
        for i, c in enumerate(sites.values()):
            x, y, _ = clinical.calibration_points(c)
            rates[i, np.round(np.asarray(x) * bins - 0.5).astype(int)] = y
        keep = ~np.all(np.isnan(rates), axis=0)
        q = np.nanquantile(rates[:, keep], [0.1, 0.5, 0.9], axis=0)
        ax.fill_between(mids[keep], q[0], q[2], alpha=0.25, label="sites: 10th-90th percentile")
        ax.plot(mids[keep], q[1], linewidth=1.4, label=f"sites: median of {len(sites)}")
    else:
        for site, c in sites.items():
            x, y, _ = clinical.calibration_points(c)
            ax.plot(x, y, marker="o", markersize=3, linewidth=1.0, alpha=0.8, label=site)
    if _POOLED in cells:
        x, y, _ = clinical.calibration_points(cells[_POOLED])
        ax.plot(x, y, color="black", linewidth=2.2, marker="s", markersize=4, label="pooled", zorder=3)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    ax.set_xlabel("predicted probability of the condition (bin midpoint)")
    ax.set_ylabel("observed fraction with the condition")
    ax.set_title(f"Calibration ({bins} equal-width bins)")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _confusion_figure(summary: Mapping[str, Any], path: Path) -> Path:
    plt = pyplot()
    kind = summary.get("kind")
    scopes: list[tuple[str, Any]] = []
    pooled = (summary.get("pooled") or {}).get("all")
    if pooled:
        scopes.append((f"pooled ({pooled['n']} patients)", pooled["confusion"]))
    sites = summary.get("sites") or {}
    if len(sites) <= _MAX_SITES:
        for site, values in sites.items():
            if values.get("all"):
                scopes.append((f"{site} ({values['all']['n']})", values["all"]["confusion"]))
    ncols = min(3, len(scopes))
    nrows = math.ceil(len(scopes) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.1 * nrows), squeeze=False, constrained_layout=True)
    for ax, (name, confusion) in zip(axes.flat, scopes, strict=False):
        if kind == "binary":
            matrix = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]])
            ticks = ["no condition", "condition"]
        else:
            matrix = np.asarray(confusion)
            ticks = [str(i) for i in range(len(matrix))]
        ax.imshow(matrix, cmap="Blues")
        if len(matrix) <= 12:
            for (i, j), value in np.ndenumerate(matrix):
                colour = "white" if value > matrix.max() / 2 else "black"
                ax.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=9)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_xlabel("predicted (patients)")
        ax.set_ylabel("actual (patients)")
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(scopes) :]:
        ax.set_visible(False)
    threshold = summary.get("threshold")
    suffix = f" at threshold {threshold:g}" if kind == "binary" and threshold is not None else ""
    fig.suptitle(f"Confusion matrices{suffix}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _subgroup_figure(summary: Mapping[str, Any], path: Path) -> Path:
    plt = pyplot()
    groups = summary.get("groups") or {}
    pooled = (summary.get("pooled") or {}).get("groups") or {}
    fig, axes = plt.subplots(1, len(groups), figsize=(4.8 * len(groups), 3.8), squeeze=False, constrained_layout=True)
    metrics = [("sensitivity", "sensitivity"), ("specificity", "specificity"), ("positive_rate", "predicted positive")]
    for ax, (group, values) in zip(axes.flat, groups.items(), strict=True):
        x = np.arange(len(values))
        width = 0.8 / len(metrics)
        for k, (key, label) in enumerate(metrics):
            heights = [((pooled.get(group) or {}).get(v) or {}).get(key) for v in values]
            ax.bar(x + (k - 1) * width, [h if h is not None else 0 for h in heights], width, label=label)
        for i, v in enumerate(values):
            if v not in (pooled.get(group) or {}):
                ax.text(i, 0.02, "suppressed", rotation=90, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, values, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel(group)
        ax.set_ylabel("rate (fraction of the subgroup, 0-1)")
        ax.set_title(f"pooled, by {group}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _comparison_figure(comparison: Mapping[str, Any], path: Path) -> Path:
    plt = pyplot()
    metric = comparison.get("metric", "accuracy")
    local = comparison.get("local_only") or {}
    fed = comparison.get("federated") or {}
    sets = [*local, "pooled"]
    own = [(local[s] or {}).get("own") for s in local] + [comparison.get("local_only_mean_pooled")]
    federated = [(fed.get("sites") or {}).get(s) for s in local] + [fed.get("pooled")]
    x = np.arange(len(sets))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(sets)), 3.8), constrained_layout=True)
    ax.bar(x - 0.2, [v if v is not None else 0 for v in federated], 0.4, label="federated (global) model")
    ax.bar(x + 0.2, [v if v is not None else 0 for v in own], 0.4, label="local-only model (own site; pooled: mean)")
    ax.set_xticks(x, sets, fontsize=8)
    ax.set_xlabel("test set")
    ax.set_ylabel(f"{metric} on the test set")
    ax.set_title(f"Global model vs. models trained on one site only ({metric})")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def clinical_figures(summary: Mapping[str, Any], out: Path) -> list[Path]:
    """The clinical PNGs of a run: ROC and calibration (binary), confusion matrices, subgroups, the comparison."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    figures = (summary.get("final") or {}).get("clinical") or {}
    kind = figures.get("kind")
    if kind in ("binary", "multiclass") and (figures.get("pooled") or {}).get("all"):
        if kind == "binary":
            cells = _sites_statistics(figures)
            written.append(_roc_figure(cells, figures, out / "roc.png"))
            written.append(_calibration_figure(cells, figures, out / "calibration.png"))
        written.append(_confusion_figure(figures, out / "confusion.png"))
        if kind == "binary" and figures.get("groups"):
            written.append(_subgroup_figure(figures, out / "subgroups.png"))
    if summary.get("comparison"):
        written.append(_comparison_figure(summary["comparison"], out / "comparison.png"))
    return written


# ------------------------------------------------------------------------------------------- html

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #eef2f6; }
td.suppressed { background: #f3f3f3; color: #777; font-style: italic; text-align: center; }
table.fairness td, table.spread td { text-align: left; }
.note { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
"""


def _table(headings: Sequence[str], rows: Sequence[Sequence[str]], attrs: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headings)
    body = "".join("<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in rows)
    return f"<table {attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Suppressed(str):
    """A table cell that marks a suppressed subgroup, across ``span`` columns."""

    span = 1


def _td(cell: str) -> str:
    if isinstance(cell, _Suppressed):
        return f'<td class="suppressed" colspan="{cell.span}">{html.escape(cell)}</td>'
    return f"<td>{html.escape(cell)}</td>"


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _headline(figures: Mapping[str, Any]) -> str:
    kind = figures["kind"]
    columns = HEADLINE[kind]
    rows = []
    for site, values in (figures.get("sites") or {}).items():
        metrics = values.get("all") or {}
        rows.append([site, *(_metric_text(metrics, k) for k, _ in columns)])
    pooled = (figures.get("pooled") or {}).get("all")
    if pooled:
        rows.append(["pooled (all sites)", *(_metric_text(pooled, k) for k, _ in columns)])
    table = _table(["test set", *(h for _, h in columns)], rows, 'class="headline"')
    notes = [
        "Each site's figures are computed at its node on its whole test split; AUROC, AUPRC and ECE of a site "
        "are exact there. Pooled counts, and every metric of them (accuracy, sensitivity, specificity, precision, "
        "F1, Brier score), are exact.",
        f"Pooled AUROC, AUPRC and ECE are approximate, from {figures.get('bins')} score bins: the exact AUROC lies "
        "within the ± bound shown, ECE within half a bin width; AUPRC has no bound.",
    ]
    if kind == "binary":
        threshold = figures["threshold"]
        notes.append(f"A patient is predicted positive when the model's probability is at least {threshold:g}.")
    return table + "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)


def _subgroup_tables(figures: Mapping[str, Any]) -> str:
    kind = figures["kind"]
    columns = SUBGROUP[kind]
    minimum = figures.get("min_count")
    parts = []
    sites = figures.get("sites") or {}
    pooled = (figures.get("pooled") or {}).get("groups") or {}
    for group, values in (figures.get("groups") or {}).items():
        slug = "".join(ch if ch.isalnum() else "-" for ch in group)
        parts.append(f"<h3>By {html.escape(group)}</h3>")
        rows = []
        for scope, by_value in [("pooled", pooled.get(group) or {})] + [
            (s, (v.get("groups") or {}).get(group) or {}) for s, v in sites.items()
        ]:
            for value in values:
                metrics = by_value.get(value)
                if metrics is None:
                    mark = _Suppressed(f"suppressed at the node (fewer than {minimum} patients)")
                    mark.span = len(columns)
                    rows.append([scope, value, mark])
                else:
                    rows.append([scope, value, *(_metric_text(metrics, k) for k, _ in columns)])
        headings = ["test set", group, *(h for _, h in columns)]
        parts.append(_table(headings, rows, f'class="subgroups" id="subgroups-{slug}"'))
    parts.append(
        f'<p class="note">A cell of fewer than {minimum} patients is suppressed at the node and never leaves it; '
        "where a suppressed cell could be recovered by subtraction from the others, the node suppresses more. "
        "Pooled rows add the cells the sites released.</p>"
    )
    return "".join(parts)


def _fairness_tables(figures: Mapping[str, Any]) -> str:
    rows = []
    for scope, fair in [("pooled", (figures.get("pooled") or {}).get("fairness") or {})] + [
        (s, v.get("fairness") or {}) for s, v in (figures.get("sites") or {}).items()
    ]:
        for group, summary in fair.items():
            for metric, gap in (summary.get("gaps") or {}).items():
                rows.append(
                    [
                        scope,
                        group,
                        f"{metric.replace('_', ' ')} ({gap.get('criterion') or 'gap'})",
                        _fmt(gap["difference"]),
                        _fmt(gap["ratio"]),
                        f"{gap['min']} / {gap['max']}",
                    ]
                )
            for metric, worst in (summary.get("worst") or {}).items():
                label = f"worst {metric.replace('_', ' ')}"
                rows.append([scope, group, label, _fmt(worst["metric"]), "", worst["value"]])
    if not rows:
        return '<p class="note">No subgroup has two or more released values.</p>'
    headings = ["test set", "subgroup", "figure", "difference (max - min)", "ratio (min / max)", "groups"]
    return _table(headings, rows, 'class="fairness"')


def _spread_table(figures: Mapping[str, Any]) -> str:
    rows = [
        [metric.replace("_", " "), s["worst_site"], _fmt(s["worst"]), s["best_site"], _fmt(s["best"]), _fmt(s["range"])]
        for metric, s in (figures.get("spread") or {}).items()
    ]
    if not rows:
        return ""
    headings = ["metric", "worst site", "value", "best site", "value", "range"]
    return "<h2>Spread across sites</h2>" + _table(headings, rows, 'class="spread"')


def _comparison_table(comparison: Mapping[str, Any]) -> str:
    local = comparison.get("local_only") or {}
    fed = comparison.get("federated") or {}
    personal = comparison.get("personalized") or {}
    extra = ["personalized (the site's own)"] if personal else []
    headings = ["test set", "federated (global)", *extra, *(f"{s} only" for s in local)]
    rows = []
    for site in local:
        own = [_fmt(local[s].get("own")) if s == site else "" for s in local]
        mine = [_fmt(personal.get(site))] if personal else []
        rows.append([site, _fmt((fed.get("sites") or {}).get(site)), *mine, *own])
    pooled = [_fmt(fed.get("pooled")), *(["-"] if personal else [])]
    rows.append(["pooled (all sites)", *pooled, *(_fmt(local[s].get("pooled")) for s in local)])
    metric = comparison.get("metric", "accuracy")
    title = "Global, personalized and local-only models" if personal else "Global model and local-only models"
    return (
        f"<h2>{title} ({html.escape(metric)})</h2>"
        + _table(headings, rows, 'class="comparison"')
        + f'<p class="note">{html.escape(str(comparison.get("verdict", "")))}</p>'
    )


def _notes(figures: Mapping[str, Any]) -> str:
    items = []
    for site, std in (figures.get("noise") or {}).items():
        items.append(
            f"{site}: its node releases these statistics under differential privacy; every count carries Gaussian "
            f"noise of standard deviation {std:.1f}, so its figures are noisy (its exact AUROC, AUPRC and ECE are "
            "not released)."
        )
    for site, reason in (figures.get("withheld") or {}).items():
        items.append(f"{site}: no statistics ({reason}).")
    for site, reason in (figures.get("rejected") or {}).items():
        items.append(f"{site}: statistics left out ({reason}).")
    for site, stats in (figures.get("statistics") or {}).items():
        for group, reason in (stats.get("unavailable") or {}).items():
            items.append(f"{site}: no {group} subgroups ({reason}).")
    if figures.get("problem"):
        items.append(str(figures["problem"]))
    return "".join(f"<li>{html.escape(i)}</li>" for i in items)


def write_html(summary: Mapping[str, Any], name: str, images: Sequence[Path], path: Path) -> Path:
    """The report page: headline figures, subgroup tables, fairness, comparison, and every image inlined."""
    figures = (summary.get("final") or {}).get("clinical") or {}
    model = summary.get("model") or {}
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(name)}: clinical report"
        f"</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(name)}: what the model does, for whom</h1>",
        '<p class="note">'
        + html.escape(
            f"Strategy {summary.get('strategy', '?')}, {summary.get('rounds_completed', '?')} of "
            f"{summary.get('rounds_planned', '?')} rounds; figures of the {model.get('reported', 'last')} global model "
            f"(round {model.get('round', '?')}), on each site's own test split."
        )
        + "</p>",
    ]
    by_name = {p.name: p for p in images}
    if figures.get("kind") and (figures.get("pooled") or {}).get("all"):
        parts += ["<h2>Per site and pooled</h2>", _headline(figures)]
        for file, alt in (("roc.png", "ROC curves"), ("calibration.png", "calibration curves")):
            if file in by_name:
                parts.append(_image(by_name[file], alt))
        if "confusion.png" in by_name:
            parts.append(_image(by_name["confusion.png"], "confusion matrices"))
        if figures.get("groups"):
            parts += ["<h2>Subgroups</h2>", _subgroup_tables(figures)]
            if "subgroups.png" in by_name:
                parts.append(_image(by_name["subgroups.png"], "subgroup rates"))
            parts += ["<h2>Fairness</h2>", _fairness_tables(figures)]
        parts.append(_spread_table(figures))
    else:
        parts.append('<p class="note">This run holds no clinical statistics (see evaluate.clinical).</p>')
    if summary.get("comparison"):
        parts.append(_comparison_table(summary["comparison"]))
        if "comparison.png" in by_name:
            parts.append(_image(by_name["comparison.png"], "global vs local-only"))
    notes = _notes(figures)
    if notes:
        parts.append(f"<h2>Notes</h2><ul>{notes}</ul>")
    training = [p for p in images if p.name in ("global.png", "sites.png", "epsilon.png")]
    if training:
        parts.append("<h2>Training</h2>")
        parts += [_image(p, p.stem) for p in training]
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
