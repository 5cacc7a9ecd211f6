"""Datasets: the bundled heart-disease federation, scikit-learn's digits and breast-cancer sets,
a user CSV or image set, and user factories (``package.module:attr``).

Two entry points:

- ``load_federation(data, seed)``: every site of a simulated federation (a natural split, or a pooled
  set cut by a partitioner).
- ``load_node_data(data, path, site)``: one hospital's own file, as a deployed node reads it.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

import numpy as np

from flowerbed.exception import ConfigError, DataError
from flowerbed.experiment import DataConfig
from flowerbed.tasks.data import heart as heart_disease
from flowerbed.tasks.data.tabular import impute_and_scale, read_numeric_csv, stratified_split
from flowerbed.tasks.task import DataSchema, SiteData

BUILTIN = ("heart-disease", "digits", "breast-cancer", "csv", "images")


def _pooled_builtin(name: str) -> tuple[np.ndarray, np.ndarray, DataSchema, np.ndarray | None]:
    """Features, labels, schema and (if the set is naturally split) the site of every row."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = (bunch.data / 16.0).reshape(-1, 1, 8, 8).astype(np.float32)
        return x, bunch.target.astype(np.int64), DataSchema("image", (1, 8, 8), 10), None
    if name == "breast-cancer":
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        schema = DataSchema("tabular", (30,), 2, tuple(bunch.feature_names))
        return bunch.data.astype(np.float64), bunch.target.astype(np.int64), schema, None
    raise AssertionError(name)


def _cut(
    x: np.ndarray, y: np.ndarray, schema: DataSchema, parts: list[np.ndarray], data: DataConfig, names: list[str]
) -> list[SiteData]:
    """Split each client's rows into train/test; scale tabular features on the client's train rows."""
    sites = []
    for name, idx in zip(names, parts, strict=True):
        tr, te = stratified_split(y[idx], data.test_fraction, data.split_seed)
        xs, notes = x[idx], []
        if schema.kind == "tabular":
            xs, notes = impute_and_scale(xs.astype(np.float64), tr)
        sites.append(
            SiteData(name, xs[tr].astype(np.float32), y[idx][tr], xs[te].astype(np.float32), y[idx][te], schema, notes)
        )
    return sites


def _partitioned(x: np.ndarray, y: np.ndarray, schema: DataSchema, data: DataConfig, seed: int) -> list[SiteData]:
    from flowerbed.tasks.data.partitioners import partition

    parts = partition(y, data.partition, seed)
    width = len(str(len(parts) - 1))
    return _cut(x, y, schema, parts, data, [f"client-{i:0{width}d}" for i in range(len(parts))])


def _heart(data: DataConfig, seed: int) -> list[SiteData]:
    if data.partition.kind == "natural":
        if data.partition.num_clients != len(heart_disease.SITES):
            raise ConfigError(
                "experiment",
                [
                    f"data.partition.num_clients = {data.partition.num_clients}: the natural heart-disease "
                    f"federation has {len(heart_disease.SITES)} sites (or choose another data.partition.kind)"
                ],
            )
        return heart_disease.load_federation(split_seed=data.split_seed, test_fraction=data.test_fraction)
    sites = heart_disease.load_federation(split_seed=data.split_seed, test_fraction=data.test_fraction)
    x = np.concatenate([np.concatenate([s.x_train, s.x_test]) for s in sites])
    y = np.concatenate([np.concatenate([s.y_train, s.y_test]) for s in sites])
    return _partitioned(x, y, heart_disease.SCHEMA, data, seed)


def _csv(data: DataConfig, seed: int) -> list[SiteData]:
    if not data.path:
        raise ConfigError("experiment", ["data.path is required when data.dataset = 'csv'"])
    names, x, y = read_numeric_csv(data.path, data.label_column)
    y_int = _check_labels(y, data.num_classes, data.path)
    if data.site_column:
        if data.site_column not in names:
            raise ConfigError("experiment", [f"data.site_column = {data.site_column!r} is not a column of {data.path}"])
        pos = names.index(data.site_column)
        site_values = x[:, pos]
        x = np.delete(x, pos, axis=1)
        names = [n for n in names if n != data.site_column]
        schema = DataSchema("tabular", (x.shape[1],), data.num_classes, tuple(names))
        values = np.unique(site_values)
        parts = [np.flatnonzero(site_values == v) for v in values]
        return _cut(x, y_int, schema, parts, data, [f"site-{v:g}" for v in values])
    schema = DataSchema("tabular", (x.shape[1],), data.num_classes, tuple(names))
    return _partitioned(x, y_int, schema, data, seed)


def _check_labels(y: np.ndarray, num_classes: int, source: str) -> np.ndarray:
    if not np.all(np.equal(np.mod(y, 1), 0)) or y.min() < 0 or y.max() >= num_classes:
        raise DataError(
            f"{source}: labels must be integers 0..{num_classes - 1} (data.num_classes = {num_classes}); "
            f"found values {sorted(set(np.unique(y).tolist()))[:10]}"
        )
    return y.astype(np.int64)


def _user_factory(data: DataConfig, seed: int) -> list[SiteData]:
    module_name, _, attr = data.dataset.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError("experiment", [f"data.dataset = {data.dataset!r} cannot be imported: {exc}"]) from None
    sites = factory(data, seed)
    if not sites or not all(isinstance(s, SiteData) for s in sites):
        raise ConfigError("experiment", [f"data.dataset = {data.dataset!r} must return a list of SiteData"])
    return list(sites)


def _load(data: DataConfig, seed: int) -> list[SiteData]:
    if data.dataset == "heart-disease":
        return _heart(data, seed)
    if data.dataset in ("digits", "breast-cancer"):
        x, y, schema, _ = _pooled_builtin(data.dataset)
        return _partitioned(x, y, schema, data, seed)
    if data.dataset == "csv":
        return _csv(data, seed)
    if ":" in data.dataset:
        return _user_factory(data, seed)
    raise ConfigError(
        "experiment",
        [f"data.dataset = {data.dataset!r} is unknown: use one of {', '.join(BUILTIN)} or 'package.module:attr'"],
    )


@functools.lru_cache(maxsize=8)
def _load_cached(data_json: str, seed: int) -> tuple[SiteData, ...]:
    return tuple(_load(DataConfig.model_validate(json.loads(data_json)), seed))


def load_federation(data: DataConfig, seed: int) -> list[SiteData]:
    """Every site of a simulated federation, in a fixed order (cached per process)."""
    return list(_load_cached(json.dumps(data.model_dump(mode="json"), sort_keys=True), seed))


def pooled_test_set(sites: list[SiteData]) -> tuple[np.ndarray, np.ndarray]:
    """All sites' test splits together: the server-side test set of a simulation."""
    return np.concatenate([s.x_test for s in sites]), np.concatenate([s.y_test for s in sites])


def load_node_data(data: DataConfig, path: str | Path, site: str) -> SiteData:
    """One deployed node's own data file, preprocessed as ``data`` describes.

    ``heart-disease`` reads a UCI ``processed.*.data`` file; ``csv`` a CSV with a header and a label
    column; ``images`` an ``.npz`` (arrays ``x``, ``y``) or a folder with one sub-folder of PNG/JPEG
    images per class (``0/``, ``1/``, ...).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"node {site!r}: data-path {str(path)!r} does not exist; set data-path in the node config")
    if data.dataset == "heart-disease":
        return heart_disease.load_site(path, site, split_seed=data.split_seed, test_fraction=data.test_fraction)
    if data.dataset in ("csv", "breast-cancer"):
        names, x, y = read_numeric_csv(path, data.label_column)
        y_int = _check_labels(y, data.num_classes, str(path))
        schema = DataSchema("tabular", (x.shape[1],), data.num_classes, tuple(names))
        site_data = _cut(x, y_int, schema, [np.arange(len(y_int))], data, [site])[0]
    elif data.dataset in ("images", "digits"):
        x, y_int = _read_images(path, data.num_classes)
        schema = DataSchema("image", tuple(x.shape[1:]), data.num_classes)
        site_data = _cut(x, y_int, schema, [np.arange(len(y_int))], data, [site])[0]
    else:
        raise ConfigError("experiment", [f"data.dataset = {data.dataset!r} cannot be read from a node's file"])
    site_data.source = str(path)
    if len(np.unique(site_data.y_train)) < 2:
        raise DataError(f"{path}: every training row has the same label; a site needs at least two classes")
    return site_data


def _read_images(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if path.is_file():
        try:
            with np.load(path) as archive:
                x, y = archive["x"].astype(np.float32), archive["y"]
        except (KeyError, ValueError, OSError) as exc:
            raise DataError(f"{path}: expected an .npz with arrays 'x' and 'y' ({exc})") from None
    else:
        from PIL import Image

        images, labels = [], []
        for label in range(num_classes):
            for file in sorted((path / str(label)).glob("*")):
                if file.suffix.lower() in (".png", ".jpg", ".jpeg"):
                    images.append(np.asarray(Image.open(file).convert("L"), dtype=np.float32) / 255.0)
                    labels.append(label)
        if not images:
            raise DataError(f"{path}: no images found in sub-folders 0..{num_classes - 1}")
        x, y = np.stack(images), np.asarray(labels)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or len(x) != len(y):
        raise DataError(f"{path}: images must be shaped (N, H, W) or (N, C, H, W) with one label each")
    return x, _check_labels(np.asarray(y, dtype=np.float64), num_classes, str(path))


def dataset_schema(data: DataConfig, seed: int = 0) -> DataSchema:
    """Schema of a dataset, without reading a node's data where the dataset is built in."""
    if data.dataset == "heart-disease":
        return heart_disease.SCHEMA
    if data.dataset == "digits":
        return DataSchema("image", (1, 8, 8), 10)
    if data.dataset == "breast-cancer":
        return DataSchema("tabular", (30,), 2)
    return load_federation(data, seed)[0].schema
