"""Datasets: the bundled heart-disease federation, scikit-learn's digits and breast-cancer sets,
a user CSV or image set, and user factories (``package.module:attr``).

Two entry points:

- ``load_federation(data, seed)``: every site of a simulated federation (a natural split, or a pooled
  set cut by a partitioner).
- ``load_node_data(data, path, site)``: one hospital's own file, as a deployed node reads it,
  against the federation's data contract (``resolve_contract``) when it has one.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

import numpy as np

from flowerbed.exception import ConfigError, DataError
from flowerbed.experiment import DataConfig
from flowerbed.tasks.data import fed_heart
from flowerbed.tasks.data import heart as heart_disease
from flowerbed.tasks.data.contract import DataContract, load_contract, parse_contract
from flowerbed.tasks.data.intake import DialectOptions, Table, read_table
from flowerbed.tasks.data.tabular import impute_and_scale, read_numeric_csv, stratified_split
from flowerbed.tasks.task import DataSchema, SiteData

BUILTIN = ("heart-disease", "fed-heart-disease", "digits", "breast-cancer", "csv", "images")
#: Built-in data contracts by name; a dataset of the same name reads its files against it.
CONTRACTS: dict[str, DataContract] = {"heart-disease": heart_disease.CONTRACT}
#: Datasets a node reads from a table (a CSV-like export).
TABULAR = ("heart-disease", "csv", "breast-cancer")


def named_contract(value: str, base_dir: Path) -> DataContract:
    """A contract named by a federation file: a built-in name, or a ``.toml``/``.json`` file (relative to ``base_dir``).

    Raises
    ------
    ConfigError
        Neither a built-in name nor a readable, valid contract file.
    """
    if value in CONTRACTS:
        return CONTRACTS[value]
    return load_contract(base_dir / value)


def resolve_contract(data: DataConfig) -> DataContract | None:
    """The run's data contract: ``data.contract`` (a built-in name or a table), else the dataset's own.

    Raises
    ------
    ConfigError
        An unknown name, an invalid table, or a heart-disease run with another contract than its own.
    """
    if data.contract is None:
        return CONTRACTS.get(data.dataset)
    if isinstance(data.contract, str):
        if data.contract not in CONTRACTS:
            raise ConfigError(
                "experiment",
                [f"data.contract = {data.contract!r} is not a built-in contract ({', '.join(CONTRACTS)}); "
                 "give the contract itself as a table ([data.contract] with [[data.contract.columns]])"],
            )  # fmt: skip
        contract = CONTRACTS[data.contract]
    else:
        contract = parse_contract(data.contract, "experiment: data.contract")
    own = CONTRACTS.get(data.dataset)
    if own is not None and contract.fingerprint != own.fingerprint:
        raise ConfigError(
            "experiment",
            [f"data.contract is {contract.ref}, but data.dataset = {data.dataset!r} reads its files as {own.ref}"],
        )
    if data.dataset == "csv" and len(contract.label.codes) not in (0, data.num_classes):
        raise ConfigError(
            "experiment",
            [f"data.contract's label {contract.label.name!r} has {len(contract.label.codes)} values, "
             f"but data.num_classes = {data.num_classes}"],
        )  # fmt: skip
    return contract


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

    parts = partition(y, data.partition, seed, target=schema.target)
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
    contract = resolve_contract(data)
    if contract is not None:
        return _csv_by_contract(data, contract, seed)
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


def _csv_by_contract(data: DataConfig, contract: DataContract, seed: int) -> list[SiteData]:
    """A pooled CSV read against the contract: one site per value of the site column, or cut by a partitioner."""
    assert data.path is not None
    keep = (data.site_column,) if data.site_column else ()
    table = read_table(data.path, contract, keep=keep).raise_if_blocking()
    if data.site_column and data.site_column not in table.kept:
        raise ConfigError("experiment", [f"data.site_column = {data.site_column!r} is not a column of {data.path}"])
    if not data.site_column:
        plain, onehot, y = _contract_arrays(table, data, np.arange(len(table.values)))
        return _partitioned(np.concatenate([plain, onehot], axis=1), y, contract.schema(data.num_classes), data, seed)
    site_values = table.kept[data.site_column]
    return [
        _contract_site(table, data, f"site-{v:g}", np.flatnonzero(site_values == v)) for v in np.unique(site_values)
    ]


def _contract_arrays(table: Table, data: DataConfig, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numeric and binary columns (NaN where missing), categorical columns one-hot, and the classes."""
    contract = table.contract
    values = table.values[rows]
    label = values[:, table.columns.index(contract.label.name)]
    classes = {float(code): i for i, code in enumerate(contract.label.codes)}
    y = np.array([classes.get(v, np.nan) for v in label]) if classes else label
    y = _check_labels(np.asarray(y, dtype=np.float64), data.num_classes, str(table.path))
    plain = [c for c in contract.features if c.kind != "categorical"]
    x = values[:, [table.columns.index(c.name) for c in plain]].copy()
    for j, column in enumerate(plain):
        if column.zero_means_missing:
            x[x[:, j] == 0, j] = np.nan
    onehots = [
        np.stack([values[:, table.columns.index(c.name)] == float(code) for code in c.codes], axis=1)
        for c in contract.features
        if c.kind == "categorical"
    ]
    onehot = np.concatenate(onehots, axis=1).astype(np.float64) if onehots else np.zeros((len(y), 0))
    return x, onehot, y


def _contract_site(table: Table, data: DataConfig, name: str, rows: np.ndarray) -> SiteData:
    """Rows of a table read against a contract, preprocessed on their own training split.

    Numeric and binary columns: a 0 the contract reads as missing is missing; missing values take
    the training split's median, then the columns are standardized with the training split's mean
    and deviation. Categorical columns are one-hot (missing: all zeros). The label's class is the
    position of its value among the contract's label values.
    """
    plain, onehot, y = _contract_arrays(table, data, rows)
    train, test = stratified_split(y, data.test_fraction, data.split_seed)
    scaled, notes = impute_and_scale(plain, train) if plain.shape[1] else (plain, [])
    features = np.concatenate([scaled, onehot], axis=1).astype(np.float32)
    schema = table.contract.schema(data.num_classes)
    raw = {c.name: table.values[rows, table.columns.index(c.name)] for c in table.contract.features}  # subgroups
    site = SiteData(name, features[train], y[train], features[test], y[test], schema, notes, str(table.path))
    site.groups_train = {k: v[train] for k, v in raw.items()}
    site.groups_test = {k: v[test] for k, v in raw.items()}
    return site


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
    from flowerbed.tasks.data.partitioners import check_partition_target

    for target in sorted({s.schema.target for s in sites}):
        check_partition_target(data.partition.kind, target, f"data.dataset = {data.dataset!r}")
    return list(sites)


def _load(data: DataConfig, seed: int) -> list[SiteData]:
    if data.dataset == "heart-disease":
        return _heart(data, seed)
    if data.dataset == fed_heart.NAME:
        if data.partition.kind != "natural":
            raise ConfigError(
                "experiment",
                [f"data.dataset = {fed_heart.NAME!r} is FLamby's four hospitals as they are: use data.partition.kind "
                 "= 'natural' (or heart-disease for other splits)"],
            )  # fmt: skip
        return fed_heart.load_federation()
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


def load_node_data(
    data: DataConfig,
    path: str | Path,
    site: str,
    options: DialectOptions | None = None,
    contract: DataContract | None = None,
) -> SiteData:
    """One deployed node's own data file, preprocessed as ``data`` describes.

    ``heart-disease`` reads a UCI ``processed.*.data`` file or any export of its columns; ``csv`` a
    CSV against the run's contract (or, without one, with a header and a label column);
    ``images`` an ``.npz`` (arrays ``x``, ``y``) or a folder with one sub-folder of PNG/JPEG images
    per class (``0/``, ``1/``, ...). ``options`` sets the CSV dialect; ``contract`` replaces the
    run's (a node's own copy of the federation's).

    Raises
    ------
    DataError
        The file is missing or unreadable, or does not fit the contract (every problem listed).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"node {site!r}: data-path {str(path)!r} does not exist; set data-path in the node config")
    if data.dataset in TABULAR:
        site_data = site_from_table(data, read_node_table(data, path, options, contract).raise_if_blocking(), site)
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


def read_node_table(
    data: DataConfig, path: str | Path, options: DialectOptions | None = None, contract: DataContract | None = None
) -> Table:
    """A node's export read against ``contract`` (default: the run's), every problem collected."""
    contract = contract if contract is not None else resolve_contract(data)
    return read_table(path, contract, options, label_column=data.label_column)


def site_from_table(data: DataConfig, table: Table, site: str) -> SiteData:
    """A node's site data from its table (read without blocking problems), split and preprocessed.

    Raises
    ------
    DataError
        The rows cannot make a site (e.g. a single class).
    """
    if data.dataset == "heart-disease":
        return heart_disease.preprocess(
            table.values, site, split_seed=data.split_seed, test_fraction=data.test_fraction, source=str(table.path)
        )
    if table.contract.name != "undeclared":
        return _contract_site(table, data, site, np.arange(len(table.values)))
    features = [c.name for c in table.contract.features]
    x = table.values[:, [table.columns.index(n) for n in features]]
    y_int = _check_labels(table.column(table.contract.label.name), data.num_classes, str(table.path))
    schema = DataSchema("tabular", (x.shape[1],), data.num_classes, tuple(features))
    return _cut(x, y_int, schema, [np.arange(len(y_int))], data, [site])[0]


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
    if data.dataset == fed_heart.NAME:
        return fed_heart.SCHEMA
    if data.dataset == "digits":
        return DataSchema("image", (1, 8, 8), 10)
    if data.dataset == "breast-cancer":
        return DataSchema("tabular", (30,), 2)
    if data.dataset == "csv" and data.contract is not None:
        contract = resolve_contract(data)
        assert contract is not None
        return contract.schema(data.num_classes)
    return load_federation(data, seed)[0].schema
