"""The round loop's per-round files and reply checks: appended lines, torn lines, cheap finite checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from flowerbed.in_memory_arrays import InMemoryArray, in_memory_record
from flowerbed.server import run_folder
from flowerbed.server.checkpoint_files import append_lines
from flowerbed.server.reply_validation import reply_site, validate_train_reply
from flowerbed.simulations.engine.inline_grid import InlineGrid


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages need Flower's task identity, which an in-process grid sets."""
    from flowerbed.client.app import app as client_app

    InlineGrid(client_app, 1)


def _reply(arrays: ArrayRecord, examples: float = 10) -> Message:
    content = RecordDict(
        {"arrays": arrays, "metrics": MetricRecord({"num-examples": examples}), "site": ConfigRecord({"name": "a"})}
    )
    query = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    return Message(content, reply_to=query)


def test_appended_records_read_back_and_a_torn_last_line_is_ignored(tmp_path):
    records = [{"round": r, "sites": {"a": {"loss": 0.5 / r}}} for r in (1, 2, 3)]
    for record in records:
        timing = {"round": record["round"], "time": 0.1}
        lines = ((run_folder.METRICS, record), (run_folder.TIMINGS, timing))
        append_lines((tmp_path / name, (run_folder.json_line(line) + "\n").encode()) for name, line in lines)
    assert run_folder.read_metrics(tmp_path) == records
    with open(tmp_path / "metrics.jsonl", "a") as handle:  # a crash in the middle of a write
        handle.write('{"round": 4, "si')
    assert run_folder.read_metrics(tmp_path) == records
    run_folder.write_metrics(tmp_path, records[:2])  # what a resume from round 2 does
    assert run_folder.read_metrics(tmp_path) == records[:2]
    assert [t["round"] for t in run_folder.read_timings(tmp_path)] == [1, 2, 3]


def test_finite_check_catches_nan_and_inf_and_accepts_huge_finite_values():
    reference = {"w": np.zeros((3, 4), np.float64), "b": np.zeros(4, np.float32)}
    huge = np.full((3, 4), 1e308)  # the sum overflows although every value is finite
    good = ArrayRecord({"w": torch.from_numpy(huge), "b": torch.ones(4)})
    assert validate_train_reply(_reply(good), reference) is None
    for bad in (np.nan, np.inf, -np.inf):
        values = huge.copy()
        values[2, 3] = bad
        record = in_memory_record({"w": values, "b": np.ones(4, np.float32)})
        assert validate_train_reply(_reply(record), reference) == "w: contains NaN or infinite values"


def test_reply_checks_read_in_memory_arrays_without_copying_or_writing():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    array = InMemoryArray(values)
    view = array.readonly_view()
    assert np.shares_memory(view, values) and not view.flags.writeable
    record = in_memory_record({"w": values})
    message = _reply(record)
    assert validate_train_reply(message, {"w": np.zeros((3, 4), np.float32)}) is None
    assert validate_train_reply(message, {"w": np.zeros((4, 3), np.float32)}) == "w: shape (3, 4), expected (4, 3)"
    assert validate_train_reply(_reply(record, examples=0), {"w": values}).startswith("num-examples")
    assert reply_site(message, "node 1") == "a"
    assert reply_site(Message(RecordDict(), reply_to=message), "node 7") == "node 7"
