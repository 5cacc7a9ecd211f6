"""Split one pooled dataset into virtual clients.

Every partitioner returns one array of sample indices per client. Together the arrays hold every
index of the dataset exactly once, the same seed always gives the same split, and every client
holds at least ``min_samples`` samples.

Kinds (``data.partition.kind``):

- ``natural``: one client per value of a group column (a hospital, a site), in sorted order.
- ``iid``: a uniform random split into clients of (almost) equal size.
- ``dirichlet``: label skew; each class is spread over the clients with proportions drawn from
  ``Dirichlet(alpha)``. Small ``alpha`` (0.1) gives clients dominated by one or two classes,
  large ``alpha`` (100) approaches IID.
- ``pathological``: every client holds exactly ``classes_per_client`` classes.
- ``quantity``: quantity skew; client ``i`` (0-based) holds a share proportional to
  ``(i + 1) ** -power`` of the samples, labels drawn IID.

``dirichlet`` and ``pathological`` split by class label and need class targets
(``DataSchema.target = "class"``); ``natural``, ``iid`` and ``quantity`` split rows and take any
target, one value or several columns per row. ``label_skew`` measures how far the clients' label
distributions are from the pooled one (class labels only).
"""

from __future__ import annotations

import numpy as np

from flowerbed.exception import ConfigError
from flowerbed.experiment import PartitionConfig

__all__ = [
    "LABEL_KINDS",
    "check_partition_target",
    "class_ids",
    "is_class_labels",
    "label_histograms",
    "label_skew",
    "natural_names",
    "partition",
]

_KEY = "data.partition"
#: Partition kinds that split by class label (the others split rows and take any target).
LABEL_KINDS = ("dirichlet", "pathological")


def check_partition_target(kind: str, target: str, owner: str, source: str = "experiment") -> None:
    """Refuse a label-skew partition of targets that are not class labels.

    Parameters
    ----------
    kind : str
        ``data.partition.kind``.
    target : str
        ``DataSchema.target`` of the data: ``"class"`` or ``"values"``.
    owner : str
        Whose targets, for the message (``"task 'survival:task' (data.dataset = 'survival:hospitals')"``).
    source : str (default: "experiment")
        Named in the error (the experiment file).

    Raises
    ------
    ConfigError
        ``kind`` is ``dirichlet`` or ``pathological`` and ``target`` is not ``"class"``.
    """
    if kind in LABEL_KINDS and target != "class":
        raise ConfigError(
            source,
            [
                f"{_KEY}.kind = {kind!r} splits by class label, but the targets of {owner} are "
                f"{target} (DataSchema.target = {target!r}), not class labels; use iid, quantity or natural"
            ],
        )


def is_class_labels(labels: np.ndarray) -> bool:
    """Whether ``labels`` can be class labels: one integer (or text) value per row, not floats with fractions."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        return False
    if labels.dtype.kind == "f":
        return bool(np.all(np.isfinite(labels)) and np.all(np.mod(labels, 1) == 0))
    return labels.dtype.kind in "biuUSO"


def partition(
    labels: np.ndarray,
    config: PartitionConfig,
    seed: int,
    groups: np.ndarray | None = None,
    *,
    min_samples: int | None = None,
    source: str = "experiment",
    target: str = "class",
) -> list[np.ndarray]:
    """Split sample indices into one sorted index array per client.

    Parameters
    ----------
    labels : np.ndarray
        The targets, one row per sample: class labels of shape ``(n,)`` (any dtype ``np.unique``
        can sort) for ``dirichlet`` and ``pathological``; any shape ``(n, ...)`` for the others,
        which look only at the number of rows.
    config : PartitionConfig
        ``data.partition`` of the experiment: ``kind``, ``num_clients``, ``alpha``,
        ``classes_per_client``, ``power``.
    seed : int
        Seeds a ``numpy.random.Generator``; the same seed gives the same partition.
    groups : np.ndarray or None (default: None)
        One group (site) value per sample; required for ``kind = "natural"``, which makes one client
        per distinct value and ignores ``num_clients``.
    min_samples : int or None (default: None)
        The fewest samples any client may hold; ``None`` reads ``config.min_samples`` (1 if the
        schema has no such key). Label-skewed splits that leave a client short are repaired by
        moving random samples from the largest clients.
    source : str (default: "experiment")
        Named in errors (the experiment file).
    target : str (default: "class")
        ``DataSchema.target`` of the data; ``"values"`` refuses the label-skew kinds.

    Returns
    -------
    list[np.ndarray]
        Client ``c``'s sample indices (``int64``, ascending) at position ``c``.

    Raises
    ------
    ConfigError
        More clients (times ``min_samples``) than samples, a natural partition without groups,
        more classes per client than the dataset has, or a label-skew kind on targets that are
        not class labels.
    """
    labels = np.asarray(labels)
    if labels.ndim == 0:
        raise ConfigError(source, [f"the targets must have one row per sample, got a scalar ({labels!r})"])
    check_partition_target(config.kind, target, "the dataset", source)
    if config.kind in LABEL_KINDS and not is_class_labels(labels):
        shape = "x".join(str(d) for d in labels.shape)
        raise ConfigError(
            source,
            [
                f"{_KEY}.kind = {config.kind!r} splits by class label, but the targets are not class "
                f"labels ({labels.dtype} array of shape {shape}; one integer per row needed); "
                "use iid, quantity or natural, and set DataSchema(target='values') for such targets"
            ],
        )
    n = labels.shape[0]
    floor = _min_samples(config, min_samples)
    rng = np.random.default_rng(seed)

    if config.kind == "natural":
        if groups is None:
            raise ConfigError(
                source,
                [
                    f"{_KEY}.kind = 'natural' needs a site column (data.site_column, CSV data); "
                    "for a pooled dataset choose iid, dirichlet, pathological or quantity"
                ],
            )
        return _natural(np.asarray(groups), n, source)

    num_clients = config.num_clients
    if num_clients * floor > n:
        raise ConfigError(
            source,
            [
                f"{_KEY}.num_clients = {num_clients} needs at least {num_clients * floor} samples "
                f"({floor} per client) but the dataset has {n}; use at most {n // floor} clients"
            ],
        )
    if config.kind == "iid":
        parts = _iid(n, num_clients, rng)
    elif config.kind == "dirichlet":
        parts = _dirichlet(labels, num_clients, config.alpha, rng)
    elif config.kind == "pathological":
        parts = _pathological(labels, num_clients, config.classes_per_client, rng, source)
    elif config.kind == "quantity":
        parts = _quantity(n, num_clients, config.power, floor, rng)
    else:  # the schema's Literal makes this unreachable from a validated experiment
        raise ConfigError(source, [f"{_KEY}.kind = {config.kind!r} is not a known partitioner"])
    parts = _ensure_min(parts, floor, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def natural_names(groups: np.ndarray) -> list[str]:
    """Client names of a natural partition, in the order ``partition`` returns the clients."""
    return [str(g) for g in np.unique(np.asarray(groups))]


def class_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(classes, ids)``: the sorted distinct labels and each sample's class index."""
    labels = _one_label_per_row(labels)
    classes, ids = np.unique(labels, return_inverse=True)
    return classes, ids.reshape(-1)


def label_histograms(labels: np.ndarray, parts: list[np.ndarray], classes: np.ndarray | None = None) -> np.ndarray:
    """Count each class in each client: an ``int64`` array of shape ``(clients, classes)``.

    Parameters
    ----------
    labels : np.ndarray
        The pooled labels, shape ``(n,)``.
    parts : list[np.ndarray]
        One index array per client, as ``partition`` returns.
    classes : np.ndarray or None (default: None)
        The column order; defaults to the sorted distinct labels.

    Raises
    ------
    ValueError
        ``labels`` is not one value per sample (multi-column targets have no histogram).
    """
    labels = _one_label_per_row(labels)
    if classes is None:
        classes = np.unique(labels)
    hist = np.zeros((len(parts), len(classes)), dtype=np.int64)
    for c, idx in enumerate(parts):
        pos = np.searchsorted(classes, labels[idx])
        hist[c] = np.bincount(pos, minlength=len(classes))
    return hist


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the pooled one.

    0 means every client sees the pooled class mix; values near 1 mean clients hold classes that
    are rare overall. Empty clients are skipped.
    """
    hist = label_histograms(labels, parts).astype(np.float64)
    sizes = hist.sum(axis=1)
    hist = hist[sizes > 0] / sizes[sizes > 0, None]
    pooled = np.bincount(class_ids(labels)[1]).astype(np.float64)
    pooled /= pooled.sum()
    if hist.shape[0] == 0:
        return 0.0
    return float(np.mean(0.5 * np.abs(hist - pooled).sum(axis=1)))


def _one_label_per_row(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(
            f"label histograms need one class label per sample, got targets of shape {labels.shape}; "
            "targets with several columns (DataSchema.target = 'values') have sizes only"
        )
    return labels


def _min_samples(config: PartitionConfig, override: int | None) -> int:
    value = override if override is not None else getattr(config, "min_samples", 1)
    if value is None or value < 1:
        return 1
    return int(value)


def _natural(groups: np.ndarray, n: int, source: str) -> list[np.ndarray]:
    if groups.shape != (n,):
        raise ConfigError(
            source,
            [f"the site column has {groups.shape[0]} values for {n} samples; give one per sample"],
        )
    _, ids = np.unique(groups, return_inverse=True)
    ids = ids.reshape(-1)
    order = np.argsort(ids, kind="stable")
    bounds = np.cumsum(np.bincount(ids))[:-1]
    return [np.sort(p).astype(np.int64) for p in np.split(order, bounds)]


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(n), num_clients))


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    _, ids = class_ids(labels)
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k in range(int(ids.max()) + 1 if ids.size else 0):
        members = rng.permutation(np.flatnonzero(ids == k))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        counts = _largest_remainder(shares, members.size)
        for c, piece in enumerate(np.split(members, np.cumsum(counts)[:-1])):
            chunks[c].append(piece)
    return [np.concatenate(c) if c else np.empty(0, np.int64) for c in chunks]


def _pathological(
    labels: np.ndarray, num_clients: int, k: int, rng: np.random.Generator, source: str
) -> list[np.ndarray]:
    classes, ids = class_ids(labels)
    num_classes = len(classes)
    if k > num_classes:
        raise ConfigError(
            source,
            [
                f"{_KEY}.classes_per_client = {k} is more than the {num_classes} classes in the "
                f"dataset; use at most {num_classes}"
            ],
        )
    if num_clients * k < num_classes:
        raise ConfigError(
            source,
            [
                f"{_KEY}.classes_per_client = {k} with {num_clients} clients covers only "
                f"{num_clients * k} of {num_classes} classes, so samples would be left out; use "
                f"classes_per_client >= {-(-num_classes // num_clients)} or more clients"
            ],
        )
    # Deal classes round-robin over a shuffled class order: each client gets k distinct classes and
    # every class goes to at least one client.
    order = rng.permutation(num_classes)
    holders: list[list[int]] = [[] for _ in range(num_classes)]
    for c in range(num_clients):
        for j in range(k):
            holders[order[(c * k + j) % num_classes]].append(c)
    chunks: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in range(num_classes):
        members = rng.permutation(np.flatnonzero(ids == cls))
        for c, piece in zip(holders[cls], np.array_split(members, len(holders[cls])), strict=True):
            chunks[c].append(piece)
    return [np.concatenate(c) for c in chunks]


def _quantity(n: int, num_clients: int, power: float, floor: int, rng: np.random.Generator) -> list[np.ndarray]:
    weights = np.arange(1, num_clients + 1, dtype=np.float64) ** -power
    counts = floor + _largest_remainder(weights / weights.sum(), n - floor * num_clients)
    return list(np.split(rng.permutation(n), np.cumsum(counts)[:-1]))


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to ``shares`` that add up to exactly ``total``."""
    raw = shares / shares.sum() * total
    counts = np.floor(raw).astype(np.int64)
    missing = total - int(counts.sum())
    if missing > 0:
        counts[np.argsort(-(raw - counts), kind="stable")[:missing]] += 1
    elif missing < 0:  # float round-off pushed the floors past the total
        counts[np.argmax(counts)] += missing
    return counts


def _ensure_min(parts: list[np.ndarray], floor: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random samples from the largest clients to those holding fewer than ``floor``."""
    sizes = np.array([p.size for p in parts])
    if sizes.min(initial=floor) >= floor:
        return parts
    parts = [rng.permutation(p) for p in parts]
    for c in np.flatnonzero(sizes < floor):
        need = floor - parts[c].size
        while need > 0:
            donor = int(np.argmax([p.size for p in parts]))
            take = min(need, parts[donor].size - floor)
            parts[c] = np.concatenate([parts[c], parts[donor][:take]])
            parts[donor] = parts[donor][take:]
            need -= take
    return parts
