"""Clinical metrics from sufficient statistics, for the nodes and the coordinator alike.

A node never sends a per-patient score. On its evaluation split it computes, for each *cell* (the
whole split, and each value of each subgroup column), counts and sums from which the metrics follow
(``cell_statistics``), drops the cells below the minimum count (``suppress``), or under DP adds
Gaussian noise (``noisy_statistics``). The coordinator checks what arrives (``parse_statistics``),
adds cells across sites (``pool_cells``) and derives the metrics (``cell_metrics``) and fairness
summaries (``fairness``). docs/evaluation.md describes every field.

Binary classification (score ``p`` = the model's probability of class 1, predicted positive when
``p >= threshold``), one cell:

- ``n``, ``tp``, ``fp``, ``tn``, ``fn``: the confusion matrix at the threshold;
- ``pos[b]``, ``neg[b]``: patients with and without the condition whose score falls in bin ``b`` of
  ``bins`` equal-width bins of [0, 1] (the last bin includes 1);
- ``sq_sum``: the sum of ``(p - y)^2`` (Brier), ``score_sum``: the sum of ``p``;
- ``auroc``, ``auprc``, ``ece``: exact on the node's own rows (left out under DP); ECE on
  ``ece_bins`` (10) equal-width bins.

Pooled over sites, counts and sums add: the confusion matrix and every metric of it, the Brier score,
prevalence and the observed/expected ratio are exact. Pooled AUROC, AUPRC and ECE come from the
histograms: AUROC within a stated bound (half the share of positive-negative pairs that share a
bin), ECE within half a histogram bin, AUPRC without a bound ("approximate, from N bins").

Multiclass (``confusion[k][j]``: true ``k``, predicted ``j`` by arg-max; ``conf_count[b]``,
``conf_correct[b]``: rows whose top probability falls in bin ``b``, and how many of them are right;
``sq_sum``: the multiclass Brier sum) and regression (``entries``, ``abs_sum``, ``sq_sum``) work
the same way.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from flowerbed.tasks.data.contract import level_code

Kind = Literal["binary", "multiclass", "regression"]
Cell = dict[str, Any]
Statistics = dict[str, Any]

VERSION = 1
ALL = "all"
MISSING = "missing"
OTHER = "other"
#: Metrics whose smaller value is better (the worst group is the largest).
LOWER_IS_BETTER = frozenset({"brier", "ece", "mae", "rmse"})
_COUNTS = ("tp", "fp", "tn", "fn")


# ------------------------------------------------------------------------------------ subgroups


def band_labels(cuts: Sequence[float]) -> list[str]:
    """The names of the bands that cut points make: ``<45``, ``45 to <55``, ..., ``≥65``."""
    f = _number_text
    inner = [f"{f(a)} to <{f(b)}" for a, b in itertools.pairwise(cuts)]
    return [f"<{f(cuts[0])}", *inner, f"≥{f(cuts[-1])}"]


def declared_values(cuts: Sequence[float] | None, levels: Mapping[str, str] | None) -> list[str] | None:
    """The values a subgroup can take, known before any data (``None``: only the data says)."""
    if cuts:
        return [*band_labels(cuts), MISSING]
    if levels:
        return [*dict.fromkeys(levels.values()), OTHER, MISSING]
    return None


def assign_values(raw: np.ndarray, cuts: Sequence[float] | None, levels: Mapping[str, str] | None) -> np.ndarray:
    """Each row's subgroup value from the raw column: its band, its level's name, or the value itself.

    ``levels`` map a code's canonical text (``"0"``, ``"1"``, ``"2.5"``) to its name; a code
    outside them is ``other``; a missing value (NaN) is ``missing``.
    """
    raw = np.asarray(raw, dtype=np.float64)
    out = np.full(len(raw), MISSING, dtype=object)
    present = ~np.isnan(raw)
    if cuts:
        labels = np.array(band_labels(cuts), dtype=object)
        out[present] = labels[np.searchsorted(np.asarray(cuts, dtype=np.float64), raw[present], side="right")]
        return out
    for i in np.flatnonzero(present):
        out[i] = levels.get(level_code(raw[i]), OTHER) if levels else _number_text(raw[i])
    return out


def subgroup_levels(levels: Mapping[str, str] | None, contract: Any, column: str) -> dict[str, str] | None:
    """A subgroup's level names: its own, else those of a binary or categorical column of the data contract."""
    if levels:
        return {level_code(k): v for k, v in levels.items()}
    for c in getattr(contract, "columns", ()):
        if c.name == column and c.kind in ("binary", "categorical"):
            return dict(c.codes)
    return None


def declared_groups(subgroups: Sequence[Any], contract: Any) -> dict[str, list[str] | None]:
    """Each subgroup's values known before any data (``evaluate.clinical.subgroups``), by its name."""
    return {s.label: declared_values(s.cuts, subgroup_levels(s.levels, contract, s.column)) for s in subgroups}


def _number_text(value: float) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() else f"{number:g}"


# ---------------------------------------------------------------------------- a node's statistics


def bin_index(scores: np.ndarray, bins: int) -> np.ndarray:
    """The bin of each score in ``bins`` equal-width bins of [0, 1] (1 falls in the last)."""
    return np.clip((np.asarray(scores, dtype=np.float64) * bins).astype(np.int64), 0, bins - 1)


def auroc_exact(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """The area under the ROC curve from the ranks of the scores (ties count one half); ``None`` for one class."""
    labels = np.asarray(labels).astype(bool)
    p, n = int(labels.sum()), int((~labels).sum())
    if p == 0 or n == 0:
        return None
    _, inverse, counts = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks = (first + (counts + 1) / 2.0)[inverse]  # mid-ranks, 1-based
    return float((ranks[labels].sum() - p * (p + 1) / 2.0) / (p * n))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """The area under the precision-recall curve as average precision (scikit-learn's step rule)."""
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        return None
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    s, y = np.asarray(scores, dtype=np.float64)[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last row of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    recall = tp / tp[-1]
    precision = tp / (tp + fp)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def binary_cell(scores: np.ndarray, labels: np.ndarray, threshold: float, bins: int) -> Cell:
    """One cell's statistics for a binary classifier (exact figures included)."""
    p = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    predicted = p >= threshold
    b = bin_index(p, bins)
    pos = np.bincount(b[y], minlength=bins)
    neg = np.bincount(b[~y], minlength=bins)
    cell: Cell = {
        "n": len(y),
        "tp": int((predicted & y).sum()),
        "fp": int((predicted & ~y).sum()),
        "tn": int((~predicted & ~y).sum()),
        "fn": int((~predicted & y).sum()),
        "pos": pos.tolist(),
        "neg": neg.tolist(),
        "sq_sum": float(((p - y) ** 2).sum()),
        "score_sum": float(p.sum()),
        "ece": _ece_exact(p, y, bins),
    }
    for key, value in (("auroc", auroc_exact(p, y)), ("auprc", average_precision(p, y))):
        if value is not None:
            cell[key] = value
    return cell


#: ECE and calibration curves use this many equal-width bins when the histograms' bins are a multiple of it.
ECE_BINS = 10


def ece_bins(bins: int) -> int:
    """The bins of ECE and of the calibration curves: 10, or the histograms' own when not a multiple of 10."""
    return ECE_BINS if bins % ECE_BINS == 0 else bins


def _ece_exact(p: np.ndarray, y: np.ndarray, bins: int) -> float:
    if len(p) == 0:
        return 0.0
    coarse = ece_bins(bins)
    b = bin_index(p, coarse)
    gap = np.bincount(b, weights=y.astype(np.float64), minlength=coarse) - np.bincount(b, weights=p, minlength=coarse)
    return float(np.abs(gap).sum() / len(p))


def _merged(values: Sequence[float], bins: int) -> np.ndarray:
    """Fine-bin counts (or sums) added into the ``ece_bins`` coarse bins."""
    values = np.asarray(values, dtype=np.float64)
    return values.reshape(ece_bins(bins), -1).sum(axis=1)


def multiclass_cell(probs: np.ndarray, labels: np.ndarray, bins: int) -> Cell:
    """One cell's statistics for a classifier of ``K`` classes (arg-max prediction, top-label calibration)."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    k = probs.shape[1]
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, predicted), 1)
    top = probs.max(axis=1)
    b = bin_index(top, bins)
    right = predicted == y
    onehot = np.eye(k)[y]
    coarse = ece_bins(bins)
    c = bin_index(top, coarse)
    gap = np.bincount(c, weights=right.astype(np.float64), minlength=coarse) - np.bincount(
        c, weights=top, minlength=coarse
    )
    return {
        "n": len(y),
        "confusion": confusion.tolist(),
        "conf_count": np.bincount(b, minlength=bins).tolist(),
        "conf_correct": np.bincount(b[right], minlength=bins).tolist(),
        "sq_sum": float(((probs - onehot) ** 2).sum()),
        "ece": float(np.abs(gap).sum() / max(len(y), 1)),
    }


def regression_cell(predictions: np.ndarray, targets: np.ndarray) -> Cell:
    """One cell's statistics for predicted values: absolute and squared errors, summed."""
    error = np.asarray(predictions, dtype=np.float64) - np.asarray(targets, dtype=np.float64)
    return {
        "n": len(error),
        "entries": int(error.size),
        "abs_sum": float(np.abs(error).sum()),
        "sq_sum": float((error**2).sum()),
    }


def outputs_kind(outputs: np.ndarray, targets: np.ndarray, target: str, num_classes: int) -> Kind | None:
    """Which statistics the model's outputs support (``None``: none of these)."""
    if target == "class" and outputs.ndim == 2 and len(outputs) == len(targets):
        if outputs.shape[1] == num_classes == 2 or (outputs.shape[1] == 1 and num_classes == 2):
            return "binary"
        if outputs.shape[1] == num_classes > 2:
            return "multiclass"
    if target == "values" and np.shape(np.squeeze(outputs)) == np.shape(np.squeeze(targets)):
        return "regression"
    return None


def probabilities(outputs: np.ndarray, kind: Kind) -> np.ndarray:
    """Class probabilities from logits: P(class 1) for a binary model (softmax, or sigmoid of one logit)."""
    z = np.asarray(outputs, dtype=np.float64)
    if kind == "binary" and z.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-z[:, 0]))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    probs = e / e.sum(axis=1, keepdims=True)
    return probs[:, 1] if kind == "binary" else probs


def cell_statistics(
    outputs: np.ndarray,
    targets: np.ndarray,
    *,
    kind: Kind,
    groups: Mapping[str, np.ndarray],
    threshold: float,
    bins: int,
) -> list[Cell]:
    """Every cell of a split, unsuppressed (for the node only): ``all``, then each group's values.

    ``outputs`` are the model's raw outputs (logits for a classifier); ``groups`` map a subgroup's
    name to each row's value (``assign_values``).
    """
    scores = probabilities(outputs, kind) if kind != "regression" else np.squeeze(np.asarray(outputs))
    targets = np.asarray(targets) if kind != "regression" else np.squeeze(np.asarray(targets))

    def one(rows: np.ndarray) -> Cell:
        if kind == "binary":
            return binary_cell(scores[rows], targets[rows], threshold, bins)
        if kind == "multiclass":
            return multiclass_cell(scores[rows], targets[rows], bins)
        return regression_cell(scores[rows], targets[rows])

    cells = [{"group": ALL, "value": ALL, **one(np.arange(len(targets)))}]
    for name, values in groups.items():
        for value in sorted(set(values.tolist()), key=str):
            cells.append({"group": name, "value": str(value), **one(np.flatnonzero(values == value))})
    return cells


def suppress(cells: Sequence[Cell], min_count: int) -> list[Cell]:
    """The cells that may leave the node: every cell of at least ``min_count`` patients.

    Within a group the released cells and the whole split would give the suppressed cells' sum by
    subtraction, so more cells go (the smallest first) until the suppressed ones hold no patient or
    at least ``min_count`` together.
    """
    whole = next((c for c in cells if c["group"] == ALL), None)
    if whole is None or whole["n"] < min_count:
        return []
    kept: list[Cell] = [whole]
    by_group: dict[str, list[Cell]] = {}
    for cell in cells:
        if cell["group"] != ALL:
            by_group.setdefault(cell["group"], []).append(cell)
    for members in by_group.values():
        ordered = sorted(members, key=lambda c: (c["n"], str(c["value"])))
        hidden = [c for c in ordered if c["n"] < min_count]
        shown = [c for c in ordered if c["n"] >= min_count]
        while shown and 0 < sum(c["n"] for c in hidden) < min_count:
            hidden.append(shown.pop(0))
        kept.extend(sorted(shown, key=lambda c: str(c["value"])))
    return kept


#: The entries of a binary cell that DP noise covers, and the L2 sensitivity of one patient in one cell.
_NOISY_COUNTS = ("tp", "fp", "tn", "fn")
CELL_SENSITIVITY = 2.0  # one confusion count, one histogram count (each by 1), sq_sum and score_sum (each by <= 1)


def noise_std(noise_multiplier: float, groups: int) -> float:
    """The standard deviation of the noise on each released number (binary cells under DP).

    A patient is in ``1 + groups`` cells (the whole split and one value of each group), and moves
    each by at most ``CELL_SENSITIVITY`` in L2, so the vector of every cell moves by at most
    ``CELL_SENSITIVITY * sqrt(1 + groups)``: Gaussian noise of that times ``noise_multiplier`` is
    the Gaussian mechanism at ``noise_multiplier``.
    """
    return noise_multiplier * CELL_SENSITIVITY * math.sqrt(1 + groups)


def noisy_statistics(
    cells: Sequence[Cell], declared: Mapping[str, Sequence[str]], *, std: float, min_count: int, seed: int | None
) -> list[Cell]:
    """A DP release of binary cells: every declared cell with Gaussian noise; noisy counts below ``min_count`` dropped.

    ``declared`` gives each group's values known before the data (bands, a contract's levels), so
    which cells exist says nothing about the patients; an empty cell is released as noise too. The
    exact figures (AUROC, AUPRC, ECE) are not released. Counts are rounded and kept at least 0.
    """
    rng = np.random.default_rng(seed)
    by_key = {(c["group"], c["value"]): c for c in cells}
    bins = len(cells[0]["pos"])
    empty: Cell = {"n": 0, "tp": 0, "fp": 0, "tn": 0, "fn": 0, "pos": [0] * bins, "neg": [0] * bins}
    empty.update(sq_sum=0.0, score_sum=0.0)
    keys = [(ALL, ALL), *((g, v) for g, values in declared.items() for v in values)]
    out: list[Cell] = []
    for group, value in keys:
        cell = by_key.get((group, value), empty)
        counts = rng.normal([cell[k] for k in _NOISY_COUNTS], std)
        pos = rng.normal(cell["pos"], std)
        neg = rng.normal(cell["neg"], std)
        sq_sum, score_sum = rng.normal([cell["sq_sum"], cell["score_sum"]], std)
        noisy: Cell = {"group": group, "value": value}
        noisy.update({k: max(0, round(v)) for k, v in zip(_NOISY_COUNTS, counts.tolist(), strict=True)})
        noisy["n"] = sum(noisy[k] for k in _NOISY_COUNTS)
        noisy["pos"] = [max(0, round(v)) for v in pos.tolist()]
        noisy["neg"] = [max(0, round(v)) for v in neg.tolist()]
        noisy["sq_sum"] = min(max(0.0, float(sq_sum)), float(noisy["n"]))
        noisy["score_sum"] = min(max(0.0, float(score_sum)), float(noisy["n"]))
        if noisy["n"] >= min_count:
            out.append(noisy)
    return out if out and out[0]["group"] == ALL else []


def release(
    kind: Kind,
    cells: Sequence[Cell],
    *,
    split: str,
    threshold: float,
    bins: int,
    min_count: int,
    noise: float | None = None,
) -> Statistics:
    """What leaves the node: the released cells and how they were made (``noise``: std under DP)."""
    statistics: Statistics = {
        "version": VERSION,
        "kind": kind,
        "split": split,
        "threshold": threshold,
        "bins": bins,
        "min_count": min_count,
        "noise_std": noise,
        "cells": [dict(c) for c in cells],
    }
    return statistics


def withheld(reason: str) -> Statistics:
    """A reply without statistics, and why (no patient figure in the reason)."""
    return {"version": VERSION, "withheld": reason}


def to_text(statistics: Statistics) -> str:
    """The statistics as the compact JSON text that travels in the reply's ``clinical`` record."""
    return json.dumps(statistics, separators=(",", ":"), sort_keys=True)


# -------------------------------------------------------------------------- the coordinator's side


def parse_statistics(text: Any, source: str) -> Statistics:
    """Check a node's statistics (JSON text) before anything is computed from them.

    Raises
    ------
    ValueError
        Naming ``source`` (the site) and what is wrong: not JSON, an unknown version or kind, a
        count that is negative or not whole, lists of the wrong length, sums out of range.
    """
    try:
        data = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError(f"{source}: the clinical statistics are not version-{VERSION} JSON")
    if "withheld" in data:
        return {"version": VERSION, "withheld": str(data["withheld"])[:500]}
    kind, bins = data.get("kind"), data.get("bins")
    if kind not in ("binary", "multiclass", "regression"):
        raise ValueError(f"{source}: unknown statistics kind {kind!r}")
    if not (isinstance(bins, int) and 2 <= bins <= 1000):
        raise ValueError(f"{source}: bins = {bins!r} must be an integer in [2, 1000]")
    cells = data.get("cells")
    if not isinstance(cells, list) or not cells:
        raise ValueError(f"{source}: no cells")
    seen = set()
    for cell in cells:
        named = isinstance(cell, dict) and isinstance(cell.get("group"), str) and isinstance(cell.get("value"), str)
        if not named:
            raise ValueError(f"{source}: a cell has no group or value")
        key = (cell["group"], cell["value"])
        if key in seen:
            raise ValueError(f"{source}: cell {key} appears twice")
        seen.add(key)
        _check_cell(cell, kind, bins, f"{source}, cell {cell['group']}={cell['value']}")
    return data


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_cell(cell: Cell, kind: str, bins: int, where: str) -> None:
    n = cell.get("n")
    if not _count(n):
        raise ValueError(f"{where}: n = {n!r} must be a whole number >= 0")
    if kind == "binary":
        if not all(_count(cell.get(k)) for k in _COUNTS) or sum(cell[k] for k in _COUNTS) != n:
            raise ValueError(f"{where}: tp, fp, tn, fn must be whole numbers >= 0 adding up to n")
        for key in ("pos", "neg"):
            values = cell.get(key)
            if not isinstance(values, list) or len(values) != bins or not all(_count(v) for v in values):
                raise ValueError(f"{where}: {key} must hold {bins} whole numbers >= 0")
        sums = ("sq_sum", "score_sum")
    elif kind == "multiclass":
        confusion = cell.get("confusion")
        ok = isinstance(confusion, list) and confusion and all(isinstance(r, list) for r in confusion)
        if not ok or any(len(r) != len(confusion) or not all(_count(v) for v in r) for r in confusion):
            raise ValueError(f"{where}: confusion must be a square matrix of whole numbers >= 0")
        for key in ("conf_count", "conf_correct"):
            values = cell.get(key)
            if not isinstance(values, list) or len(values) != bins or not all(_count(v) for v in values):
                raise ValueError(f"{where}: {key} must hold {bins} whole numbers >= 0")
        sums = ("sq_sum",)
    else:
        if not _count(cell.get("entries")):
            raise ValueError(f"{where}: entries must be a whole number >= 0")
        sums = ("abs_sum", "sq_sum")
    for key in (*sums, "auroc", "auprc", "ece"):
        value = cell.get(key)
        if key in cell and not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{where}: {key} = {value!r} must be a finite number >= 0")


def pool_cells(cells: Sequence[Cell], kind: Kind) -> Cell:
    """Cells of several sites added together (the exact figures of one site do not pool: left out)."""
    if not cells:
        return {"n": 0}
    out: Cell = {"n": sum(c["n"] for c in cells)}
    if kind == "binary":
        for key in (*_COUNTS, "sq_sum", "score_sum"):
            out[key] = sum(c[key] for c in cells)
        for key in ("pos", "neg"):
            out[key] = np.sum([c[key] for c in cells], axis=0).astype(int).tolist()
    elif kind == "multiclass":
        out["confusion"] = np.sum([c["confusion"] for c in cells], axis=0).astype(int).tolist()
        for key in ("conf_count", "conf_correct"):
            out[key] = np.sum([c[key] for c in cells], axis=0).astype(int).tolist()
        out["sq_sum"] = sum(c["sq_sum"] for c in cells)
    else:
        for key in ("entries", "abs_sum", "sq_sum"):
            out[key] = sum(c[key] for c in cells)
    return out


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def auroc_from_histograms(pos: Sequence[float], neg: Sequence[float]) -> tuple[float, float] | None:
    """AUROC from binned scores, and the bound on its error: ``(value, bound)``.

    Pairs in different bins are ordered by their bins; a pair in one bin counts one half, and its
    true share lies in [0, 1], so the exact AUROC is within ``bound`` = half the share of pairs that
    share a bin.
    """
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    pairs = pos.sum() * neg.sum()
    if pairs == 0:
        return None
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    ties = float((pos * neg).sum())
    value = float(((pos * below).sum() + 0.5 * ties) / pairs)
    return value, 0.5 * ties / pairs


def roc_points(pos: Sequence[float], neg: Sequence[float]) -> tuple[list[float], list[float]]:
    """The ROC curve through the bin edges: (false positive rates, true positive rates), from (0, 0)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    tpr = np.concatenate([[0.0], np.cumsum(pos[::-1])]) / max(pos.sum(), 1.0)
    fpr = np.concatenate([[0.0], np.cumsum(neg[::-1])]) / max(neg.sum(), 1.0)
    return fpr.tolist(), tpr.tolist()


def auprc_from_histograms(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    """Average precision with a threshold at each bin's lower edge (approximate)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if pos.sum() == 0:
        return None
    tp, fp = np.cumsum(pos[::-1]), np.cumsum(neg[::-1])
    keep = (tp + fp) > 0
    recall = tp[keep] / pos.sum()
    precision = tp[keep] / (tp[keep] + fp[keep])
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def calibration_points(cell: Cell) -> tuple[list[float], list[float], list[int]]:
    """The reliability curve of a binary cell on ``ece_bins``: bin midpoints, the observed rate, the count."""
    fine = len(cell["pos"])
    pos, neg = _merged(cell["pos"], fine), _merged(cell["neg"], fine)
    bins = len(pos)
    counts = pos + neg
    mids = (np.arange(bins) + 0.5) / bins
    keep = counts > 0
    return mids[keep].tolist(), (pos[keep] / counts[keep]).tolist(), counts[keep].astype(int).tolist()


def cell_metrics(cell: Cell, kind: Kind) -> dict[str, Any]:
    """Every metric of one cell; ``exact`` lists those computed from exact statistics.

    For AUROC, AUPRC and ECE of a cell without the node's exact figure (a pooled cell, or a DP
    release), ``auroc_bound``, ``ece_bound`` and ``approximate`` say how they were made.
    """
    n = cell["n"]
    out: dict[str, Any] = {"n": n}
    if kind == "binary":
        tp, fp, tn, fn = (cell[k] for k in _COUNTS)
        sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
        prec = _ratio(tp, tp + fp)
        out.update(
            accuracy=_ratio(tp + tn, n),
            balanced_accuracy=None if sens is None or spec is None else (sens + spec) / 2,
            precision=prec,
            sensitivity=sens,
            specificity=spec,
            f1=_ratio(2 * tp, 2 * tp + fp + fn),
            positive_rate=_ratio(tp + fp, n),
            false_positive_rate=None if spec is None else 1 - spec,
            prevalence=_ratio(tp + fn, n),
            brier=_ratio(cell["sq_sum"], n),
            mean_score=_ratio(cell["score_sum"], n),
            observed_expected=_ratio(tp + fn, cell["score_sum"]),
            confusion={"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        )
        approximate: list[str] = []
        if "auroc" in cell:
            out["auroc"] = cell["auroc"]
        else:
            binned = auroc_from_histograms(cell["pos"], cell["neg"])
            out["auroc"], out["auroc_bound"] = binned if binned else (None, None)
            approximate.append("auroc")
        if "auprc" in cell:
            out["auprc"] = cell["auprc"]
        else:
            out["auprc"] = auprc_from_histograms(cell["pos"], cell["neg"])
            approximate.append("auprc")
        if "ece" in cell:
            out["ece"] = cell["ece"]
        else:
            out["ece"], out["ece_bound"] = _ece_binned(cell["pos"], cell["neg"]), 0.5 / len(cell["pos"])
            approximate.append("ece")
        out["approximate"] = approximate
    elif kind == "multiclass":
        confusion = np.asarray(cell["confusion"], dtype=np.float64)
        true, predicted, right = confusion.sum(1), confusion.sum(0), np.diag(confusion)
        recall = [r / t for r, t in zip(right, true, strict=True) if t]
        precision = [r / p for r, p in zip(right, predicted, strict=True) if p]
        f1 = [2 * r / (t + p) for r, t, p in zip(right, true, predicted, strict=True) if t + p]
        out.update(
            accuracy=_ratio(float(right.sum()), n),
            balanced_accuracy=float(np.mean(recall)) if recall else None,
            precision=float(np.mean(precision)) if precision else None,
            sensitivity=float(np.mean(recall)) if recall else None,
            f1=float(np.mean(f1)) if f1 else None,
            brier=_ratio(cell["sq_sum"], n),
            confusion=cell["confusion"],
        )
        if "ece" in cell:
            out["ece"] = cell["ece"]
            out["approximate"] = []
        else:
            right = np.asarray(cell["conf_correct"], dtype=np.float64)
            wrong = np.asarray(cell["conf_count"], dtype=np.float64) - right
            out["ece"], out["ece_bound"] = _ece_binned(right, wrong), 0.5 / len(right)
            out["approximate"] = ["ece"]
    else:
        entries = cell["entries"]
        out.update(mae=_ratio(cell["abs_sum"], entries), rmse=_root(_ratio(cell["sq_sum"], entries)), approximate=[])
    return out


def _root(value: float | None) -> float | None:
    return None if value is None else math.sqrt(value)


def _ece_binned(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    """ECE on ``ece_bins`` from fine histograms, each score taken at its fine bin's midpoint.

    Within half a fine bin of the exact ECE on the same coarse bins (each score moves by at most that).
    """
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    n = (pos + neg).sum()
    if not n:
        return None
    fine = len(pos)
    mids = (np.arange(fine) + 0.5) / fine
    gap = _merged(pos, fine) - _merged((pos + neg) * mids, fine)
    return float(np.abs(gap).sum() / n)


#: Per kind: the metrics of the worst group, and those whose gap between groups is reported.
WORST = {
    "binary": ("balanced_accuracy", "sensitivity", "specificity", "auroc", "ece"),
    "multiclass": ("accuracy", "balanced_accuracy", "ece"),
    "regression": ("mae", "rmse"),
}
GAPS = {
    "binary": ("sensitivity", "specificity", "false_positive_rate", "positive_rate"),
    "multiclass": ("accuracy", "balanced_accuracy"),
    "regression": ("mae",),
}
#: What each gap tests, in the fairness literature's names.
CRITERIA = {
    "sensitivity": "equal opportunity",
    "specificity": "equalized odds",
    "false_positive_rate": "equalized odds",
    "positive_rate": "demographic parity",
}


def fairness(metrics: Mapping[str, Mapping[str, Mapping[str, Any]]], kind: Kind) -> dict[str, Any]:
    """Per group: the worst value of each metric and its cell, and each gap as a difference and a ratio.

    ``metrics`` map a group to its values' ``cell_metrics``. A gap is ``max - min`` and
    ``min / max`` over the group's values (1 is parity); calibration per value is its ECE and its
    observed/expected ratio.
    """
    out: dict[str, Any] = {}
    for group, values in metrics.items():
        summary: dict[str, Any] = {"values": sorted(values), "worst": {}, "gaps": {}}
        for metric in WORST[kind]:
            scored = {v: m[metric] for v, m in values.items() if m.get(metric) is not None}
            if scored:
                pick = max if metric in LOWER_IS_BETTER else min
                worst = pick(scored, key=lambda v, s=scored: s[v])
                summary["worst"][metric] = {"value": worst, "metric": scored[worst]}
        for metric in GAPS[kind]:
            scored = {v: m[metric] for v, m in values.items() if m.get(metric) is not None}
            if len(scored) >= 2:
                low, high = min(scored.values()), max(scored.values())
                summary["gaps"][metric] = {
                    "difference": high - low,
                    "ratio": _ratio(low, high),
                    "min": min(scored, key=lambda v, s=scored: s[v]),
                    "max": max(scored, key=lambda v, s=scored: s[v]),
                    "criterion": CRITERIA.get(metric, ""),
                }
        if kind == "binary":
            summary["calibration"] = {
                v: {"ece": m.get("ece"), "observed_expected": m.get("observed_expected")} for v, m in values.items()
            }
        out[group] = summary
    return out


def spread(per_site: Mapping[str, Mapping[str, Any]], kind: Kind) -> dict[str, Any]:
    """Across sites (each site's whole split): the worst and the best site for each headline metric."""
    out: dict[str, Any] = {}
    names = {"binary": ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auroc", "brier", "ece")}
    for metric in names.get(kind, WORST[kind]):
        scored = {s: m[metric] for s, m in per_site.items() if m.get(metric) is not None}
        if not scored:
            continue
        lower = metric in LOWER_IS_BETTER
        worst = (max if lower else min)(scored, key=lambda s, d=scored: d[s])
        best = (min if lower else max)(scored, key=lambda s, d=scored: d[s])
        out[metric] = {
            "worst_site": worst,
            "worst": scored[worst],
            "best_site": best,
            "best": scored[best],
            "range": max(scored.values()) - min(scored.values()),
        }
    return out


def clinical_summary(
    replies: Mapping[str, Statistics], declared: Mapping[str, Sequence[str] | None] | None = None
) -> dict[str, Any]:
    """The coordinator's figures from the nodes' statistics: per site, pooled, fairness, spread.

    ``replies`` map a site to its parsed statistics; ``declared`` the values each group can take
    (to list the cells a site did not release as suppressed).
    """
    released = {s: r for s, r in replies.items() if "cells" in r}
    withheld_by = {s: r["withheld"] for s, r in replies.items() if "withheld" in r}
    kinds = {r["kind"] for r in released.values()}
    summary: dict[str, Any] = {"sites": {}, "withheld": withheld_by}
    if len(kinds) != 1:
        if len(kinds) > 1:
            summary["problem"] = f"sites released statistics of different kinds ({sorted(kinds)}); nothing pooled"
        return summary
    kind = next(iter(kinds))
    first = next(iter(released.values()))
    summary.update(
        kind=kind,
        bins=first["bins"],
        threshold=first.get("threshold"),
        min_count=max(r.get("min_count", 0) for r in released.values()),
        noise={s: r.get("noise_std") for s, r in released.items() if r.get("noise_std")},
    )
    groups: dict[str, list[str]] = {}
    for r in released.values():
        for c in r["cells"]:
            if c["group"] != ALL:
                groups.setdefault(c["group"], [])
                if c["value"] not in groups[c["group"]]:
                    groups[c["group"]].append(c["value"])
    for group, values in (declared or {}).items():
        if values is not None:
            seen = groups.get(group, [])
            named = [v for v in values if v in seen or v not in (MISSING, OTHER)]
            groups[group] = named + [v for v in seen if v not in values]
    summary["groups"] = groups
    for site, r in sorted(released.items()):
        cells = {(c["group"], c["value"]): c for c in r["cells"]}
        whole = cells.get((ALL, ALL))
        site_out: dict[str, Any] = {
            "all": cell_metrics(whole, kind) if whole else None,
            "groups": {
                g: {v: cell_metrics(cells[(g, v)], kind) for v in values if (g, v) in cells}
                for g, values in groups.items()
            },
            "noise_std": r.get("noise_std"),
            "suppressed": {g: [v for v in values if (g, v) not in cells] for g, values in groups.items()},
        }
        site_out["fairness"] = fairness(site_out["groups"], kind)
        summary["sites"][site] = site_out
    pooled_all = pool_cells([c for r in released.values() for c in r["cells"] if c["group"] == ALL], kind)
    pooled_groups = {
        g: {
            v: cell_metrics(pooled, kind)
            for v in values
            if (pooled := pool_cells(_cells_of(released.values(), g, v), kind))["n"]
        }
        for g, values in groups.items()
    }
    summary["pooled"] = {
        "all": cell_metrics(pooled_all, kind) if pooled_all["n"] else None,
        "groups": pooled_groups,
        "fairness": fairness(pooled_groups, kind),
        "sites_pooled": sorted(released),
    }
    summary["spread"] = spread({s: v["all"] for s, v in summary["sites"].items() if v["all"]}, kind)
    summary["statistics"] = {s: r for s, r in sorted(released.items())}
    return summary


def _cells_of(replies: Iterable[Statistics], group: str, value: str) -> list[Cell]:
    return [c for r in replies for c in r["cells"] if c["group"] == group and c["value"] == value]
