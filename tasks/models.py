"""Built-in models: logistic regression and an MLP for tabular data, a small CNN for images.

None of them has BatchNorm or dropout, so DP-SGD needs no module surgery and training is
deterministic for a fixed seed.
"""

from __future__ import annotations

import torch
from torch import nn

from flowerbed.tasks.task import DataSchema


def logistic_regression(schema: DataSchema) -> nn.Module:
    """A single linear layer over the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(schema.num_features, schema.num_classes))


def binary_logistic_regression(schema: DataSchema) -> nn.Module:
    """One logit over the flattened input (sigmoid and binary cross-entropy in the task's loss)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(schema.num_features, 1))


def binary_mlp(schema: DataSchema, hidden: int | list[int] = 16, norm: bool = False) -> nn.Module:
    """``mlp`` with one logit (sigmoid and binary cross-entropy in the task's loss)."""
    return mlp(schema, hidden, outputs=1, norm=norm)


class Fenda(nn.Module):
    """FENDA-FL (Tyrrell et al. 2023): a global and a local feature extractor side by side, one head.

    ``global_features`` is shared through the federation; ``local_features`` and ``head`` are the
    site's own under ``personalization.method = "fedper"`` (``personal_layers``).
    """

    personal_layers = ("local_features", "head")

    def __init__(self, schema: DataSchema, hidden: int = 8, outputs: int = 1) -> None:
        super().__init__()
        self.global_features = nn.Sequential(nn.Flatten(), nn.Linear(schema.num_features, hidden), nn.ReLU())
        self.local_features = nn.Sequential(nn.Flatten(), nn.Linear(schema.num_features, hidden), nn.ReLU())
        self.head = nn.Linear(2 * hidden, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The head over both extractors' features."""
        return self.head(torch.cat([self.global_features(x), self.local_features(x)], dim=1))


def fenda_mlp(schema: DataSchema, hidden: int = 8) -> nn.Module:
    """FENDA-FL's two extractors and a head, with one logit."""
    return Fenda(schema, hidden)


def mlp(schema: DataSchema, hidden: int | list[int] = 64, outputs: int | None = None, norm: bool = False) -> nn.Module:
    """Fully connected network with ReLU activations (``hidden``: one width or a list of widths).

    ``norm`` puts a LayerNorm after every hidden layer (what FedBN keeps at each node).
    """
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = schema.num_features
    for width in widths:
        layers += [nn.Linear(width_in, int(width)), *([nn.LayerNorm(int(width))] if norm else []), nn.ReLU()]
        width_in = int(width)
    layers.append(nn.Linear(width_in, schema.num_classes if outputs is None else outputs))
    return nn.Sequential(*layers)


def small_cnn(schema: DataSchema, channels: int = 16) -> nn.Module:
    """Two 3x3 convolutions with max-pooling, then a linear classifier (for small images)."""
    if schema.kind != "image" or len(schema.input_shape) != 3:
        raise ValueError(f"small_cnn needs image data shaped (C, H, W), got {schema.input_shape}")
    c, h, w = schema.input_shape
    pooled = (h // 4) * (w // 4)
    return nn.Sequential(
        nn.Conv2d(c, channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * channels * pooled, schema.num_classes),
    )
