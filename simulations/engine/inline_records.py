"""Flower records filled directly, for values whose types this package guarantees.

Flower's ``ConfigRecord`` and ``RecordDict`` check every key and value on insertion. The inline
backend builds one reply per client per round, and one privacy state per node, from values it
made itself (``str`` keys, records, a site name, release lists), where those checks cannot fail.
Filling the record's mapping directly gives the same record for a fraction of the cost
(``flowerbed.in_memory_arrays`` fills its array records the same way). Metrics that are not plain Python
numbers still go through Flower's constructor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flowerbed.flower_internals import filled, record_data, typed_view

R = TypeVar("R", ConfigRecord, MetricRecord, RecordDict)
V = TypeVar("V", ArrayRecord, MetricRecord, ConfigRecord)


def config_record(values: Mapping[str, str | int | float | list[int]]) -> ConfigRecord:
    """A ``ConfigRecord`` of the given values (strings, numbers, lists of integers)."""
    return filled(ConfigRecord(), values)


def metric_record(values: Mapping[str, int | float]) -> MetricRecord:
    """A ``MetricRecord`` of plain Python numbers; any other value goes through Flower's checks."""
    if all(type(v) is int or type(v) is float for v in values.values()):
        return filled(MetricRecord(), values)
    return MetricRecord(dict(values))


def site_record(name: str) -> ConfigRecord:
    """The ``site`` record every reply carries: ``{"name": name}``."""
    return config_record({"name": str(name)})


class ReplyContent(RecordDict):
    """A reply's ``RecordDict`` whose typed views are built without re-inserting every record.

    Flower's ``array_records``, ``metric_records`` and ``config_records`` build a fresh view on
    every access by setting each record into it, which sets it again into the ``RecordDict``
    itself; a strategy reads them several times per reply. Here the view is filled directly with
    the same records; it is the same synchronized view (writes go through to this record).
    Pickled and deflated as a plain ``RecordDict``.
    """

    def _view(self, kind: type[V]) -> Any:
        return typed_view(self, kind, {k: v for k, v in record_data(self).items() if isinstance(v, kind)})

    @property
    def array_records(self) -> Any:  # type: ignore[override]
        """Dictionary holding only ArrayRecord instances."""
        return self._view(ArrayRecord)

    @property
    def metric_records(self) -> Any:  # type: ignore[override]
        """Dictionary holding only MetricRecord instances."""
        return self._view(MetricRecord)

    @property
    def config_records(self) -> Any:  # type: ignore[override]
        """Dictionary holding only ConfigRecord instances."""
        return self._view(ConfigRecord)

    def plain(self) -> RecordDict:
        """The same records in a plain ``RecordDict``."""
        return filled(RecordDict(), record_data(self))

    def deflate(self) -> bytes:
        """Deflate as the plain ``RecordDict`` it stands for."""
        return self.plain().deflate()

    def __reduce__(self):
        """Pickle (Ray) as a plain ``RecordDict``."""
        return filled, (RecordDict(), dict(record_data(self)))


def reply_content(records: Mapping[str, ArrayRecord | MetricRecord | ConfigRecord]) -> RecordDict:
    """A reply's ``RecordDict`` of the given records, in the given key order."""
    return filled(ReplyContent(), records)
