"""Helpers shared by the dataset loaders: seeded splits, imputation, scaling, CSV reading."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from flowerbed.exception import DataError

MISSING = {"", "?", "na", "nan", "null"}


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
    """A data file's text.

    Raises
    ------
    DataError
        Naming the file when it is missing, not readable, or not text (e.g. a spreadsheet or a
        compressed export), and what to do.
    """
    if not path.is_file():
        raise DataError(f"{path}: data file not found (check the node's data-path)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the data file ({exc.strerror}); check its permissions") from None
    if b"\x00" in raw[:8192]:
        raise DataError(
            f"{path}: not a text file (binary content); export the data as CSV text and point data-path at it"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 text (byte {exc.start}); export the data as CSV in UTF-8 and point data-path at it"
        ) from None


def read_numeric_csv(path: str | Path, label_column: str | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read a CSV with a header row: features (NaN for missing) and the label column.

    Raises
    ------
    DataError
        Naming the file, line and column for a missing file, a ragged row or a non-numeric cell.
    """
    path = Path(path)
    read_text_file(path)  # a missing or binary file is a clear error before any parsing
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: the file is empty (a header row is required)")
        header = [h.strip() for h in header]
        label = label_column or header[-1]
        if label not in header:
            raise DataError(f"{path}: label column {label!r} not in the header ({', '.join(header)})")
        label_pos = header.index(label)
        rows = []
        for line_no, cells in enumerate(reader, start=2):
            if not cells or not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise DataError(
                    f"{path}, line {line_no}: expected {len(header)} columns as in the header, found {len(cells)}"
                )
            row = []
            for name, cell in zip(header, cells, strict=True):
                text = cell.strip()
                if text.lower() in MISSING:
                    row.append(np.nan)
                    continue
                try:
                    row.append(float(text))
                except ValueError:
                    raise DataError(f"{path}, line {line_no}, column {name!r}: {text!r} is not a number") from None
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: the file has a header but no rows")
    table = np.asarray(rows, dtype=np.float64)
    labels = table[:, label_pos]
    if np.isnan(labels).any():
        raise DataError(f"{path}: label column {label!r} has missing values")
    features = np.delete(table, label_pos, axis=1)
    names = [h for i, h in enumerate(header) if i != label_pos]
    return names, features, labels
