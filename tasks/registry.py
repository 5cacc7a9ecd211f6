"""Resolve a task by name: built-ins, or a user task given as ``package.module:attr``."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from flowerbed.exception import TaskError
from flowerbed.tasks.models import (
    binary_logistic_regression,
    binary_mlp,
    fenda_mlp,
    logistic_regression,
    mlp,
    small_cnn,
)
from flowerbed.tasks.task import Task, binary_accuracy_metrics, binary_cross_entropy, with_args

BUILTIN_MODELS: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "tabular-logreg": (logistic_regression, ("tabular",)),
    "binary-logreg": (binary_logistic_regression, ("tabular",)),
    "binary-mlp": (binary_mlp, ("tabular",)),
    "fenda-mlp": (fenda_mlp, ("tabular",)),
    "tabular-mlp": (mlp, ("tabular",)),
    "image-cnn": (small_cnn, ("image",)),
}


#: Built-in tasks with one logit per row (binary cross-entropy).
BINARY = ("binary-logreg", "binary-mlp", "fenda-mlp")


def is_builtin(name: str) -> bool:
    """Whether ``name`` is one of flowerbed's own tasks (always allowed on a node)."""
    return name in BUILTIN_MODELS


def resolve_task(name: str, args: dict[str, Any] | None = None) -> Task:
    """Build the ``Task`` named by the experiment's ``task.name`` and ``task.args``.

    A user task ``package.module:attr`` may be a ``Task`` or a callable returning one (called with
    ``task.args`` as keyword arguments).
    """
    args = dict(args or {})
    if name in BUILTIN_MODELS:
        model_fn, kinds = BUILTIN_MODELS[name]
        try:
            model_fn(_probe_schema(kinds[0]), **args)
        except TypeError as exc:
            raise TaskError(f"task.args for {name!r} are invalid: {exc}") from None
        task = Task(name=name, model_fn=with_args(model_fn, args), kinds=kinds, loss_per_row=True)
        if name in BINARY:  # one logit: sigmoid and binary cross-entropy (FLamby's Fed-Heart-Disease)
            return replace(task, loss_fn=binary_cross_entropy, metrics_fn=binary_accuracy_metrics)
        return task
    if ":" not in name:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise TaskError(f"task.name = {name!r} is unknown: use one of {known} or 'package.module:attr'")
    module_name, _, attr = name.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TaskError(
            f"task.name = {name!r} cannot be imported: {exc}; a module next to the experiment file is found when "
            "you run `flowerbed simulate FILE`, anywhere else add its folder to PYTHONPATH (or install it)"
        ) from None
    if callable(obj) and not isinstance(obj, Task):
        try:
            inspect.signature(obj).bind(**args)
        except TypeError as exc:
            raise TaskError(f"task.args for {name!r} do not fit its factory: {exc}") from None
        except ValueError:  # no signature to check (a builtin): call it and see
            pass
    task = obj if isinstance(obj, Task) else obj(**args) if callable(obj) else None
    if not isinstance(task, Task):
        raise TaskError(f"task.name = {name!r} must be a flowerbed Task or a callable returning one")
    return task


def _probe_schema(kind: str):
    from flowerbed.tasks.task import DataSchema

    shape = (4,) if kind == "tabular" else (1, 8, 8)
    return DataSchema(kind=kind, input_shape=shape, num_classes=2)  # type: ignore[arg-type]
