"""The UCI heart-disease federation: four hospitals, one file each (shipped in tasks/data/heart_disease).

Preprocessing, per site and fitted on that site's own training split only:

- Every file is read against ``CONTRACT`` (``flowerbed.tasks.data.intake``): columns by name when
  there is a header row, else in the UCI order; empty cells and ``?``, ``NA``, ``NULL``, ... are
  missing; ``chol = 0`` and ``trestbps = 0`` are also missing (Switzerland records most cholesterol
  values as 0).
- Numeric columns (age, sex, trestbps, chol, fbs, thalach, exang, oldpeak, ca): missing values are
  replaced by the training split's median, then standardized with the training split's mean and
  standard deviation. A column missing in every training row becomes 0 (the standardized mean).
- Categorical columns (cp, restecg, slope, thal) are one-hot encoded; a missing value is all zeros.
- Label: ``num > 0`` (any disease).
- Split: a stratified 75/25 train/test split per site, seeded by ``data.split_seed``.

Every such step is recorded in ``SiteData.notes`` so a node can say what it did to the data. The
raw feature columns (before imputation and scaling) stay with each split as ``groups_train`` and
``groups_test``: the node evaluates subgroups (sex, age bands) by them.
"""

from __future__ import annotations

import warnings
from importlib import resources
from pathlib import Path

import numpy as np

from flowerbed.exception import DataError
from flowerbed.tasks.data.contract import DataContract
from flowerbed.tasks.data.intake import DialectOptions, read_table
from flowerbed.tasks.data.tabular import stratified_split
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
_NO_YES = {0: "no", 1: "yes"}

#: The federation's data contract for the UCI heart-disease columns (meanings from the data set's
#: documentation; "valid" bounds what can be right at all, "plausible" what is usual in adults).
CONTRACT = DataContract.model_validate(
    {
        "name": "heart-disease",
        "version": 1,
        "description": "UCI Heart Disease (Janosi, Steinbrunn, Pfisterer, Detrano 1988), 14 processed columns",
        "columns": [
            {"name": "age", "kind": "numeric", "unit": "years", "valid": (0, 120), "plausible": (18, 100),
             "description": "age"},
            {"name": "sex", "kind": "binary", "levels": {0: "female", 1: "male"}, "aliases": ("gender",),
             "description": "sex"},
            {"name": "cp", "kind": "categorical", "description": "chest pain type",
             "levels": {1: "typical angina", 2: "atypical angina", 3: "non-anginal pain", 4: "asymptomatic"},
             "aliases": ("chest_pain", "chest_pain_type")},
            {"name": "trestbps", "kind": "numeric", "unit": "mm Hg", "valid": (0, 300), "plausible": (80, 220),
             "zero_means_missing": True, "description": "resting blood pressure on admission",
             "aliases": ("resting_bp", "resting_blood_pressure")},
            {"name": "chol", "kind": "numeric", "unit": "mg/dl", "valid": (0, 1500), "plausible": (100, 600),
             "zero_means_missing": True, "description": "serum cholesterol",
             "aliases": ("cholesterol", "serum_cholesterol")},
            {"name": "fbs", "kind": "binary", "levels": _NO_YES, "description": "fasting blood sugar > 120 mg/dl",
             "aliases": ("fasting_blood_sugar",)},
            {"name": "restecg", "kind": "categorical", "description": "resting electrocardiographic results",
             "levels": {0: "normal", 1: "ST-T wave abnormality", 2: "left ventricular hypertrophy"},
             "aliases": ("resting_ecg",)},
            {"name": "thalach", "kind": "numeric", "unit": "bpm", "valid": (0, 300), "plausible": (60, 220),
             "description": "maximum heart rate achieved", "aliases": ("max_heart_rate", "max_hr")},
            {"name": "exang", "kind": "binary", "levels": _NO_YES, "description": "exercise induced angina",
             "aliases": ("exercise_angina",)},
            {"name": "oldpeak", "kind": "numeric", "unit": "mm", "valid": (-10, 10), "plausible": (-3, 7),
             "description": "ST depression induced by exercise relative to rest", "aliases": ("st_depression",)},
            {"name": "slope", "kind": "categorical", "description": "slope of the peak exercise ST segment",
             "levels": {1: "upsloping", 2: "flat", 3: "downsloping"}, "aliases": ("st_slope",)},
            {"name": "ca", "kind": "numeric", "unit": "vessels", "valid": (0, 3), "plausible": (0, 3),
             "description": "major vessels coloured by fluoroscopy", "aliases": ("major_vessels",)},
            {"name": "thal", "kind": "categorical", "description": "thallium scintigraphy",
             "levels": {3: "normal", 6: "fixed defect", 7: "reversible defect"}, "aliases": ("thallium",)},
            {"name": "num", "kind": "label", "aliases": ("diagnosis",),
             "description": "angiographic disease status: 0 < 50 % diameter narrowing, 1-4 more (class: num > 0)",
             "levels": {0: "< 50 % narrowing", 1: "> 50 % narrowing", 2: "> 50 % narrowing",
                        3: "> 50 % narrowing", 4: "> 50 % narrowing"}},
            {"name": "patient_id", "kind": "identifier", "description": "the hospital's patient identifier",
             "aliases": ("id", "mrn", "record_id", "patient_number", "patient")},
            {"name": "name", "kind": "identifier", "description": "the patient's name",
             "aliases": ("patient_name", "full_name")},
            {"name": "notes", "kind": "text", "description": "free-text notes",
             "aliases": ("note", "comment", "comments", "remarks")},
        ],
        "ignore": ("*_id", "id_*", "*name*", "*note*", "*comment*", "*date*", "dob", "mrn*", "*address*",
                   "*phone*", "*email*", "zip*", "postcode*", "ssn*", "insurance*"),
        "min_train_rows": 20,
        "min_test_rows": 10,
    }
)  # fmt: skip


def bundled_path(site: str) -> Path:
    """Path of a bundled hospital file (``cleveland``, ``hungarian``, ``switzerland``, ``va``)."""
    if site not in SITES:
        raise DataError(f"unknown heart-disease site {site!r}: use one of {', '.join(SITES)}")
    return Path(str(resources.files("flowerbed.tasks.data").joinpath("heart_disease", SITES[site])))


def read_raw(path: str | Path, options: DialectOptions | None = None) -> np.ndarray:
    """Read one site's export into a float array in ``COLUMNS`` order, NaN where a value is missing.

    Any export ``read_table`` reads against ``CONTRACT``: the UCI ``processed.*.data`` files, and
    CSVs with a header (columns in any order), other separators, decimal commas or missing markers.

    Raises
    ------
    DataError
        Listing every problem with its file, line and column.
    """
    return read_table(path, CONTRACT, options).raise_if_blocking().values


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
    raw_columns = {name: raw[:, col[name]] for name in COLUMNS if name != "num"}  # subgroups: before preprocessing
    return SiteData(
        name=site,
        x_train=features[train_idx],
        y_train=labels[train_idx],
        x_test=features[test_idx],
        y_test=labels[test_idx],
        schema=SCHEMA,
        notes=notes,
        source=source,
        groups_train={name: values[train_idx] for name, values in raw_columns.items()},
        groups_test={name: values[test_idx] for name, values in raw_columns.items()},
    )


def load_site(
    path: str | Path,
    site: str,
    *,
    split_seed: int = 0,
    test_fraction: float = 0.25,
    options: DialectOptions | None = None,
) -> SiteData:
    """Read and preprocess one hospital's file."""
    raw = read_raw(path, options)
    return preprocess(raw, site, split_seed=split_seed, test_fraction=test_fraction, source=str(path))


def load_federation(*, split_seed: int = 0, test_fraction: float = 0.25) -> list[SiteData]:
    """All four bundled hospitals, in a fixed order."""
    return [load_site(bundled_path(site), site, split_seed=split_seed, test_fraction=test_fraction) for site in SITES]
