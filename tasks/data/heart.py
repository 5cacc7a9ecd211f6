"""The UCI heart-disease federation: four hospitals, one file each (shipped in simulations/data).

Preprocessing, per site and fitted on that site's own training split only:

- ``?`` is missing; ``chol = 0`` and ``trestbps = 0`` are also missing (Switzerland records most
  cholesterol values as 0).
- Numeric columns (age, sex, trestbps, chol, fbs, thalach, exang, oldpeak, ca): missing values are
  replaced by the training split's median, then standardized with the training split's mean and
  standard deviation. A column missing in every training row becomes 0 (the standardized mean).
- Categorical columns (cp, restecg, slope, thal) are one-hot encoded; a missing value is all zeros.
- Label: ``num > 0`` (any disease).
- Split: a stratified 75/25 train/test split per site, seeded by ``data.split_seed``.

Every such step is recorded in ``SiteData.notes`` so a node can say what it did to the data.
"""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path

import numpy as np

from flowerbed.exception import DataError
from flowerbed.tasks.data.tabular import read_text_file, stratified_split
from flowerbed.tasks.task import DataSchema, SiteData

COLUMNS = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
)  # fmt: skip
NUMERIC = ("age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak", "ca")
CATEGORICAL = {"cp": (1, 2, 3, 4), "restecg": (0, 1, 2), "slope": (1, 2, 3), "thal": (3, 6, 7)}
ZERO_MEANS_MISSING = ("chol", "trestbps")
SITES = {
    "cleveland": "processed.cleveland.data",
    "hungarian": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
FEATURE_NAMES = NUMERIC + tuple(f"{c}={v}" for c, values in CATEGORICAL.items() for v in values)
SCHEMA = DataSchema(kind="tabular", input_shape=(len(FEATURE_NAMES),), num_classes=2, feature_names=FEATURE_NAMES)


def bundled_path(site: str) -> Path:
    """Path of a bundled hospital file (``cleveland``, ``hungarian``, ``switzerland``, ``va``)."""
    if site not in SITES:
        raise DataError(f"unknown heart-disease site {site!r}: use one of {', '.join(SITES)}")
    return Path(str(resources.files("flowerbed.tasks.data").joinpath("heart_disease", SITES[site])))


def read_raw(path: str | Path) -> np.ndarray:
    """Parse a UCI ``processed.*.data`` file into a float array with NaN for missing values."""
    path = Path(path)
    rows = []
    for line_no, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        cells = line.strip().split(",")
        if len(cells) != len(COLUMNS):
            raise DataError(
                f"{path}, line {line_no}: expected {len(COLUMNS)} comma-separated columns "
                f"({', '.join(COLUMNS)}), found {len(cells)}"
            )
        row = []
        for name, cell in zip(COLUMNS, cells, strict=True):
            cell = cell.strip()
            if cell == "?":
                row.append(np.nan)
                continue
            try:
                row.append(float(cell))
            except ValueError:
                raise DataError(
                    f"{path}, line {line_no}, column {name!r}: {cell!r} is not a number "
                    "(missing values must be written as '?')"
                ) from None
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return np.asarray(rows, dtype=np.float64)


def preprocess(raw: np.ndarray, site: str, *, split_seed: int, test_fraction: float, source: str = "") -> SiteData:
    """Turn one site's raw rows into standardized train/test arrays (fitted on train only)."""
    col = {name: i for i, name in enumerate(COLUMNS)}
    raw = raw.copy()
    notes: list[str] = []
    for name in ZERO_MEANS_MISSING:
        zeros = raw[:, col[name]] == 0
        if zeros.any():
            raw[zeros, col[name]] = np.nan
            notes.append(f"{name}: {int(zeros.sum())} rows with value 0 treated as missing")
    if np.isnan(raw[:, col["num"]]).any():
        raise DataError(f"{source or site}: the label column 'num' has missing values")
    labels = (raw[:, col["num"]] > 0).astype(np.int64)
    if len(np.unique(labels)) < 2:
        raise DataError(
            f"{source or site}: every row has label {labels[0]} (num > 0); a site needs both classes "
            "to train and evaluate a classifier"
        )
    train_idx, test_idx = stratified_split(labels, test_fraction, split_seed)
    numeric = raw[:, [col[n] for n in NUMERIC]]
    train_numeric = numeric[train_idx]
    medians = np.full(len(NUMERIC), np.nan)
    for j, name in enumerate(NUMERIC):
        present = train_numeric[~np.isnan(train_numeric[:, j]), j]
        missing = int(np.isnan(numeric[:, j]).sum())
        if present.size:
            medians[j] = np.median(present)
            if missing:
                notes.append(f"{name}: {missing} missing values replaced by the train median {medians[j]:g}")
        else:
            notes.append(f"{name}: missing in every training row; set to 0 after standardization")
    filled = np.where(np.isnan(numeric), medians, numeric)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-missing columns: mean of nothing
        mean = np.nan_to_num(np.nanmean(filled[train_idx], axis=0))
        std = np.nan_to_num(np.nanstd(filled[train_idx], axis=0))
    std[std == 0] = 1.0
    scaled = np.nan_to_num((filled - mean) / std)
    onehots = []
    for name, values in CATEGORICAL.items():
        column = raw[:, col[name]]
        missing = int(np.isnan(column).sum())
        if missing:
            notes.append(f"{name}: {missing} missing values encoded as an all-zero one-hot")
        onehots.append(np.stack([(column == v) for v in values], axis=1).astype(np.float64))
    features = np.concatenate([scaled, *onehots], axis=1).astype(np.float32)
    return SiteData(
        name=site,
        x_train=features[train_idx],
        y_train=labels[train_idx],
        x_test=features[test_idx],
        y_test=labels[test_idx],
        schema=SCHEMA,
        notes=notes,
        source=source,
    )


def load_site(path: str | Path, site: str, *, split_seed: int = 0, test_fraction: float = 0.25) -> SiteData:
    """Read and preprocess one hospital's file."""
    raw = read_raw(path)
    return preprocess(raw, site, split_seed=split_seed, test_fraction=test_fraction, source=str(path))


def load_federation(*, split_seed: int = 0, test_fraction: float = 0.25) -> list[SiteData]:
    """All four bundled hospitals, in a fixed order."""
    return [load_site(bundled_path(site), site, split_seed=split_seed, test_fraction=test_fraction) for site in SITES]
