"""A record's arrays as one Flower object, for messages that cross the network.

Flower 1.42's SuperLink moves every object of a message (the message, its records, each array and
each array's chunk) in an HTTP request of its own, with several database queries each: a message
carrying a model of k arrays is about 2k + 4 objects, and on a small coordinator that CPU is most
of a deployed round (benchmarks/README.md). Packed, the arrays of an ``ArrayRecord`` travel as one
run of bytes:

    u32 little-endian header length | JSON header [[name, dtype, shape], ...] | each array's bytes

in the header's order, C order, dtypes from ``DTYPES`` only (plain numbers: nothing that could
unpickle). Up to ``INLINE_BYTES`` the bytes are the one value of a ``ConfigRecord`` under the key
``PACKED`` that takes the ``ArrayRecord``'s place (one object instead of the record, its array and
the array's chunk); a larger pack is one ``Array`` under ``PACKED`` in the ``ArrayRecord`` (Flower
cuts it into chunks). The coordinator packs what it sends to deployed nodes and unpacks their
replies (``server/exchange.py``); a node's ClientApp unpacks what it receives and packs its reply
when the request came packed (``client/app.py``). In-process grids never pack.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from flowerbed.weights import NPY, npy_header

PACKED = "flowerbed-packed"
DTYPES = frozenset({"|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"})
MAX_HEADER = 1 << 20  # bytes
MAX_ARRAYS = 4096  # a record of more arrays travels unpacked
MAX_BYTES = 1 << 62
INLINE_BYTES = 4 << 20  # a pack up to this size travels as one ConfigRecord value (Flower's array chunks are 5 MB)


class PackError(ValueError):
    """A packed record that does not parse; the message names what is wrong."""


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """The record's arrays as one ``Array`` (a record of fewer than two arrays is returned as it is).

    Raises
    ------
    PackError
        For an array whose dtype is not in ``DTYPES``.
    """
    if not 2 <= len(record) <= MAX_ARRAYS or PACKED in record:
        return record
    arrays = {name: record[name].numpy() for name in record}
    return ArrayRecord({PACKED: Array(pack_arrays(arrays))})


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """``{name: ndarray}`` as the bytes of one packed array (a uint8 vector)."""
    entries = []
    for name, value in arrays.items():
        dtype = value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype
        if dtype.str not in DTYPES:
            raise PackError(f"array {name!r}: dtype {value.dtype} cannot be packed (plain numbers only)")
        entries.append([name, dtype.str, list(value.shape)])
    header = json.dumps(entries, separators=(",", ":")).encode()
    parts = [len(header).to_bytes(4, "little"), header]
    for entry, value in zip(entries, arrays.values(), strict=True):
        parts.append(np.asarray(value).astype(np.dtype(entry[1]), copy=False).tobytes(order="C"))
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The arrays of a packed record as an ordinary ``ArrayRecord`` (any other record as it is).

    Raises
    ------
    PackError
        When the packed array does not parse: its type, the header's length, JSON or entries, or
        bytes that do not match the header.
    """
    if PACKED not in record:
        return record
    if len(record) != 1:
        raise PackError(f"a packed record holds only {PACKED!r}, not {len(record)} arrays")
    arrays = unpack_arrays(_packed_bytes(record[PACKED]))
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def _packed_bytes(array: Array) -> np.ndarray:
    """The uint8 vector of a packed ``Array``, read from its ``.npy`` bytes without ``np.load``.

    Only a plain 1-D uint8 array whose length matches its bytes is read: nothing is allocated
    from a size the sender claims.
    """
    if array.stype != NPY or array.dtype != "uint8":
        raise PackError(
            f"the packed array must be a {NPY} of uint8, not a {_short(array.stype)} of {_short(array.dtype)}"
        )
    data = array.data
    if not isinstance(data, bytes):
        raise PackError("the packed array holds no bytes")
    try:
        shape, fortran_order, dtype, offset = npy_header(data)
    except (ValueError, TypeError, EOFError, SyntaxError) as exc:
        raise PackError(f"the packed array's .npy header does not read: {_short(str(exc))}") from None
    if dtype != np.uint8 or fortran_order or len(shape) != 1 or shape[0] != len(data) - offset:
        raise PackError(f"the packed array must be a uint8 vector of its own length, not {dtype} of shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset)


def unpack_arrays(packed: np.ndarray) -> dict[str, np.ndarray]:
    """The ``{name: ndarray}`` of a packed array's bytes (see ``unpack_record``), each a copy."""
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise PackError(f"the packed array must be a uint8 vector, not {packed.dtype} of shape {packed.shape}")
    data = memoryview(np.ascontiguousarray(packed)).cast("B")  # the arrays are copied out once, below
    if len(data) < 4:
        raise PackError("the packed array is shorter than its header length")
    length = int.from_bytes(data[:4], "little")
    if not 0 < length <= min(MAX_HEADER, len(data) - 4):
        raise PackError(f"header length {length} does not fit the packed array ({len(data)} bytes)")
    try:
        entries = json.loads(bytes(data[4 : 4 + length]))
    except (ValueError, RecursionError):
        raise PackError("the header is not JSON (or is nested too deeply)") from None
    if not isinstance(entries, list) or len(entries) > MAX_ARRAYS:
        raise PackError(f"the header must be a list of at most {MAX_ARRAYS} entries")
    out: dict[str, np.ndarray] = {}
    offset = 4 + length
    for i, entry in enumerate(entries):
        name, dtype, shape = _entry(i, entry)
        if name in out:
            raise PackError(f"entry {i}: array {_short(name)} appears twice")
        count = math.prod(shape)
        size = count * np.dtype(dtype).itemsize
        if math.prod(d for d in shape if d) * np.dtype(dtype).itemsize >= MAX_BYTES:
            raise PackError(f"entry {i} ({_short(name)}): shape {_short(str(shape))} is too large")
        if offset + size > len(data):
            raise PackError(f"entry {i} ({_short(name)}): its {size} bytes run past the end of the packed array")
        try:
            value = np.frombuffer(data, dtype=np.dtype(dtype), count=count, offset=offset).reshape(shape)
        except ValueError as exc:
            raise PackError(f"entry {i} ({_short(name)}): {_short(str(exc))}") from None
        out[name] = value.copy()
        offset += size
    if offset != len(data):
        raise PackError(f"{len(data) - offset} bytes after the last array")
    return out


def _entry(i: int, entry: object) -> tuple[str, str, tuple[int, ...]]:
    if not (isinstance(entry, list) and len(entry) == 3):
        raise PackError(f"entry {i} must be [name, dtype, shape]")
    name, dtype, shape = entry
    if not isinstance(name, str) or not name or name == PACKED:
        raise PackError(f"entry {i}: the name must be a non-empty string other than {PACKED!r}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise PackError(f"entry {i} ({_short(name)}): dtype {_short(dtype)} is not one of {sorted(DTYPES)}")
    if not (
        isinstance(shape, list)
        and len(shape) <= 32
        and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)
    ):
        raise PackError(f"entry {i} ({_short(name)}): the shape must be a list of at most 32 sizes >= 0")
    return name, dtype, tuple(shape)


def _short(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a sender's names and dtypes go into logs."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pack_content(content: RecordDict) -> tuple[RecordDict, bool]:
    """The content with each non-empty ``ArrayRecord`` packed; whether any was.

    A pack of at most ``INLINE_BYTES`` becomes a ``ConfigRecord``; a larger one of two or more
    arrays one ``Array`` (``pack_record``). A record that cannot be packed (an unusual dtype)
    travels as it is.
    """
    packed = {key: _packed_or_same(value) for key, value in content.items()}
    changed = any(packed[key] is not content[key] for key in packed)
    return (RecordDict(packed), True) if changed else (content, False)


def _packed_or_same(value: object) -> object:
    if not isinstance(value, ArrayRecord) or not 1 <= len(value) <= MAX_ARRAYS or PACKED in value:
        return value
    try:
        packed = pack_arrays({name: value[name].numpy() for name in value})
    except PackError:
        return value
    if packed.nbytes <= INLINE_BYTES:
        return ConfigRecord({PACKED: packed.tobytes()})
    return ArrayRecord({PACKED: Array(packed)}) if len(value) >= 2 else value


def unpack_content(content: RecordDict) -> tuple[RecordDict, bool]:
    """The content with each packed record unpacked; whether any was.

    Raises
    ------
    PackError
        For a packed record that does not parse.
    """
    if not any(isinstance(v, ArrayRecord | ConfigRecord) and PACKED in v for v in content.values()):
        return content, False
    unpacked = {key: _unpacked_or_same(value) for key, value in content.items()}
    return RecordDict(unpacked), True


def _unpacked_or_same(value: object) -> object:
    if isinstance(value, ArrayRecord):
        return unpack_record(value)
    if not isinstance(value, ConfigRecord) or PACKED not in value:
        return value
    if len(value) != 1:
        raise PackError(f"a packed record holds only {PACKED!r}, not {len(value)} values")
    data = value[PACKED]
    if not isinstance(data, bytes):
        raise PackError(f"the packed record's value must be bytes, not {type(data).__name__}")
    arrays = unpack_arrays(np.frombuffer(data, dtype=np.uint8))
    return ArrayRecord({name: Array(array) for name, array in arrays.items()})
