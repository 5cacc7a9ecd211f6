"""A user task, referenced in tests as ``tests.user_task_example:wide_mlp``."""

from __future__ import annotations

from typing import ClassVar

from flwr.serverapp.strategy import FedAvg
from torch import nn

from flowerbed.tasks import DataSchema, Task


def wide_mlp(width: int = 48) -> Task:
    """An MLP with one wide hidden layer and tanh activations."""

    def build(schema: DataSchema) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(schema.num_features, width), nn.Tanh(), nn.Linear(width, schema.num_classes)
        )

    return Task(name="tests.user_task_example:wide_mlp", model_fn=build, kinds=("tabular",), loss_per_row=True)


def _centered_cross_entropy(logits, labels):
    """Cross-entropy of logits centred on the batch's mean: every row's term depends on the whole batch."""
    return nn.functional.cross_entropy(logits - logits.mean(dim=0, keepdim=True), labels)


def coupled(declared: str = "true") -> Task:
    """A task whose loss couples the rows of a batch, declaring ``loss_per_row`` true, false or none."""
    return Task(
        name="tests.user_task_example:coupled",
        model_fn=wide_mlp().model_fn,
        kinds=("tabular",),
        loss_fn=_centered_cross_entropy,
        loss_per_row={"true": True, "false": False, "none": None}[declared],
    )


class RecordingFedAvg(FedAvg):
    """FedAvg that remembers the weight (``num-examples``) of every reply it aggregates."""

    seen: ClassVar[list[list[float]]] = []

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        RecordingFedAvg.seen.append([float(r.content["metrics"]["num-examples"]) for r in replies])
        return super().aggregate_train(server_round, replies)


def _positives_plus_one(site) -> float:
    """A site's weight: its positive training rows plus one."""
    return float((site.y_train == 1).sum() + 1)


def _biases_to_half(model: nn.Module) -> None:
    """Every bias starts at 0.5 (an initial-state hook)."""
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            nn.init.constant_(param, 0.5)


def weighted(width: int = 16) -> Task:
    """``wide_mlp`` whose sites weigh their positive rows + 1 and whose biases start at 0.5."""
    return Task(
        name="tests.user_task_example:weighted",
        model_fn=wide_mlp(width).model_fn,
        kinds=("tabular",),
        loss_per_row=True,
        weight_fn=_positives_plus_one,
        init_fn=_biases_to_half,
    )
