"""Training replies of many nodes as columns: checked and averaged once per array, not once per reply.

The inline backend answers a round's virtual nodes as one cohort. Instead of a Flower ``Message``
per node, it hands the coordinator a ``ReplyBlock``: the nodes' sites, their new weights stacked
along a first axis, and their metrics as columns. The coordinator checks every row with the same
rules as ``validate_train_reply`` (keys, shapes and dtypes once per array; finiteness, the weight's
bounds and the update's norm per row, vectorized) and names the site of any row it rejects. A
strategy that aggregates by a weighted mean of ``num-examples`` then gets one equivalent reply per
block (the block's weighted mean, its total weight), which averages to the same result as the
block's rows would one by one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from flowerbed.in_memory_arrays import in_memory_record
from flowerbed.strategies.registry import weighted_mean_classes

WEIGHT_KEY = "num-examples"


@dataclass(frozen=True)
class ReplyBlock:
    """Training replies of ``len(sites)`` nodes, row ``i`` being site ``sites[i]``'s.

    Parameters
    ----------
    sites : list[str]
        The replying sites, one per row.
    arrays : dict[str, np.ndarray]
        Each parameter's new values, stacked: ``arrays[key][i]`` is row ``i``'s.
    metrics : dict[str, list[int | float]]
        The reply metrics as columns (``num-examples`` among them), as each node released them.
    """

    sites: list[str]
    arrays: dict[str, np.ndarray]
    metrics: dict[str, list[int | float]]

    def __len__(self) -> int:
        return len(self.sites)

    @property
    def weights(self) -> np.ndarray:
        """Every row's ``num-examples`` as float64 (non-numbers come out NaN, which no check admits)."""
        return np.array([_number(v) for v in self.metrics[WEIGHT_KEY]], dtype=np.float64)

    def take(self, rows: np.ndarray) -> ReplyBlock:
        """The block of the given rows only (indices, in order)."""
        picked = [int(i) for i in rows]
        return ReplyBlock(
            [self.sites[i] for i in picked],
            {key: values[rows] for key, values in self.arrays.items()},
            {key: [column[i] for i in picked] for key, column in self.metrics.items()},
        )

    def row_metrics(self) -> Iterator[tuple[str, dict[str, int | float]]]:
        """Each site and its metrics, as its own reply would carry them."""
        keys = list(self.metrics)
        for i, site in enumerate(self.sites):
            yield site, {key: self.metrics[key][i] for key in keys}

    def factors(self) -> list[float]:
        """Each row's share of the total weight, computed as Flower's ``aggregate_arrayrecords`` does."""
        weights = [float(w) for w in self.metrics[WEIGHT_KEY]]
        total = sum(weights)
        return [w / total for w in weights]

    def mean_arrays(self, chunk: int = 1 << 22) -> dict[str, np.ndarray]:
        """The rows' mean weighted by ``num-examples``, with Flower's FedAvg arithmetic.

        Each row times its factor in the array's own dtype, summed row after row (a reduction along
        the first axis adds rows in order): the same values, bit for bit, as Flower's
        ``aggregate_arrayrecords`` over the rows as replies in this order. Columns go ``chunk``
        values of the stack at a time.
        """
        factors = np.array(self.factors(), dtype=np.float64)
        m = len(self)
        out: dict[str, np.ndarray] = {}
        for key, values in self.arrays.items():
            flat = values.reshape(m, -1)
            scale = factors.astype(values.dtype) if values.dtype.kind == "f" else factors
            step = max(1, chunk // max(m, 1))
            parts = [
                np.add.reduce(flat[:, i : i + step] * scale[:, None], axis=0) for i in range(0, flat.shape[1], step)
            ]
            mean = np.concatenate(parts) if parts else np.zeros(0, dtype=values.dtype)
            out[key] = mean.reshape(values.shape[1:])
        return out

    def sorted_by_site(self) -> ReplyBlock:
        """The same rows, in site order (the order in which the coordinator hands replies to a strategy)."""
        order = sorted(range(len(self)), key=self.sites.__getitem__)
        if order == list(range(len(self))):
            return self
        return self.take(np.array(order, dtype=np.int64))

    def equivalent_reply(self) -> Message:
        """One reply that a weighted-mean strategy averages as it would the block's rows.

        Its arrays are the block's weighted mean, its ``num-examples`` the block's total weight, and
        each metric the rows' mean weighted by ``num-examples`` (Flower's ``aggregate_metricrecords``).
        """
        factors = self.factors()
        metrics: dict[str, float] = {WEIGHT_KEY: sum(float(w) for w in self.metrics[WEIGHT_KEY])}
        for key, column in self.metrics.items():
            if key != WEIGHT_KEY:
                total = 0.0
                for value, factor in zip(column, factors, strict=True):
                    total += value * factor
                metrics[key] = total
        content = RecordDict({"arrays": in_memory_record(self.mean_arrays()), "metrics": MetricRecord(metrics)})
        return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else float("nan")


def block_problems(
    block: ReplyBlock,
    reference: Mapping[str, np.ndarray],
    *,
    caps: np.ndarray,
    max_update_norm: float | None,
) -> dict[int, str]:
    """Why each rejected row of ``block`` must be rejected (row -> reason); the rules of ``validate_train_reply``.

    ``caps`` holds each row's largest admissible ``num-examples``.
    """
    m = len(block)
    if list(block.arrays) != list(reference) and set(block.arrays) != set(reference):
        missing = sorted(set(reference) - set(block.arrays))
        extra = sorted(set(block.arrays) - set(reference))
        reason = f"weights do not match the model (missing {missing}, unexpected {extra})"
        return dict.fromkeys(range(m), reason)
    for key, expected in reference.items():
        values = block.arrays[key]
        if values.shape[1:] != expected.shape or values.shape[0] != m:
            return dict.fromkeys(range(m), f"{key}: shape {values.shape[1:]}, expected {expected.shape}")
        if values.dtype != expected.dtype:
            return dict.fromkeys(range(m), f"{key}: dtype {values.dtype}, expected {expected.dtype}")
    problems: dict[int, str] = {}
    column = block.metrics.get(WEIGHT_KEY)
    weights = block.weights if column is not None else np.full(m, np.nan)
    for i in np.flatnonzero(~(np.isfinite(weights) & (weights > 0))):
        value = column[i] if column is not None else None
        problems[int(i)] = f"num-examples must be a positive number, got {value!r}"
    for i in np.flatnonzero(weights > caps):
        problems.setdefault(int(i), f"num-examples = {weights[i]:g} is more than this site may claim ({caps[i]:g})")
    norms = update_norms(block, reference)
    for i in np.flatnonzero(~np.isfinite(norms)):
        for key in reference:  # a finite norm proves every value finite; otherwise say which it is
            values = block.arrays[key][i]
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                problems.setdefault(int(i), f"{key}: contains NaN or infinite values")
                break
    if max_update_norm is not None:
        for i in np.flatnonzero(~(norms <= max_update_norm)):
            problems.setdefault(
                int(i), f"update norm {norms[i]:.3g} exceeds train.max_update_norm = {max_update_norm:g}"
            )
    return problems


def update_norms(block: ReplyBlock, reference: Mapping[str, np.ndarray]) -> np.ndarray:
    """Each row's L2 norm of (weights - reference), each array's squares summed in its own precision."""
    total = np.zeros(len(block), dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        for key, expected in reference.items():
            if expected.dtype.kind not in "fc":
                continue
            diff = (block.arrays[key] - expected).reshape(len(block), -1)
            total += np.einsum("ij,ij->i", diff, diff)
    return np.sqrt(total)


def averages_blocks(strategy: Strategy) -> bool:
    """Whether ``strategy`` aggregates training replies by a weighted mean of ``num-examples`` only.

    Such a strategy gets a block's equivalent reply in place of its rows. Any other (robust
    aggregation, a user strategy, other metric aggregation) gets every row as its own ``Message``.
    """
    return (
        type(strategy) in weighted_mean_classes()
        and getattr(strategy, "weighted_by_key", None) == WEIGHT_KEY
        and getattr(strategy, "train_metrics_aggr_fn", None) is aggregate_metricrecords
    )
