"""Model weights between torch, Flower's ArrayRecord and safetensors files."""

from __future__ import annotations

import functools
import math
import os
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load_file, save, save_file
from torch import nn

NPY = "numpy.ndarray"  # Flower's serialization type of an Array holding .npy bytes


def raw_module(model: nn.Module) -> nn.Module:
    """The plain module inside an Opacus ``GradSampleModule`` (no ``_module.`` prefixes)."""
    return getattr(model, "_module", model)


def model_to_arrays(model: nn.Module) -> ArrayRecord:
    """The model's state as an ``ArrayRecord`` (CPU copies)."""
    state = {k: v.detach().cpu() for k, v in raw_module(model).state_dict().items()}
    return ArrayRecord(state)


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` in the record's order (each a fresh, writable copy, as ``Array.numpy()`` gives)."""
    return {key: array_numpy(arrays[key]) for key in arrays}


def array_numpy(array: Array) -> np.ndarray:
    """``array.numpy()``, with the ``.npy`` header of a plain C-ordered array parsed once per distinct header.

    ``np.load`` parses every header with ``ast.literal_eval``; a round reads the same few headers
    again and again. Anything else (other types, Fortran order, short data) goes to ``numpy()``,
    which raises as it always did.
    """
    if type(array) is not Array or array.stype != NPY:  # in-memory arrays answer from their ndarray
        return array.numpy()
    data = array.data
    if not isinstance(data, bytes | bytearray | memoryview):
        return array.numpy()
    shape, fortran_order, dtype, offset = npy_header(data)
    count = math.prod(shape)
    if fortran_order or dtype.hasobject or len(data) - offset < count * dtype.itemsize:
        return array.numpy()
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape).copy()


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
        If the bytes do not start with a ``.npy`` header that reads (whatever numpy's reader raised
        on a hostile header, a ``RecursionError`` or a tokenizer error among them).
    """
    prefix = bytes(data[:12])
    try:
        if prefix[:6] == b"\x93NUMPY" and len(prefix) == 12:  # a header seen before is not parsed again
            size_bytes = 2 if prefix[6] == 1 else 4
            offset = 8 + size_bytes + int.from_bytes(prefix[8 : 8 + size_bytes], "little")
            if offset <= _KEPT_HEADER and len(data) >= offset:
                return (*_parsed_header(bytes(data[:offset])), offset)
        return _read_header(data)
    except ValueError:
        raise
    except Exception as exc:  # numpy's reader parses the header with ast and tokenize
        raise ValueError(f"the .npy header does not read ({type(exc).__name__})") from None


_KEPT_HEADER = 1024  # longer headers are parsed every time (and refused by numpy's own limit)


@functools.lru_cache(maxsize=256)
def _parsed_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    shape, fortran_order, dtype, _ = _read_header(header)
    return shape, fortran_order, dtype


def _read_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
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


def safetensors_bytes(state: dict[str, np.ndarray]) -> bytes:
    """Weights as the bytes of a safetensors file (what ``save_safetensors`` writes)."""
    return save({k: np.ascontiguousarray(v) for k, v in state.items()})


def save_safetensors(state: dict[str, np.ndarray], path: Path) -> None:
    """Write weights as safetensors and fsync the file."""
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read weights written by ``save_safetensors``."""
    return load_file(str(path))
