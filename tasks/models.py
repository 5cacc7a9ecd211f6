"""Built-in models: logistic regression and an MLP for tabular data, a small CNN for images.

None of them has BatchNorm or dropout, so DP-SGD needs no module surgery and training is
deterministic for a fixed seed.
"""

from __future__ import annotations

from torch import nn

from flowerbed.tasks.task import DataSchema


def logistic_regression(schema: DataSchema) -> nn.Module:
    """A single linear layer over the flattened input."""
    return nn.Sequential(nn.Flatten(), nn.Linear(schema.num_features, schema.num_classes))


def mlp(schema: DataSchema, hidden: int | list[int] = 64) -> nn.Module:
    """Fully connected network with ReLU activations (``hidden``: one width or a list of widths)."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = schema.num_features
    for width in widths:
        layers += [nn.Linear(width_in, int(width)), nn.ReLU()]
        width_in = int(width)
    layers.append(nn.Linear(width_in, schema.num_classes))
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
