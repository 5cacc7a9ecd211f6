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
        Number of label values; labels are integers ``0 .. num_classes - 1``. For
        ``target = "values"``, the number of target columns (1 for one regression value).
    feature_names : tuple[str, ...] (default: ())
        Column names after preprocessing, for reports and error messages.
    target : {"class", "values"} (default: "class")
        ``"class"``: one integer class label per row (``int64``). ``"values"``: float targets,
        one value or a row of values per example (a regression value; event and time for a
        survival task). Components that count labels (label-skew partitions, label histograms)
        accept only ``"class"`` and say so.
    """

    kind: Literal["tabular", "image"]
    input_shape: tuple[int, ...]
    num_classes: int
    feature_names: tuple[str, ...] = ()
    target: Literal["class", "values"] = "class"

    @property
    def num_features(self) -> int:
        """Number of input values per example."""
        return int(np.prod(self.input_shape))


@dataclass
class SiteData:
    """One site's preprocessed train and test split (features float32, labels int64).

    ``x_val``/``y_val`` hold the validation rows the node took out of its training rows
    (``data.validation_fraction``); empty when the experiment asks for none.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    schema: DataSchema
    notes: list[str] = field(default_factory=list)
    source: str = ""
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    # Raw values (before preprocessing, NaN where missing) of the columns reports group patients by,
    # one array per column name, aligned with the rows of each split; None: the data has none.
    groups_train: dict[str, np.ndarray] | None = None
    groups_test: dict[str, np.ndarray] | None = None
    groups_val: dict[str, np.ndarray] | None = None

    def split_groups(self, name: Literal["test", "validation"]) -> dict[str, np.ndarray]:
        """The subgroup columns' raw values for the rows of the test or the validation split."""
        return dict((self.groups_val if name == "validation" else self.groups_test) or {})

    @property
    def num_val(self) -> int:
        """Number of validation examples."""
        return 0 if self.y_val is None else len(self.y_val)

    def split(self, name: Literal["test", "validation"]) -> tuple[np.ndarray, np.ndarray]:
        """The features and targets of the test or the validation split."""
        if name == "validation":
            if self.x_val is None or self.y_val is None:
                return self.x_train[:0], self.y_train[:0]
            return self.x_val, self.y_val
        return self.x_test, self.y_test

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


def binary_cross_entropy(logit: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of one logit per row (a sigmoid output) against labels 0/1."""
    return nn.functional.binary_cross_entropy_with_logits(logit[:, 0], labels.to(logit.dtype))


def binary_accuracy_metrics(logit: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy of ``sigmoid(logit) > 0.5`` (one logit per row)."""
    return {"accuracy": float(((logit[:, 0] > 0).long() == labels).float().mean())}


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
    primary_metric : str (default: "accuracy")
        The one figure reports, local baselines, comparisons and early stopping rank models by:
        a key of ``metrics_fn``'s result, or ``"loss"``.
    greater_is_better : bool (default: True)
        Whether a larger ``primary_metric`` is better (``False`` for a loss or an error).
    weight_fn : Callable[[SiteData], float] | None (default: None)
        With ``train.weighting = "task"``: the positive weight a site reports as ``num-examples``,
        computed at the node from its own data.
    init_fn : Callable[[nn.Module], None] | None (default: None)
        Called on the global model before round 1 (after ``model_fn``, under the run's seed), to
        set its initial state in place, e.g. from a reference implementation; the result is kept
        in the run folder as ``initial.safetensors``.
    """

    name: str
    model_fn: Callable[[DataSchema], nn.Module]
    kinds: tuple[str, ...] = ("tabular", "image")
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy
    metrics_fn: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] = accuracy_metrics
    loss_per_row: bool | None = None
    primary_metric: str = "accuracy"
    greater_is_better: bool = True
    weight_fn: Callable[[SiteData], float] | None = None
    init_fn: Callable[[nn.Module], None] | None = None

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
