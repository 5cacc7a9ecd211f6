"""The Task: what the server and every node agree on (model factory, loss, metrics, data schema)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class DataSchema:
    """Shape of one site's data, enough to build a model without seeing a single record.

    Parameters
    ----------
    kind : {"tabular", "image"}
        Tabular rows of ``num_features`` floats, or images of ``input_shape`` (C, H, W).
    input_shape : tuple[int, ...]
        ``(num_features,)`` for tabular data, ``(channels, height, width)`` for images.
    num_classes : int
        Number of label values; labels are integers ``0 .. num_classes - 1``.
    feature_names : tuple[str, ...] (default: ())
        Column names after preprocessing, for reports and error messages.
    """

    kind: Literal["tabular", "image"]
    input_shape: tuple[int, ...]
    num_classes: int
    feature_names: tuple[str, ...] = ()

    @property
    def num_features(self) -> int:
        """Number of input values per example."""
        return int(np.prod(self.input_shape))


@dataclass
class SiteData:
    """One site's preprocessed train and test split (features float32, labels int64)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    schema: DataSchema
    notes: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return len(self.y_train)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy loss."""
    return nn.functional.cross_entropy(logits, labels)


def accuracy_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy of the arg-max prediction."""
    return {"accuracy": float((logits.argmax(dim=1) == labels).float().mean())}


@dataclass(frozen=True)
class Task:
    """A model factory plus its loss and metrics, shared by the server and the nodes.

    Parameters
    ----------
    name : str
        Built-in name (``tabular-mlp``) or user reference (``package.module:attr``).
    model_fn : Callable[[DataSchema], nn.Module]
        Builds a fresh model for data of this schema. Must be deterministic under ``torch.manual_seed``.
    kinds : tuple[str, ...] (default: ("tabular", "image"))
        Data kinds the model accepts; a mismatch is reported before training.
    loss_fn : Callable (default: cross-entropy)
        ``loss_fn(logits, labels) -> scalar tensor``, mean over the batch.
    metrics_fn : Callable (default: accuracy)
        ``metrics_fn(logits, labels) -> {name: value}`` on a whole evaluation set.
    loss_per_row : bool | None (default: None)
        Whether ``loss_fn`` is the mean of one term per row (each row's term depends on that row
        alone). DP-SGD bounds one row's influence only then: it trains a task that declares
        ``True`` (after checking the claim on a batch) and refuses one that declares ``False`` or
        nothing. The built-in tasks declare ``True``.
    """

    name: str
    model_fn: Callable[[DataSchema], nn.Module]
    kinds: tuple[str, ...] = ("tabular", "image")
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy
    metrics_fn: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] = accuracy_metrics
    loss_per_row: bool | None = None

    def build_model(self, schema: DataSchema, seed: int | None = None) -> nn.Module:
        """A fresh model; with ``seed``, the same initial weights on every machine.

        For DP-SGD, the server and every node pass it through
        ``flowerbed.privacy.dp_sgd.make_private_compatible``, so weights keep the same names and shapes.
        """
        if seed is None:
            model = self.model_fn(schema)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = self.model_fn(schema)
        return model


def with_args(model_fn: Callable[..., nn.Module], args: dict[str, Any]) -> Callable[[DataSchema], nn.Module]:
    """Bind keyword arguments from the experiment's ``task.args`` to a model factory."""

    def build(schema: DataSchema) -> nn.Module:
        return model_fn(schema, **args)

    return build
