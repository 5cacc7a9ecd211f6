"""SCAFFOLD (Karimireddy et al., ICML 2020): control variates correct each node's client drift.

The coordinator keeps the global model ``x`` and the global control variate ``c``; each node
keeps its own ``c_i`` (at the node, never sent) and corrects every local step's gradient by
``c - c_i``. After ``K`` steps of learning rate ``lr`` a node's new control variate is (option II)
``c_i+ = c_i - c + (x - y_i) / (K lr)`` and it sends its new weights ``y_i`` and ``c_i+ - c_i``.
Per round, with ``S`` the nodes that replied and ``N`` all discovered sites:

    x <- x + eta_g (mean_S(y_i) - x)        the mean weighted as FedAvg weighs (num-examples)
    c <- c + |S| / N * mean_S(c_i+ - c_i)   unweighted

``server_learning_rate`` is ``eta_g`` (1.0: the model is FedAvg's mean).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords, validate_message_reply_consistency

from flowerbed.protocol import SCAFFOLD_CONTROL, SCAFFOLD_DELTA, SCAFFOLD_PREFIX, SITES_KEY
from flowerbed.weights import arrays_to_numpy, numpy_to_arrays

Arrays = dict[str, np.ndarray]


class Scaffold(FedAvg):
    """FedAvg's weighted mean with SCAFFOLD's server step and global control variate."""

    def __init__(self, *, server_learning_rate: float = 1.0, **fedavg: object) -> None:
        super().__init__(**fedavg)  # type: ignore[arg-type]
        if not server_learning_rate > 0:
            raise ValueError("server_learning_rate must be > 0")
        self.server_learning_rate = float(server_learning_rate)
        self.control: Arrays | None = None
        self.current_arrays: Arrays | None = None
        self.sites = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, each also carrying the global control variate."""
        self.current_arrays = arrays_to_numpy(arrays)
        if self.control is None:
            self.control = {k: np.zeros_like(v) for k, v in self.current_arrays.items() if v.dtype.kind == "f"}
        self.sites = int(config.get(SITES_KEY, 0)) or len(list(grid.get_node_ids()))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = numpy_to_arrays(self.control)
        for message in messages:
            message.content[SCAFFOLD_CONTROL] = control
        return messages

    def reply_records(self, reference: Arrays) -> dict[str, Arrays]:
        """The ArrayRecords a training reply carries besides its weights (names, shapes and dtypes)."""
        return {SCAFFOLD_DELTA: {SCAFFOLD_PREFIX + k: v for k, v in reference.items() if v.dtype.kind == "f"}}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The server step from the weighted mean of the weights, and the control variate's update."""
        replies = [r for r in replies if not r.has_error()]
        if not replies or self.current_arrays is None or self.control is None:
            return None, None
        # FedAvg's mean over each reply's weights and metrics (Flower's own helpers; its check wants one ArrayRecord)
        contents = [RecordDict({"arrays": r.content["arrays"], "metrics": _metrics(r)}) for r in replies]
        validate_message_reply_consistency(contents, self.weighted_by_key, check_arrayrecord=True)
        mean = arrays_to_numpy(aggregate_arrayrecords(contents, self.weighted_by_key))
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        eta = self.server_learning_rate
        new = {k: x + eta * (mean[k].astype(x.dtype) - x) for k, x in self.current_arrays.items()}
        deltas = [arrays_to_numpy(r.content[SCAFFOLD_DELTA]) for r in replies]
        share = len(deltas) / max(self.sites, len(deltas))
        for key, c in self.control.items():
            step = np.mean([d[SCAFFOLD_PREFIX + key] for d in deltas], axis=0)
            self.control[key] = (c + share * step).astype(c.dtype)
        return numpy_to_arrays(new), metrics


def _metrics(reply: Message) -> MetricRecord:
    return next(r for r in reply.content.values() if isinstance(r, MetricRecord))
