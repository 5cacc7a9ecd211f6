"""Packed arrays: exact round trips, fewer objects, and a node that refuses a forged pack."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from flowerbed import packed_arrays
from flowerbed.flower_internals import enter_task_identity, set_message_id
from flowerbed.packed_arrays import (
    ENVELOPE,
    PACKED,
    PackError,
    envelope_bytes,
    pack_arrays,
    pack_content,
    pack_record,
    unpack_arrays,
    unpack_content,
    unpack_record,
)
from flowerbed.protocol import ErrorCode
from flowerbed.weights import npy_header

ARRAYS = {
    "fc1.weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "fc1.bias": np.array([1e-30, -0.0, np.inf], dtype=np.float64),
    "steps": np.array(5, dtype=np.int64),  # 0-d
    "mask": np.array([[True, False]]),
    "empty": np.zeros((0, 3), dtype=np.float16),
    "bytes": np.array([0, 255], dtype=np.uint8),
}


def _forged(entries: object, payload: bytes = b"", *, length: int | None = None) -> np.ndarray:
    header = entries if isinstance(entries, bytes) else json.dumps(entries).encode()
    size = len(header) if length is None else length
    return np.frombuffer(size.to_bytes(4, "little") + header + payload, dtype=np.uint8)


def test_a_record_round_trips_bit_for_bit_in_its_order() -> None:
    record = ArrayRecord({k: Array(v) for k, v in ARRAYS.items()})
    packed = pack_record(record)
    assert list(packed) == [PACKED] and packed[PACKED].dtype == "uint8"
    back = unpack_record(packed)
    assert list(back) == list(ARRAYS)
    for name, value in ARRAYS.items():
        got = back[name].numpy()
        assert got.dtype == value.dtype and got.shape == value.shape
        assert got.tobytes() == value.tobytes()
    big_endian = {"x": np.arange(3, dtype=">f4")}
    assert unpack_arrays(pack_arrays(big_endian))["x"].tolist() == [0.0, 1.0, 2.0]


def test_a_message_s_content_packs_into_fewer_records_and_back() -> None:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in ARRAYS.items()}),
            "single": ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))}),
            "config": ConfigRecord({"server-round": 2}),
            "metrics": MetricRecord({"loss": 0.5}),
        }
    )
    packed, changed = pack_content(content)
    # a small content travels as one envelope: three objects (message, record dict, envelope)
    assert changed and list(packed) == [ENVELOPE] and isinstance(packed[ENVELOPE], ConfigRecord)
    back, unpacked = unpack_content(packed)
    assert unpacked and list(back) == list(content)
    assert list(back["arrays"]) == list(ARRAYS)
    for name, value in ARRAYS.items():
        got = back["arrays"][name].numpy()
        assert got.dtype == value.dtype and got.shape == value.shape and got.tobytes() == value.tobytes()
    assert isinstance(back["single"], ArrayRecord) and back["single"]["w"].numpy().tolist() == [1, 1, 1]
    assert back["config"] == content["config"] and isinstance(back["config"], ConfigRecord)
    assert back["metrics"] == content["metrics"] and isinstance(back["metrics"], MetricRecord)
    assert unpack_content(content) == (content, False)  # nothing packed: the same object
    lone = RecordDict({"payload": ConfigRecord({"x": b"1"})})
    assert pack_content(lone) == (lone, False)  # one config record: nothing to save
    odd = RecordDict({"arrays": ArrayRecord({"a": Array(np.array(["x"])), "b": Array(np.ones(2))})})
    assert pack_content(odd) == (odd, False)  # a record that cannot be packed travels as it is
    mixed = RecordDict({"arrays": odd["arrays"], "config": ConfigRecord({"a": 1})})
    assert pack_content(mixed) == (mixed, False)
    many = RecordDict(
        {"arrays": ArrayRecord({f"w{i}": Array(np.zeros(1)) for i in range(packed_arrays.MAX_ARRAYS + 1)})}
    )
    assert pack_content(many) == (many, False)  # more arrays than a receiver reads: they travel as they are


@pytest.mark.parametrize(
    ("packed", "says"),
    [
        (np.zeros(2, dtype=np.uint8), "shorter than its header length"),
        (np.zeros(8, dtype=np.float32), "must be a numpy.ndarray of uint8"),
        (_forged([["w", "<f4", [2]]], b"\0" * 8, length=10**9), "does not fit"),
        (_forged(b"not json"), "not JSON"),
        (_forged({"w": 1}), "must be a list"),
        (_forged([["w", "|O", [1]]], b"\0" * 8), "dtype '|O' is not one of"),
        (_forged([["w", "<U4", [1]]], b"\0" * 16), "dtype '<U4' is not one of"),
        (_forged([["w", "<f4", [-1]]]), "list of at most 32 sizes >= 0"),
        (_forged([["w", "<f4", [True]]], b"\0" * 4), "list of at most 32 sizes >= 0"),
        (_forged([["w", "<f4", [1] * 33]], b"\0" * 4), "list of at most 32 sizes >= 0"),
        (_forged([["", "<f4", [1]]], b"\0" * 4), "non-empty string"),
        (_forged([[PACKED, "<f4", [1]]], b"\0" * 4), "non-empty string"),
        (_forged([["w", "<f4"]]), "must be [name, dtype, shape]"),
        (_forged([["w", "<f4", [1]], ["w", "<f4", [1]]], b"\0" * 8), "appears twice"),
        (_forged([["w", "<f4", [2**39, 2**39]]], b"\0" * 8), "is too large"),
        (_forged([["w", "<f4", [2**20, 2**20]]], b"\0" * 8), "run past the end"),
        (_forged([["w", "<f4", [3]]], b"\0" * 8), "run past the end"),
        (_forged([["w", "<f4", [1]]], b"\0" * 8), "4 bytes after the last array"),
    ],
)
def test_a_forged_pack_is_refused_with_what_is_wrong(packed: np.ndarray, says: str) -> None:
    with pytest.raises(PackError) as caught:
        unpack_record(ArrayRecord({PACKED: Array(packed)}))
    assert says in str(caught.value)


def test_a_large_content_travels_record_by_record(monkeypatch) -> None:
    monkeypatch.setattr(packed_arrays, "INLINE_BYTES", 64)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in ARRAYS.items()}),
            "single": ArrayRecord({"w": Array(np.ones(30, dtype=np.float32))}),
            "config": ConfigRecord({"server-round": 2}),
        }
    )
    packed, changed = pack_content(content)
    assert changed and list(packed) == list(content)
    assert isinstance(packed["arrays"], ArrayRecord) and list(packed["arrays"]) == [PACKED]
    assert packed["single"] is content["single"] and packed["config"] is content["config"]
    back, _ = unpack_content(packed)
    assert list(back["arrays"]) == list(ARRAYS)


def _envelope(payload: object) -> RecordDict:
    return RecordDict({ENVELOPE: ConfigRecord({ENVELOPE: payload})})


def _forged_envelope(entries: object, *parts: bytes, length: int | None = None) -> RecordDict:
    header = entries if isinstance(entries, bytes) else json.dumps(entries).encode()
    size = len(header) if length is None else length
    return _envelope(size.to_bytes(4, "little") + header + b"".join(parts))


METRICS = MetricRecord({"loss": 0.5}).deflate()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (RecordDict({ENVELOPE: ConfigRecord({ENVELOPE: b""}), "x": ConfigRecord({})}), "travels alone"),
        (RecordDict({ENVELOPE: ConfigRecord({ENVELOPE: b"", "x": 1})}), "holding only"),
        (RecordDict({ENVELOPE: MetricRecord({ENVELOPE: 1.0})}), "must be a ConfigRecord"),
        (_envelope("not bytes"), "must be bytes, not str"),
        (_envelope(b"\0\0"), "shorter than its header length"),
        (_forged_envelope([["m", "metrics", 3]], length=10**6), "does not fit"),
        (_forged_envelope(b"not json"), "not JSON"),
        (_forged_envelope({"m": 1}), "must be a list"),
        (_forged_envelope([["m", "metrics"]]), "must be [key, kind, length]"),
        (_forged_envelope([["", "metrics", 0]]), "new non-empty string"),
        (_forged_envelope([[ENVELOPE, "metrics", 0]]), "new non-empty string"),
        (
            _forged_envelope([["m", "metrics", len(METRICS)], ["m", "metrics", len(METRICS)]], METRICS, METRICS),
            "new non-empty string",
        ),
        (_forged_envelope([["m", "pickle", 0]]), "kind 'pickle' is not one of"),
        (_forged_envelope([["m", "metrics", -1]]), "runs past the end"),
        (_forged_envelope([["m", "metrics", True]]), "runs past the end"),
        (_forged_envelope([["m", "metrics", len(METRICS) + 1]], METRICS), "runs past the end"),
        (_forged_envelope([["m", "metrics", len(METRICS)]], METRICS, b"xx"), "2 bytes after"),
        (_forged_envelope([["m", "config", len(METRICS)]], METRICS), "its config do not read"),
        (_forged_envelope([["m", "metrics", 5]], b"junk!"), "its metrics do not read"),
        (_forged_envelope([["a", "arrays", 4]], b"\xff\xff\xff\xff"), "record 'a': header length"),
    ],
)
def test_a_forged_envelope_is_refused_with_what_is_wrong(content: RecordDict, says: str) -> None:
    with pytest.raises(PackError) as caught:
        unpack_content(content)
    assert says in str(caught.value)
    assert len(str(caught.value)) < 400


def test_an_envelope_holds_exactly_what_was_packed() -> None:
    content = RecordDict({"config": ConfigRecord({"a": 1, "b": b"x", "c": [1.5]}), "metrics": MetricRecord({"n": 3})})
    packed, _ = pack_content(content)
    assert packed[ENVELOPE][ENVELOPE] == envelope_bytes(content)
    back, _ = unpack_content(packed)
    assert dict(back["config"]) == {"a": 1, "b": b"x", "c": [1.5]} and dict(back["metrics"]) == {"n": 3}


def test_a_packed_record_holds_nothing_else() -> None:
    record = ArrayRecord({PACKED: Array(pack_arrays({"w": np.ones(2)})), "x": Array(np.ones(1))})
    with pytest.raises(PackError, match="holds only"):
        unpack_record(record)


def _train_message(content: RecordDict) -> Message:
    enter_task_identity(1, 1)
    return Message(content, dst_node_id=1, message_type="train")


@pytest.mark.parametrize("inline", [False, True])
def test_the_node_refuses_a_forged_pack_before_any_handler_runs(inline: bool) -> None:
    """The coordinator (the attacker here) sends arrays whose header lies about their size."""
    from flowerbed.client.handlers import packed_arrays_mod

    forged = _forged([["fc1.weight", "<f4", [1000]]], b"\0" * 8)
    if inline:
        content = _forged_envelope([["arrays", "arrays", forged.nbytes]], forged.tobytes())
    else:
        content = RecordDict({"arrays": ArrayRecord({PACKED: Array(forged)})})
    message = _train_message(content)
    called: list[Message] = []
    context = Context(run_id=1, node_id=1, node_config={"site": "hungary"}, state=RecordDict(), run_config={})
    reply = packed_arrays_mod(message, context, lambda m, c: called.append(m) or m)
    assert called == []
    assert reply.has_error() and reply.error.code == int(ErrorCode.NODE_ERROR)
    assert reply.error.reason.startswith("node hungary: the server's arrays do not unpack")


def test_the_node_unpacks_a_request_and_packs_its_reply() -> None:
    from flowerbed.client.handlers import packed_arrays_mod

    packed, _ = pack_content(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in ARRAYS.items()})}))
    message = _train_message(packed)
    seen: list[list[str]] = []

    def handler(m: Message, c: Context) -> Message:
        seen.append(list(m.content["arrays"]))
        return Message(RecordDict({"arrays": m.content["arrays"], "metrics": MetricRecord({"n": 1})}), reply_to=m)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = packed_arrays_mod(message, context, handler)
    assert seen == [list(ARRAYS)]
    assert list(reply.content) == [ENVELOPE]
    unpacked = _train_message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in ARRAYS.items()})}))
    plain = packed_arrays_mod(unpacked, context, handler)  # an unpacked request gets an unpacked reply
    assert list(plain.content["arrays"]) == list(ARRAYS)


class _Grid:
    """A deployment grid's surface: push, then pull the replies a node would send."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.pushed: list[list[str]] = []
        self.replies: list[Message] = []

    def push_messages(self, messages):
        self.pushed = [list(m.content) for m in messages]
        ids = []
        for i, m in enumerate(messages):
            set_message_id(m, f"m{i}")
            ids.append(f"m{i}")
            self.replies.append(self.answer(m))
        return ids

    def pull_messages(self, ids):
        out, self.replies = self.replies, []
        return out


def test_the_coordinator_packs_what_it_sends_and_unpacks_what_comes_back(monkeypatch) -> None:
    from flowerbed import flower_internals
    from flowerbed.server import exchange

    monkeypatch.setattr(flower_internals, "is_network_grid", lambda grid: True)
    arrays = ArrayRecord({k: Array(v) for k, v in ARRAYS.items()})

    def honest(m: Message) -> Message:
        content, _ = unpack_content(m.content)
        reply, _ = pack_content(RecordDict({"arrays": content["arrays"]}))
        return Message(reply, reply_to=m)

    message = _train_message(RecordDict({"arrays": arrays}))
    grid = _Grid(honest)
    (reply,) = exchange.send_and_receive(grid, [message], timeout=5)
    assert grid.pushed == [[ENVELOPE]]  # one record on the wire
    assert list(message.content["arrays"]) == list(ARRAYS)  # the caller's message is untouched
    assert list(reply.content["arrays"]) == list(ARRAYS)

    def forger(m: Message) -> Message:
        bad = _forged([["fc1.weight", "<f4", [99]]])
        return Message(RecordDict({"arrays": ArrayRecord({PACKED: Array(bad)})}), reply_to=m)

    def inline_forger(m: Message) -> Message:
        bad = _forged([["fc1.weight", "<f4", [99]]]).tobytes()
        return Message(_forged_envelope([["arrays", "arrays", len(bad)]], bad), reply_to=m)

    for attacker in (forger, inline_forger):
        (refused,) = exchange.send_and_receive(_Grid(attacker), [_train_message(RecordDict({"arrays": arrays}))], 5)
        assert refused.has_error() and refused.error.code == int(ErrorCode.NODE_ERROR)
        assert "its reply's arrays do not unpack" in refused.error.reason


def test_in_process_grids_never_pack() -> None:
    from flowerbed import flower_internals

    assert flower_internals.is_network_grid(SimpleNamespace()) is False


def test_flowers_deployment_grid_is_recognised() -> None:
    from flwr.superlink.grid.http_grid import HttpGrid  # where Flower keeps it: the test fails if it moves

    from flowerbed import flower_internals

    assert flower_internals.is_network_grid(object.__new__(HttpGrid)) is True
    assert flower_internals.is_network_grid(SimpleNamespace()) is False


def _npy(shape: tuple[int, ...], payload: bytes = b"") -> bytes:
    import io

    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(stream, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return stream.getvalue() + payload


@pytest.mark.parametrize(
    ("array", "says"),
    [
        (Array(_forged(b"[" * 1000, length=1000)), "not JSON"),  # nesting deeper than the parser's stack
        (Array(_forged([["w", [], [1]]], b"\0" * 4)), "dtype [] is not one of"),
        (Array(_forged([["w", {}, [1]]], b"\0" * 4)), "dtype {} is not one of"),
        (Array(_forged([["w", "<f4", [0, 2**32, 2**32]]])), "is too large"),
        (Array(dtype="uint8", shape=(4,), stype="torch", data=b"\0" * 4), "must be a numpy.ndarray of uint8"),
        (Array(dtype="uint8", shape=(0,), stype="numpy.ndarray", data=b""), ".npy header does not read"),
        (Array(dtype="uint8", shape=(4,), stype="numpy.ndarray", data=b"PK\x03\x04" + b"\0" * 60), "does not read"),
        (Array(dtype="uint8", shape=(7,), stype="numpy.ndarray", data=b"garbage"), "does not read"),
        (Array(dtype="uint8", shape=(2**45,), stype="numpy.ndarray", data=_npy((2**45,))), "of its own length"),
        (Array(dtype="uint8", shape=(3,), stype="numpy.ndarray", data=_npy((3,), b"\0\0\0\0")), "of its own length"),
    ],
)
def test_hostile_bytes_never_escape_as_anything_but_a_refusal(array: Array, says: str) -> None:
    """Inputs an attacker tried against the first version (each escaped as another exception, or allocated)."""
    with pytest.raises(PackError) as caught:
        unpack_record(ArrayRecord({PACKED: array}))
    assert says in str(caught.value)
    assert len(str(caught.value)) < 400


def test_a_long_forged_name_is_cut_in_the_refusal() -> None:
    name = "x" * 500_000
    with pytest.raises(PackError) as caught:
        unpack_arrays(_forged([[name, "<f4", [1]], [name, "<f4", [1]]], b"\0" * 8))
    assert "appears twice" in str(caught.value) and len(str(caught.value)) < 200


def test_one_broken_node_never_costs_the_round_its_other_replies(monkeypatch) -> None:
    from flowerbed import flower_internals
    from flowerbed.server import exchange

    monkeypatch.setattr(flower_internals, "is_network_grid", lambda grid: True)
    arrays = ArrayRecord({k: Array(v) for k, v in ARRAYS.items()})
    torch_like = Array(dtype="uint8", shape=(4,), stype="torch", data=b"\0" * 4)

    def answer(m: Message) -> Message:
        if m.metadata.dst_node_id == 2:  # the malicious node
            return Message(RecordDict({"arrays": ArrayRecord({PACKED: torch_like})}), reply_to=m)
        content, _ = unpack_content(m.content)
        packed, _ = pack_content(RecordDict({"arrays": content["arrays"]}))
        return Message(packed, reply_to=m)

    enter_task_identity(1, 1)
    messages = [Message(RecordDict({"arrays": arrays}), dst_node_id=n, message_type="train") for n in (1, 2, 3)]
    replies = exchange.send_and_receive(_Grid(answer), messages, timeout=5)
    assert [r.has_error() for r in replies] == [False, True, False]
    assert "do not unpack" in replies[1].error.reason

    class Refusing(_Grid):
        def push_messages(self, messages):  # Flower's grid returns no ids when the SuperLink refuses a push
            return []

    assert exchange.send_and_receive(Refusing(answer), messages, timeout=1) == []


def test_a_train_reply_whose_bytes_are_no_array_is_refused_not_raised() -> None:
    from flowerbed.server.reply_validation import validate_train_reply

    reference = {"w": np.zeros(3, dtype=np.float32)}
    garbage = Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"garbage")
    enter_task_identity(1, 1)
    reply = Message(
        RecordDict({"arrays": ArrayRecord({"w": garbage}), "metrics": MetricRecord({"num-examples": 5})}),
        dst_node_id=1,
        message_type="train",
    )
    assert validate_train_reply(reply, reference) == "its arrays do not read (ValueError)"


def test_mutated_envelopes_are_read_or_refused_never_raised() -> None:
    """Bytes flipped, cut or repeated anywhere in a real envelope: a PackError or a content, nothing else."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in ARRAYS.items()}),
            "config": ConfigRecord({"server-round": 2, "blob": b"\x00\x01", "names": ["a", "b"]}),
            "metrics": MetricRecord({"loss": 0.5, "n": 3}),
        }
    )
    good = envelope_bytes(content)
    rng = np.random.default_rng(0)
    refused = 0
    for _ in range(400):
        data = bytearray(good)
        cut = int(rng.integers(len(data)))
        match int(rng.integers(3)):
            case 0:
                data[cut] ^= 1 << int(rng.integers(8))
            case 1:
                data = data[:cut]
            case _:
                data = data[:cut] + data[cut : cut + int(rng.integers(1, 64))] + data[cut:]
        try:
            unpack_content(_envelope(bytes(data)))
        except PackError:
            refused += 1
    assert refused > 200  # most mutations break a length or a parser; the rest read as some content


def _many_zero_size_arrays(count: int) -> bytes:
    header = json.dumps([[f"{i:x}", "|u1", [0]] for i in range(count)]).encode()
    return len(header).to_bytes(4, "little") + header


def test_a_content_of_too_many_arrays_is_refused_before_they_are_built() -> None:
    """A node's reply (or the coordinator's message) claiming many cheap arrays: each would cost the reader."""
    record = _many_zero_size_arrays(3000)
    entries = [[f"r{j}", "arrays", len(record)] for j in range(2)]
    with pytest.raises(PackError, match="at most 1096 entries"):
        unpack_content(_forged_envelope(entries, record, record))
    packed = {f"r{j}": ArrayRecord({PACKED: Array(np.frombuffer(record, dtype=np.uint8))}) for j in range(2)}
    with pytest.raises(PackError, match="at most 1096 entries"):
        unpack_content(RecordDict(packed))
    with pytest.raises(PackError, match="more than a sender puts in one"):
        unpack_content(_envelope(b"\0" * (packed_arrays.INLINE_BYTES + 1)))


def test_the_sender_keeps_within_what_the_receiver_reads() -> None:
    records = {name: ArrayRecord({f"w{i}": Array(np.zeros(1)) for i in range(3000)}) for name in ("arrays", "control")}
    content = RecordDict(records)
    packed, changed = pack_content(content)
    assert changed and list(packed["arrays"]) == [PACKED] and packed["control"] is content["control"]
    back, _ = unpack_content(packed)
    assert len(back["arrays"]) == len(back["control"]) == 3000


@pytest.mark.parametrize(
    "header",
    [
        "{'descr':'|u1','fortran_order':False,'shape':(%s1,)}" % ("-" * 3000),  # RecursionError in ast
        "{'descr':'|u1','fortran_order':False,'shape':(1,)} '''",  # a tokenizer error
        "{'descr':'|u1','fortran_order':False,'shape':(%s)}" % ("1," * 3000),  # a long shape to echo
    ],
)
def test_a_hostile_npy_header_is_a_refusal_of_reasonable_length(header: str) -> None:
    raw = header.encode("latin1") + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(raw).to_bytes(2, "little") + raw + b"\0"
    array = Array(dtype="uint8", shape=(1,), stype="numpy.ndarray", data=npy)
    with pytest.raises(PackError) as caught:
        unpack_content(RecordDict({"a": ArrayRecord({PACKED: array})}))
    assert len(str(caught.value)) < 400
    if "1,1," not in header:  # numpy's reader fails on the other two: only ever as a ValueError
        with pytest.raises(ValueError):
            npy_header(npy)
