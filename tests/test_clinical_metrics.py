"""Clinical metrics from the nodes' sufficient statistics equal the metrics of the pooled predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as sk

from flowerbed.tasks import clinical

BINS = 20


def _sites(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Logits and labels of three sites of different sizes, prevalence and model quality."""
    rng = np.random.default_rng(seed)
    out = []
    for n, prevalence, signal in ((80, 0.4, 1.5), (55, 0.7, 0.8), (130, 0.2, 2.5)):
        y = (rng.random(n) < prevalence).astype(np.int64)
        margin = signal * (2 * y - 1) + rng.normal(0, 1.2, n)
        out.append((np.stack([-margin / 2, margin / 2], axis=1), y))
    return out


def _node(logits: np.ndarray, y: np.ndarray) -> clinical.Statistics:
    """What a node releases (one cell: the whole split), through the JSON text that travels."""
    cells = clinical.cell_statistics(logits, y, kind="binary", groups={}, threshold=0.5, bins=BINS)
    released = clinical.release("binary", clinical.suppress(cells, 10), split="test", threshold=0.5, bins=BINS,
                                min_count=10)  # fmt: skip
    return clinical.parse_statistics(clinical.to_text(released), "site")


def _exact_ece(p: np.ndarray, y: np.ndarray) -> float:
    bins = clinical.ece_bins(BINS)
    b = np.clip((p * bins).astype(int), 0, bins - 1)
    return sum(abs(y[b == k].sum() - p[b == k].sum()) for k in range(bins)) / len(p)


def test_a_sites_own_figures_are_exact() -> None:
    logits, y = _sites()[0]
    p = clinical.probabilities(logits, "binary")
    m = clinical.cell_metrics(_node(logits, y)["cells"][0], "binary")
    predicted = (p >= 0.5).astype(int)
    assert m["accuracy"] == sk.accuracy_score(y, predicted)
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, predicted))
    assert m["precision"] == pytest.approx(sk.precision_score(y, predicted))
    assert m["sensitivity"] == pytest.approx(sk.recall_score(y, predicted))
    assert m["f1"] == pytest.approx(sk.f1_score(y, predicted))
    tn, fp, fn, tp = sk.confusion_matrix(y, predicted).ravel()
    assert m["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["auroc"] == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)
    assert m["auprc"] == pytest.approx(sk.average_precision_score(y, p), abs=1e-12)
    assert m["brier"] == pytest.approx(sk.brier_score_loss(y, p))
    assert m["ece"] == pytest.approx(_exact_ece(p, y))
    assert m["approximate"] == []


def test_pooled_figures_from_node_statistics_equal_the_pooled_predictions() -> None:
    sites = _sites(1)
    released = {f"site-{i}": _node(logits, y) for i, (logits, y) in enumerate(sites)}
    pooled = clinical.clinical_summary(released)["pooled"]["all"]
    p = np.concatenate([clinical.probabilities(logits, "binary") for logits, _ in sites])
    y = np.concatenate([y for _, y in sites])
    predicted = (p >= 0.5).astype(int)
    # Counts, and every metric of them, exactly.
    tn, fp, fn, tp = sk.confusion_matrix(y, predicted).ravel()
    assert pooled["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert pooled["n"] == len(y)
    assert pooled["accuracy"] == sk.accuracy_score(y, predicted)
    assert pooled["sensitivity"] == sk.recall_score(y, predicted)
    assert pooled["precision"] == sk.precision_score(y, predicted)
    assert pooled["f1"] == pytest.approx(sk.f1_score(y, predicted), abs=1e-15)
    assert pooled["brier"] == pytest.approx(sk.brier_score_loss(y, p), abs=1e-12)
    assert pooled["prevalence"] == y.mean()
    # AUROC and ECE from the histograms: within the bound the summary states.
    assert set(pooled["approximate"]) == {"auroc", "auprc", "ece"}
    assert abs(pooled["auroc"] - sk.roc_auc_score(y, p)) <= pooled["auroc_bound"] + 1e-12
    assert 0 < pooled["auroc_bound"] < 0.05
    assert abs(pooled["ece"] - _exact_ece(p, y)) <= pooled["ece_bound"] + 1e-12
    assert pooled["auprc"] == pytest.approx(sk.average_precision_score(y, p), abs=0.05)


def test_the_auroc_bound_vanishes_when_no_pair_shares_a_bin() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.01, 0.12, 0.33, 0.61, 0.42, 0.97])  # one patient per bin
    value, bound = clinical.auroc_from_histograms(
        np.bincount(clinical.bin_index(p[y == 1], BINS), minlength=BINS),
        np.bincount(clinical.bin_index(p[y == 0], BINS), minlength=BINS),
    )
    assert bound == 0 and value == pytest.approx(sk.roc_auc_score(y, p), abs=1e-15)


def test_multiclass_and_regression_pool_exactly() -> None:
    rng = np.random.default_rng(2)
    parts = [(rng.normal(size=(n, 4)), rng.integers(0, 4, n)) for n in (40, 70)]
    stats = {}
    for i, (logits, y) in enumerate(parts):
        cells = clinical.cell_statistics(logits, y, kind="multiclass", groups={}, threshold=0.5, bins=BINS)
        text = clinical.to_text(clinical.release("multiclass", cells, split="test", threshold=0.5, bins=BINS,
                                                 min_count=10))  # fmt: skip
        stats[f"s{i}"] = clinical.parse_statistics(text, f"s{i}")
    pooled = clinical.clinical_summary(stats)["pooled"]["all"]
    y = np.concatenate([y for _, y in parts])
    predicted = np.concatenate([logits.argmax(1) for logits, _ in parts])
    assert pooled["confusion"] == sk.confusion_matrix(y, predicted, labels=range(4)).tolist()
    assert pooled["accuracy"] == sk.accuracy_score(y, predicted)
    assert pooled["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, predicted))
    assert pooled["f1"] == pytest.approx(sk.f1_score(y, predicted, average="macro"))

    targets = [rng.normal(size=n) for n in (30, 45)]
    guesses = [t + rng.normal(0, 0.5, len(t)) for t in targets]
    cells = [clinical.regression_cell(g, t) for g, t in zip(guesses, targets, strict=True)]
    pooled = clinical.cell_metrics(clinical.pool_cells(cells, "regression"), "regression")
    error = np.concatenate(guesses) - np.concatenate(targets)
    assert pooled["mae"] == pytest.approx(np.abs(error).mean())
    assert pooled["rmse"] == pytest.approx(np.sqrt((error**2).mean()))


def test_small_cells_are_suppressed_and_cannot_be_recovered_by_subtraction() -> None:
    rng = np.random.default_rng(3)
    n = 60
    y = rng.integers(0, 2, n)
    logits = rng.normal(size=(n, 2))
    band = np.array(["a"] * 30 + ["b"] * 24 + ["c"] * 6, dtype=object)  # c is small
    sex = np.array(["f"] * 52 + ["m"] * 8, dtype=object)  # m is small, f is the rest
    cells = clinical.cell_statistics(logits, y, kind="binary", groups={"band": band, "sex": sex}, threshold=0.5,
                                     bins=BINS)  # fmt: skip
    kept = {(c["group"], c["value"]) for c in clinical.suppress(cells, 10)}
    assert ("band", "c") not in kept and ("sex", "m") not in kept
    # Released with the whole split, band b would give c by subtraction (6 < 10): b goes too; a stays.
    assert ("band", "b") not in kept and ("band", "a") in kept
    # f alone would give m by subtraction: the whole group goes.
    assert not any(g == "sex" for g, _ in kept)
    assert clinical.suppress(cells, 61) == [], "a split below the minimum count releases nothing"


def test_a_malformed_reply_is_rejected_with_the_site_named() -> None:
    logits, y = _sites()[0]
    good = json.loads(clinical.to_text(_node(logits, y)))
    good["cells"][0]["tp"] += 1  # counts no longer add up to n
    with pytest.raises(ValueError, match="site cleveland.*adding up to n"):
        clinical.parse_statistics(json.dumps(good), "site cleveland")
    with pytest.raises(ValueError, match="site x: the clinical statistics are not version-1 JSON"):
        clinical.parse_statistics("{", "site x")
