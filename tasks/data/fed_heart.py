"""FLamby's Fed-Heart-Disease benchmark, built from the bundled UCI files with FLamby's preprocessing.

Per hospital file (FLamby, ``flamby.datasets.fed_heart_disease``):

- drop ``slope``, ``ca`` and ``thal``, then every row with a missing value;
- label ``num > 0``;
- one-hot ``cp`` (levels 1-4) and ``restecg`` (0-2), the first level dropped: 13 features, in
  FLamby's order (the eight other columns, then cp=2, cp=3, cp=4, restecg=1, restecg=2);
- ``train_test_split(train_size=0.66, random_state=43, shuffle=True)``, stratified on the label
  when both classes have more than 2 rows: train/test 199/104, 172/89, 30/16 and 85/45 rows;
- z-score with the site's own training mean and (unbiased) standard deviation, plus 1e-9.

The split is the benchmark's, fixed: ``data.test_fraction`` and ``data.split_seed`` do not apply.
The task is FLamby's logistic regression, ``binary-logreg`` (one logit, binary cross-entropy).
"""

from __future__ import annotations

import csv

import numpy as np

from flowerbed.tasks.data import heart
from flowerbed.tasks.task import DataSchema, SiteData

NAME = "fed-heart-disease"
KEPT = ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak")
ONE_HOT = {"cp": (2, 3, 4), "restecg": (1, 2)}  # the first level (cp 1, restecg 0) dropped
FEATURE_NAMES = KEPT + tuple(f"{column}={level}" for column, levels in ONE_HOT.items() for level in levels)
SCHEMA = DataSchema("tabular", (len(FEATURE_NAMES),), 2, FEATURE_NAMES)
TRAIN_FRACTION = 0.66
RANDOM_STATE = 43


def _rows(site: str) -> np.ndarray:
    """The site's file as floats in ``heart.COLUMNS`` order, after FLamby's column and row drops."""
    with open(heart.bundled_path(site), newline="") as handle:
        raw = [[float("nan") if v.strip() == "?" else float(v) for v in row] for row in csv.reader(handle) if row]
    table = np.asarray(raw, dtype=np.float64)
    keep = [heart.COLUMNS.index(c) for c in heart.COLUMNS if c not in ("slope", "ca", "thal")]
    table = table[:, keep]
    return table[~np.isnan(table).any(axis=1)]


def _features(table: np.ndarray) -> np.ndarray:
    """The 13 features of each row, one-hot columns last."""
    columns = [c for c in heart.COLUMNS if c not in ("slope", "ca", "thal")]
    parts = [table[:, [columns.index(c) for c in KEPT]]]
    for column, levels in ONE_HOT.items():
        values = table[:, columns.index(column)]
        parts.append(np.stack([values == level for level in levels], axis=1))
    return np.concatenate(parts, axis=1).astype(np.float32)


def site(name: str) -> SiteData:
    """One hospital of the benchmark, split and standardized as FLamby does."""
    from sklearn.model_selection import train_test_split  # scikit-learn's import takes seconds: only when used

    table = _rows(name)
    x = _features(table)
    y = (table[:, -1] > 0).astype(np.int64)
    levels, counts = np.unique(y, return_counts=True)
    stratify = y if len(levels) > 1 and (counts > 2).all() else None
    train, test = train_test_split(
        np.arange(len(y)),
        test_size=1.0 - TRAIN_FRACTION,
        train_size=TRAIN_FRACTION,
        random_state=RANDOM_STATE,
        shuffle=True,
        stratify=stratify,
    )
    train, test = np.sort(train), np.sort(test)
    mean = x[train].mean(axis=0, dtype=np.float32)
    std = x[train].std(axis=0, ddof=1, dtype=np.float32)
    scaled = ((x - mean) / (std + np.float32(1e-9))).astype(np.float32)
    notes = [
        f"FLamby Fed-Heart-Disease: {len(y)} complete rows (slope, ca, thal dropped), label num > 0",
        f"split train/test {len(train)}/{len(test)} (train_size 0.66, random_state 43"
        f"{', stratified' if stratify is not None else ''}); z-scored with this site's training mean and std",
    ]
    return SiteData(
        name, scaled[train], y[train], scaled[test], y[test], SCHEMA, notes=notes, source=str(heart.bundled_path(name))
    )


def load_federation() -> list[SiteData]:
    """The four hospitals in FLamby's center order: Cleveland, Hungary, Switzerland, VA Long Beach."""
    return [site(name) for name in heart.SITES]
