"""Records the inline backend fills directly behave as Flower's own."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flowerbed.in_memory_arrays import in_memory_record
from flowerbed.simulations.engine.inline_records import (
    ReplyContent,
    config_record,
    metric_record,
    reply_content,
    site_record,
)


def _records():
    return {
        "arrays": in_memory_record({"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}),
        "metrics": MetricRecord({"num-examples": 12, "train-loss": 0.25}),
        "site": site_record("alpha"),
    }


def test_reply_content_equals_flowers_record_dict_and_its_views():
    records = _records()
    fast, plain = reply_content(records), RecordDict(dict(records))
    assert isinstance(fast, ReplyContent) and fast == plain and list(fast) == list(plain)
    for view in ("array_records", "metric_records", "config_records"):
        got, expected = getattr(fast, view), getattr(plain, view)
        assert dict(got) == dict(expected) and list(got) == list(expected), view
    assert site_record("alpha") == ConfigRecord({"name": "alpha"})
    assert config_record({"run": "r", "steps": [1, 2]}) == ConfigRecord({"run": "r", "steps": [1, 2]})
    assert metric_record({"n": 3, "loss": 0.5}) == MetricRecord({"n": 3, "loss": 0.5})
    with pytest.raises(TypeError):  # not a plain number: Flower's own checks refuse it
        metric_record({"loss": "high"})


def test_reply_content_views_write_through_and_it_pickles_and_deflates_as_a_record_dict():
    fast = reply_content(_records())
    fast.metric_records["extra"] = MetricRecord({"x": 1.0})
    assert fast["extra"] == MetricRecord({"x": 1.0})
    del fast.config_records["site"]
    assert "site" not in fast
    restored = pickle.loads(pickle.dumps(fast))
    assert type(restored) is RecordDict and restored.keys() == fast.keys()
    assert restored["metrics"] == fast["metrics"]
    assert np.array_equal(restored["arrays"]["w"].numpy(), fast["arrays"]["w"].numpy())
    plain = RecordDict({"metrics": MetricRecord({"a": 1}), "arrays": ArrayRecord()})
    assert reply_content(dict(plain)).deflate() == plain.deflate()
