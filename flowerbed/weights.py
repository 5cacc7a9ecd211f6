"""Model weights between torch, Flower's ArrayRecord and safetensors files."""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
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


def array_view(array: Array) -> np.ndarray:
    """A read-only ndarray over an ``Array``'s ``.npy`` bytes, without the copy ``Array.numpy()`` makes.

    For large vectors that are only read (a coordinator summing masked inputs).

    Raises
    ------
    ValueError
        If the bytes are not a ``.npy`` array of a plain numeric dtype.
    """
    view = getattr(array, "readonly_view", None)
    if callable(view):
        return view()
    data = array.data
    shape, fortran_order, dtype, offset = npy_header(data)
    if fortran_order or dtype.hasobject:
        return array.numpy()
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)


def npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """The shape, Fortran order, dtype and data offset of ``.npy`` bytes, read without loading the array.

    Raises
    ------
    ValueError
        If the bytes do not start with a ``.npy`` header.
    """
    stream = BytesIO(data)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    return shape, fortran_order, dtype, stream.tell()


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
