"""Flower records filled directly, for values whose types this package guarantees.

Flower's ``ConfigRecord`` and ``RecordDict`` check every key and value on insertion. The inline
backend builds one reply per client per round, and one privacy state per node, from values it
made itself (``str`` keys, records, a site name, release lists), where those checks cannot fail.
Filling the record's mapping directly gives the same record for a fraction of the cost
(``inline_arrays`` fills its array records the same way). Metrics that are not plain Python
numbers still go through Flower's constructor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.app.message.recorddict import _SyncedDict

R = TypeVar("R", ConfigRecord, MetricRecord, RecordDict)
V = TypeVar("V", ArrayRecord, MetricRecord, ConfigRecord)


def _filled(record: R, items: Mapping) -> R:
    record.__dict__["_data"].update(items)
    return record


def config_record(values: Mapping[str, str | int | float | list[int]]) -> ConfigRecord:
    """A ``ConfigRecord`` of the given values (strings, numbers, lists of integers)."""
    return _filled(ConfigRecord(), values)


def metric_record(values: Mapping[str, int | float]) -> MetricRecord:
    """A ``MetricRecord`` of plain Python numbers; any other value goes through Flower's checks."""
    if all(type(v) is int or type(v) is float for v in values.values()):
        return _filled(MetricRecord(), values)
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

    def _view(self, kind: type[V]) -> _SyncedDict[V]:
        view = _SyncedDict[kind](self, kind)  # type: ignore[valid-type]
        view.__dict__["_data"].update((k, v) for k, v in self.__dict__["_data"].items() if isinstance(v, kind))
        return view

    @property
    def array_records(self) -> _SyncedDict[ArrayRecord]:  # type: ignore[override]
        """Dictionary holding only ArrayRecord instances."""
        return self._view(ArrayRecord)

    @property
    def metric_records(self) -> _SyncedDict[MetricRecord]:  # type: ignore[override]
        """Dictionary holding only MetricRecord instances."""
        return self._view(MetricRecord)

    @property
    def config_records(self) -> _SyncedDict[ConfigRecord]:  # type: ignore[override]
        """Dictionary holding only ConfigRecord instances."""
        return self._view(ConfigRecord)

    def plain(self) -> RecordDict:
        """The same records in a plain ``RecordDict``."""
        return _filled(RecordDict(), self.__dict__["_data"])

    def deflate(self) -> bytes:
        """Deflate as the plain ``RecordDict`` it stands for."""
        return self.plain().deflate()

    def __reduce__(self):
        """Pickle (Ray) as a plain ``RecordDict``."""
        return _filled, (RecordDict(), dict(self.__dict__["_data"]))


def reply_content(records: Mapping[str, ArrayRecord | MetricRecord | ConfigRecord]) -> RecordDict:
    """A reply's ``RecordDict`` of the given records, in the given key order."""
    return _filled(ReplyContent(), records)
