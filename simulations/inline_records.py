"""Flower records filled directly, for values whose types this package guarantees.

Flower's ``ConfigRecord`` and ``RecordDict`` check every key and value on insertion. The inline
backend builds one reply per client per round, and one privacy state per node, from values it
made itself (``str`` keys, records, a site name, release lists), where those checks cannot fail.
Filling the record's mapping directly gives the same record for a fraction of the cost
(``inline_arrays`` fills its array records the same way). Anything computed by a task (metrics)
still goes through Flower's constructors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

R = TypeVar("R", ConfigRecord, RecordDict)


def _filled(record: R, items: Mapping) -> R:
    record.__dict__["_data"].update(items)
    return record


def config_record(values: Mapping[str, str | int | float | list[int]]) -> ConfigRecord:
    """A ``ConfigRecord`` of the given values (strings, numbers, lists of integers)."""
    return _filled(ConfigRecord(), values)


def site_record(name: str) -> ConfigRecord:
    """The ``site`` record every reply carries: ``{"name": name}``."""
    return config_record({"name": str(name)})


def reply_content(records: Mapping[str, ArrayRecord | MetricRecord | ConfigRecord]) -> RecordDict:
    """A ``RecordDict`` of the given records, in the given key order."""
    return _filled(RecordDict(), records)
