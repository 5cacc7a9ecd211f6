"""A user task, referenced in tests as ``tests.user_task_example:wide_mlp``."""

from __future__ import annotations

from torch import nn

from flowerbed.tasks import DataSchema, Task


def wide_mlp(width: int = 48) -> Task:
    """An MLP with one wide hidden layer and tanh activations."""

    def build(schema: DataSchema) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(schema.num_features, width), nn.Tanh(), nn.Linear(width, schema.num_classes)
        )

    return Task(name="tests.user_task_example:wide_mlp", model_fn=build, kinds=("tabular",))
