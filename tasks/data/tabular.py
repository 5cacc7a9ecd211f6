"""Helpers shared by the dataset loaders: seeded splits, imputation, scaling, CSV reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flowerbed.tasks.data.intake import DialectOptions, decode_export, read_table


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/test split; every class with 2+ rows has rows on both sides."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        rng.shuffle(idx)
        n_test = round(len(idx) * test_fraction)
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def impute_and_scale(x: np.ndarray, train_idx: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Fill NaN with the train median and standardize with train statistics (train rows only)."""
    notes: list[str] = []
    train = x[train_idx]
    with np.errstate(all="ignore"):
        medians = np.nanmedian(np.where(np.isnan(train), np.nan, train), axis=0) if len(train) else None
    medians = np.nan_to_num(medians) if medians is not None else np.zeros(x.shape[1])
    missing = np.isnan(x)
    if missing.any():
        notes.append(f"{int(missing.sum())} missing values replaced by train medians")
    filled = np.where(missing, medians, x)
    mean = filled[train_idx].mean(axis=0)
    std = filled[train_idx].std(axis=0)
    std[std == 0] = 1.0
    return ((filled - mean) / std).astype(np.float32), notes


def read_text_file(path: Path) -> str:
    """A data file's text (UTF-8 with or without a byte-order mark, UTF-16, Windows-1252).

    Raises
    ------
    DataError
        Naming the file when it is missing, not readable, or not text (e.g. a spreadsheet or a
        compressed export), and what to do.
    """
    return decode_export(Path(path))[0]


def read_numeric_csv(
    path: str | Path, label_column: str | None, options: DialectOptions | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read a CSV with a header row whose columns are all numbers: feature names, features, labels.

    Any dialect ``read_table`` reads (separator, decimal comma, BOM, missing markers); missing
    features are NaN.

    Raises
    ------
    DataError
        Listing every problem with its file, line and column (a ragged row, a non-numeric cell,
        a missing label), or naming the file when it cannot be read.
    """
    table = read_table(path, None, options, label_column=label_column).raise_if_blocking()
    label = table.contract.label.name
    names = [c.name for c in table.contract.features]
    return names, table.values[:, [table.columns.index(n) for n in names]], table.column(label)
