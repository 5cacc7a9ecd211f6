"""Model weights between torch, Flower's ArrayRecord and safetensors files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord
from safetensors.numpy import load_file, save_file
from torch import nn


def raw_module(model: nn.Module) -> nn.Module:
    """The plain module inside an Opacus ``GradSampleModule`` (no ``_module.`` prefixes)."""
    return getattr(model, "_module", model)


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    """The model's state as an ``ArrayRecord`` (CPU copies)."""
    state = {k: v.detach().cpu() for k, v in raw_module(model).state_dict().items()}
    return ArrayRecord(state)


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` in the record's order."""
    return {key: arrays[key].numpy() for key in arrays}


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Copy an ``ArrayRecord`` into the model (strict: every key must match)."""
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays_to_numpy(arrays).items()}
    raw_module(model).load_state_dict(state, strict=True)


def numpy_to_arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` from ``{name: ndarray}``."""
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})


def save_safetensors(state: dict[str, np.ndarray], path: Path) -> None:
    """Write weights as safetensors and fsync the file."""
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read weights written by ``save_safetensors``."""
    return load_file(str(path))
