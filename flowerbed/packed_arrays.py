"""A message's content as few Flower objects, for messages that cross the network.

Flower 1.42's SuperLink moves every object of a message (the message, its record dict, each
record, each array and each array's chunk) in an HTTP request of its own, with several database
queries each: a message carrying a model of k arrays and a config is about 2k + 5 objects, and on
a small coordinator that CPU is most of a deployed round (benchmarks/README.md).

- Up to ``INLINE_BYTES``, the whole content travels as an **envelope**: one ``ConfigRecord`` under
  ``ENVELOPE`` whose one value is every record in a run of bytes (``envelope_bytes``). A message
  is then three objects: the message, its record dict and the envelope.
- A larger content travels record by record, and the arrays of each ``ArrayRecord`` as one
  ``Array`` of bytes under ``PACKED`` (Flower cuts it into chunks).

Arrays are packed as

    u32 little-endian header length | JSON header [[name, dtype, shape], ...] | each array's bytes

in the header's order, C order, dtypes from ``DTYPES`` only (plain numbers: nothing that could
unpickle); config and metric records keep Flower's own serialization (protobuf). The receiver
checks every size against the bytes before it reads anything. The coordinator packs what it sends
to deployed nodes and unpacks their replies (``server/exchange.py``); a node's ClientApp unpacks
what it receives and packs its reply when the request came packed (``client/app.py``).
In-process grids never pack.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flowerbed.weights import NPY, npy_header

PACKED = "flowerbed-packed"
ENVELOPE = "flowerbed-envelope"
RECORD_KINDS = ("arrays", "config", "metrics")
MAX_RECORDS = 64  # a content of more records travels record by record
DTYPES = frozenset({"|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"})
MAX_HEADER = 1 << 20  # bytes
MAX_ARRAYS = 4096  # a record of more arrays travels unpacked
MAX_BYTES = 1 << 62
INLINE_BYTES = 4 << 20  # an envelope up to this size is one ConfigRecord value (Flower's array chunks are 5 MB)


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


def unpack_record(record: ArrayRecord, max_arrays: int = MAX_ARRAYS) -> ArrayRecord:
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
    arrays = unpack_arrays(_packed_bytes(record[PACKED]), max_arrays)
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
        raise PackError(
            f"the packed array must be a uint8 vector of its own length, not {_short(str(dtype))} "
            f"of shape {_short(str(shape))}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset)


def unpack_arrays(packed: np.ndarray, max_arrays: int = MAX_ARRAYS) -> dict[str, np.ndarray]:
    """The ``{name: ndarray}`` of a packed array's bytes (see ``unpack_record``), each a copy."""
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise PackError(f"the packed array must be a uint8 vector, not {packed.dtype} of shape {packed.shape}")
    data = memoryview(np.ascontiguousarray(packed)).cast("B")  # the arrays are copied out once, below
    entries, offset = _json_header(data, "the packed array", max_arrays, f" (a content holds {MAX_ARRAYS})")
    out: dict[str, np.ndarray] = {}
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


def _json_header(data: memoryview, what: str, max_entries: int, note: str = "") -> tuple[list, int]:
    """The JSON list that ``data`` starts with (after its u32 length) and where the bytes after it begin."""
    if len(data) < 4:
        raise PackError(f"{what} is shorter than its header length")
    length = int.from_bytes(data[:4], "little")
    if not 0 < length <= min(MAX_HEADER, len(data) - 4):
        raise PackError(f"header length {length} does not fit {what} ({len(data)} bytes)")
    try:
        entries = json.loads(bytes(data[4 : 4 + length]))
    except (ValueError, RecursionError):
        raise PackError(f"the header of {what} is not JSON (or is nested too deeply)") from None
    if not isinstance(entries, list) or len(entries) > max_entries:
        raise PackError(f"the header of {what} must be a list of at most {max_entries} entries{note}")
    return entries, 4 + length


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
    """The content as it crosses the network, and whether it changed.

    Up to ``INLINE_BYTES`` the whole content travels as one envelope (``ENVELOPE``); a larger one
    record by record, each ``ArrayRecord`` of two or more arrays as one ``Array`` (``pack_record``).
    A record that cannot be packed (an unusual dtype) travels as it is.
    """
    if _envelope_saves_objects(content):
        try:
            payload = envelope_bytes(content)
        except PackError:
            payload = None
        if payload is not None and len(payload) <= INLINE_BYTES:
            return RecordDict({ENVELOPE: ConfigRecord({ENVELOPE: payload})}), True
    packed: dict[str, Any] = {}
    budget = MAX_ARRAYS  # what a receiver reads in one content
    for key, value in content.items():
        if isinstance(value, ArrayRecord) and len(value) <= budget:
            with contextlib.suppress(PackError):  # an unusual dtype: the record travels as it is
                value = pack_record(value)
            if value is not content[key]:
                budget -= len(content[key])
        packed[key] = value
    changed = any(packed[key] is not content[key] for key in packed)
    return (RecordDict(packed), True) if changed else (content, False)


def _envelope_saves_objects(content: RecordDict) -> bool:
    """Whether the content is more than one leaf record and small enough to try."""
    arrays = [value for value in content.values() if isinstance(value, ArrayRecord)]
    if len(content) < 2 and not arrays:
        return False
    size = sum(len(array.data) for record in arrays for array in record.values())
    return len(content) <= MAX_RECORDS and size <= INLINE_BYTES


def envelope_bytes(content: RecordDict) -> bytes:
    """Every record of ``content`` in one run of bytes.

        u32 little-endian header length | JSON header [[key, kind, length], ...] | each record's bytes

    ``kind`` is ``arrays`` (``pack_arrays``' bytes), ``config`` or ``metrics`` (the record's own
    Flower serialization, ``deflate``).

    Raises
    ------
    PackError
        For an array whose dtype is not in ``DTYPES``, or more than ``MAX_ARRAYS`` arrays in all.
    """
    entries, parts = [], []
    if sum(len(value) for value in content.values() if isinstance(value, ArrayRecord)) > MAX_ARRAYS:
        raise PackError(f"more than {MAX_ARRAYS} arrays in one content")
    for key, value in content.items():
        if isinstance(value, ArrayRecord):
            kind, data = "arrays", pack_arrays({name: value[name].numpy() for name in value}).tobytes()
        elif isinstance(value, ConfigRecord):
            kind, data = "config", value.deflate()
        elif isinstance(value, MetricRecord):
            kind, data = "metrics", value.deflate()
        else:
            raise PackError(f"record {key!r}: a {type(value).__name__} cannot be packed")
        entries.append([key, kind, len(data)])
        parts.append(data)
    header = json.dumps(entries, separators=(",", ":")).encode()
    return b"".join([len(header).to_bytes(4, "little"), header, *parts])


def open_envelope(content: RecordDict) -> RecordDict:
    """The records of an envelope (``pack_content``), each checked as it is read.

    Raises
    ------
    PackError
        When the envelope does not parse: what holds it, the header's length, JSON, entries or
        sizes, or a record's bytes.
    """
    if len(content) != 1:
        raise PackError(f"an envelope travels alone, not beside {len(content) - 1} other records")
    record = content[ENVELOPE]
    if not isinstance(record, ConfigRecord) or list(record) != [ENVELOPE]:
        raise PackError(f"the envelope must be a ConfigRecord holding only {ENVELOPE!r}")
    data = record[ENVELOPE]
    if not isinstance(data, bytes):
        raise PackError(f"the envelope's value must be bytes, not {type(data).__name__}")
    if len(data) > INLINE_BYTES:
        raise PackError(f"the envelope holds {len(data)} bytes, more than a sender puts in one ({INLINE_BYTES})")
    entries, offset = _json_header(memoryview(data), "the envelope", MAX_RECORDS)
    records: dict[str, Any] = {}
    arrays_left = MAX_ARRAYS  # for the whole content: each array costs the reader a Flower Array
    for i, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise PackError(f"envelope entry {i} must be [key, kind, length]")
        key, kind, size = entry
        if not isinstance(key, str) or not key or key in (ENVELOPE, PACKED) or key in records:
            raise PackError(f"envelope entry {i}: the key must be a new non-empty string, not {_short(key)}")
        if kind not in RECORD_KINDS:
            raise PackError(f"envelope entry {i} ({_short(key)}): kind {_short(kind)} is not one of {RECORD_KINDS}")
        if not (isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= len(data) - offset):
            raise PackError(f"envelope entry {i} ({_short(key)}): its length {_short(size)} runs past the end")
        records[key] = _record(key, kind, data[offset : offset + size], arrays_left)
        if kind == "arrays":
            arrays_left -= len(records[key])
        offset += size
    if offset != len(data):
        raise PackError(f"{len(data) - offset} bytes after the envelope's last record")
    return RecordDict(records)


def _record(key: str, kind: str, data: bytes, max_arrays: int) -> ArrayRecord | ConfigRecord | MetricRecord:
    if kind == "arrays":
        try:
            arrays = unpack_arrays(np.frombuffer(data, dtype=np.uint8), max_arrays)
        except PackError as exc:
            raise PackError(f"record {_short(key)}: {exc}") from None
        return ArrayRecord({name: Array(value) for name, value in arrays.items()})
    kind_class = ConfigRecord if kind == "config" else MetricRecord
    try:
        return kind_class.inflate(data)
    except Exception as exc:  # Flower's parser raises what protobuf and its checks raise
        raise PackError(f"record {_short(key)}: its {kind} do not read ({type(exc).__name__})") from None


def unpack_content(content: RecordDict) -> tuple[RecordDict, bool]:
    """The content as the sender built it (``pack_content`` undone); whether it had been packed.

    Raises
    ------
    PackError
        For an envelope or a packed record that does not parse.
    """
    if ENVELOPE in content:
        return open_envelope(content), True
    if not any(isinstance(v, ArrayRecord) and PACKED in v for v in content.values()):
        return content, False
    unpacked: dict[str, Any] = {}
    budget = MAX_ARRAYS  # for the whole content, as in an envelope
    for key, value in content.items():
        if isinstance(value, ArrayRecord) and PACKED in value:
            value = unpack_record(value, budget)
            budget -= len(value)
        unpacked[key] = value
    return RecordDict(unpacked), True
