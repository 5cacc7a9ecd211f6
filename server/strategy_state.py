"""A strategy's state as JSON and arrays, so a checkpoint holds no pickle.

A strategy is rebuilt from the experiment's ``strategy`` section, then given back the attributes
that changed while it ran: numbers, strings and booleans (JSON), and arrays, dicts or lists of
arrays, and ``ArrayRecord``s (safetensors). Functions are left to the constructor. A strategy
whose state holds anything else cannot be checkpointed, and says so at the first checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from flowerbed.exception import RunError
from flowerbed.weights import arrays_to_numpy, numpy_to_arrays

Scalar = (bool, int, float, str)


def strategy_state(strategy: Strategy) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON-able description, named arrays) of every attribute of ``strategy``.

    Raises
    ------
    RunError
        For an attribute of a type that has no safe representation (naming it and its type).
    """
    meta: dict[str, Any] = {}
    tensors: dict[str, np.ndarray] = {}
    for name, value in vars(strategy).items():
        if callable(value) and not isinstance(value, ArrayRecord):
            continue
        if value is None or isinstance(value, Scalar):
            meta[name] = {"kind": "value", "value": value}
        elif isinstance(value, ArrayRecord | dict) and _named_arrays(value) is not None:
            arrays = _named_arrays(value)
            kind = "arrayrecord" if isinstance(value, ArrayRecord) else "dict"
            meta[name] = {"kind": kind, "keys": list(arrays)}  # type: ignore[arg-type]
            tensors.update({f"{name}/{key}": array for key, array in arrays.items()})  # type: ignore[union-attr]
        elif isinstance(value, list | tuple) and all(isinstance(v, np.ndarray) for v in value):
            meta[name] = {"kind": "list", "length": len(value)}
            tensors.update({f"{name}/{i}": array for i, array in enumerate(value)})
        elif isinstance(value, np.ndarray):
            meta[name] = {"kind": "array"}
            tensors[name] = value
        else:
            raise RunError(
                f"strategy {type(strategy).__name__}: attribute {name!r} of type {type(value).__name__} cannot be "
                "checkpointed (checkpoints hold numbers, strings and arrays only); keep such state out of the strategy"
            )
    return meta, {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def _named_arrays(value: ArrayRecord | dict) -> dict[str, np.ndarray] | None:
    if isinstance(value, ArrayRecord):
        return arrays_to_numpy(value)
    if all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items()):
        return dict(value)
    return None


def restore_strategy(strategy: Strategy, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> Strategy:
    """Give a freshly built ``strategy`` the state ``strategy_state`` recorded."""
    for name, entry in meta.items():
        kind = entry["kind"]
        if kind == "value":
            value: Any = entry["value"]
        elif kind == "arrayrecord":
            value = numpy_to_arrays({k: tensors[f"{name}/{k}"] for k in entry["keys"]})
        elif kind == "dict":
            value = {k: tensors[f"{name}/{k}"] for k in entry["keys"]}
        elif kind == "list":
            value = [tensors[f"{name}/{i}"] for i in range(entry["length"])]
        elif kind == "array":
            value = tensors[name]
        else:
            raise RunError(f"checkpoint: unknown strategy state kind {kind!r} for {name!r}")
        setattr(strategy, name, value)
    return strategy
