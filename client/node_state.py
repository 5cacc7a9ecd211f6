"""What a node remembers between the rounds of a run besides its ledger.

Which rounds each site trained (a row per round, listing its sites), and arrays a site keeps from
round to round: its SCAFFOLD control variate, its personal parameters (personalized federated
learning).

A site that trains in ``train.local_steps`` continues its own iterator from round to round; where
it stands is ``local_steps x`` the rounds of this run it trained before the current one. The node
records a round after training it and before replying (like a ledger charge), so a round that is
run again after a crash takes the same batches, and a resumed run goes on where it stopped. A
thread's connection reads a run's trained rounds once and keeps them with its own writes; after
another connection wrote to the file (SQLite's ``data_version``), it reads only the rows appended
since.

Kept arrays are stored per round they were made in: a round reads the newest ones from an earlier
round, so a round run again (a resumed coordinator) starts from the same state and writes the same
result.

A deployed node keeps ``node-state.sqlite`` in its state folder (``state`` in its config, set by
``flowerbed node start``); a simulated one beside its ledger (``FLOWERBED_SIM_NODE_DIR``). Every
write is committed before the reply. A deployed node's survives a power cut (``synchronous=FULL``:
an fsync per commit); a simulated node's survives its process being killed, which is what a
resumed simulation needs (``power_safe=False``: ``synchronous=NORMAL`` in WAL mode, no fsync per
commit).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.numpy

from flowerbed.exception import NodeError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trained (
    run_id TEXT NOT NULL,
    site TEXT NOT NULL,
    round INTEGER NOT NULL,
    PRIMARY KEY (run_id, site, round)
);
CREATE TABLE IF NOT EXISTS trained_sites (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    sites TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS trained_sites_run ON trained_sites (run_id);
CREATE TABLE IF NOT EXISTS kept (
    run_id TEXT NOT NULL,
    site TEXT NOT NULL,
    kind TEXT NOT NULL,
    round INTEGER NOT NULL,
    arrays BLOB NOT NULL,
    PRIMARY KEY (run_id, site, kind, round)
);
"""


_OPEN = threading.local()  # this thread's open connections: {path: (pid, file id, connection)}
_KEEP_OPEN = 16  # per thread; the least recently used is closed beyond that


def _file_id(path: Path) -> tuple[int, int]:
    """The file at ``path`` (device, inode); ``(-1, -1)`` when there is none."""
    try:
        stat = os.stat(path)
    except OSError:
        return (-1, -1)
    return (stat.st_dev, stat.st_ino)


def _note(rounds: list[int], number: int) -> None:
    """Add ``number`` to a sorted list of distinct rounds."""
    at = bisect_left(rounds, number)
    if at == len(rounds) or rounds[at] != number:
        rounds.insert(at, number)


def _note_sites(trained: dict[str, list[int]], sites: Iterable[str], number: int) -> None:
    """Add round ``number`` to each of ``sites`` (a ``trained_sites`` row's list)."""
    for site in sites:
        _note(trained.setdefault(site, []), int(number))


def _read_earlier_layout(con: sqlite3.Connection, run_id: str, trained: dict[str, list[int]]) -> None:
    """Add a run's rows of the ``trained`` table (a row per site and round) to ``trained``."""
    for site, number in con.execute("SELECT site, round FROM trained WHERE run_id = ?", (run_id,)):
        _note(trained.setdefault(site, []), int(number))


@dataclass
class _Trained:
    """A connection's copy of the trained rounds: valid at ``version``, rows up to ``last_id`` read."""

    version: int
    last_id: int
    runs: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # run: site: sorted rounds


class _Connection(sqlite3.Connection):
    """A kept connection with what it knows of its file; both go when the connection goes."""

    power_safe: bool | None = None  # the ``synchronous`` level its writes were last made at
    trained: _Trained | None = None


class NodeState:
    """The rounds each site of this node trained and the arrays it keeps, per run (a SQLite file)."""

    def __init__(self, path: str | Path, *, power_safe: bool = True) -> None:
        self.path = Path(path).expanduser()
        self.power_safe = power_safe
        try:
            self._connect()
        except (OSError, sqlite3.Error) as exc:
            raise NodeError(
                f"node state {self.path}: cannot open ({exc}); give the node a writable state folder"
            ) from None

    def _connect(self) -> _Connection:
        """This thread's connection to the file (opened, and the schema made, once; a forked child opens its own).

        Kept open: closing the last connection to a WAL database checkpoints it, an fsync every time.
        It is opened again when the file at the path is no longer the one it was opened on (deleted
        or replaced). One connection per file, whatever ``power_safe`` (``_writer`` sets the level
        of each write): a second connection's writes would invalidate what the first has read.
        ``with`` on it commits.
        """
        held: OrderedDict[Path, tuple[int, tuple[int, int], _Connection]]
        held = _OPEN.__dict__.setdefault("connections", OrderedDict())
        found = held.pop(self.path, None)
        if found is not None:
            if found[0] == os.getpid() and found[1] == _file_id(self.path):
                held[self.path] = found  # the most recently used, last
                return found[2]
            if found[0] == os.getpid():
                found[2].close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=60.0, factory=_Connection)
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(_SCHEMA)
        held[self.path] = (os.getpid(), _file_id(self.path), con)
        while len(held) > _KEEP_OPEN:
            pid, _, oldest = held.popitem(last=False)[1]
            if pid == os.getpid():
                oldest.close()
        return con

    def _writer(self) -> _Connection:
        """The connection, set to commit at this object's level (``synchronous=FULL`` when power-safe)."""
        con = self._connect()
        if con.power_safe is not self.power_safe:
            con.execute(f"PRAGMA synchronous={'FULL' if self.power_safe else 'NORMAL'}")
            con.power_safe = self.power_safe
        return con

    def rounds_before(self, run_id: str, rounds: Iterable[tuple[str, int]]) -> list[int]:
        """For each (site, round): how many earlier rounds of ``run_id`` that site trained."""
        trained = self._trained(self._connect(), run_id)
        return [bisect_left(trained.get(str(site), ()), int(number)) for site, number in rounds]

    def record(self, run_id: str, rounds: Iterable[tuple[str, int]]) -> None:
        """Note that each (site, round) was trained (durably; a round noted twice counts once).

        One row per round lists its sites: a cohort's round is one small append, not a row per
        site in a growing index (which made SQLite write and checkpoint many pages a round).
        """
        by_round: dict[int, list[str]] = {}
        for site, number in rounds:
            by_round.setdefault(int(number), []).append(str(site))
        with self._writer() as con:
            con.executemany(
                "INSERT INTO trained_sites (run_id, round, sites) VALUES (?, ?, ?)",
                [(run_id, number, json.dumps(sites)) for number, sites in by_round.items()],
            )
        trained = con.trained.runs.get(run_id) if con.trained is not None else None
        if trained is not None:
            for number, sites in by_round.items():
                _note_sites(trained, sites, number)

    @staticmethod
    def _trained(con: _Connection, run_id: str) -> dict[str, list[int]]:
        """Each site's trained rounds of ``run_id``, sorted.

        A run is read once per connection; after another connection (or process) wrote to the file
        (SQLite's ``data_version`` moved), only the rows appended since are read (and the run's rows
        of the earlier layout, which only earlier releases write).
        """
        (version,) = con.execute("PRAGMA data_version").fetchone()  # before the rows it vouches for
        kept = con.trained
        if kept is None:
            (last,) = con.execute("SELECT COALESCE(MAX(id), 0) FROM trained_sites").fetchone()
            kept = con.trained = _Trained(version, int(last))
        elif kept.version != version:
            for row_id, run, number, sites in con.execute(
                "SELECT id, run_id, round, sites FROM trained_sites WHERE id > ? ORDER BY id", (kept.last_id,)
            ):
                if run in kept.runs:  # a run not read yet is read whole when asked for
                    _note_sites(kept.runs[run], json.loads(sites), number)
                kept.last_id = max(kept.last_id, int(row_id))
            for run, held in kept.runs.items():  # a writer of the earlier layout (empty in new files)
                _read_earlier_layout(con, run, held)
            kept.version = version
        if run_id not in kept.runs:
            trained: dict[str, list[int]] = {}
            _read_earlier_layout(con, run_id, trained)  # a file written before ``trained_sites``
            for number, sites in con.execute("SELECT round, sites FROM trained_sites WHERE run_id = ?", (run_id,)):
                _note_sites(trained, json.loads(sites), number)
            kept.runs[run_id] = trained
        return kept.runs[run_id]

    def kept_before(self, run_id: str, site: str, kind: str, server_round: int) -> dict[str, np.ndarray] | None:
        """The site's newest ``kind`` arrays (``control``, ``personal``) from a round before ``server_round``."""
        with self._connect() as con:
            row = con.execute(
                "SELECT arrays FROM kept WHERE run_id = ? AND site = ? AND kind = ? AND round < ? "
                "ORDER BY round DESC LIMIT 1",
                (run_id, site, kind, int(server_round)),
            ).fetchone()
        return None if row is None else safetensors.numpy.load(bytes(row[0]))

    def keep(self, run_id: str, site: str, kind: str, server_round: int, arrays: dict[str, np.ndarray]) -> None:
        """Keep the ``kind`` arrays a round made (durably; the same round again replaces them)."""
        data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        with self._writer() as con:
            con.execute(
                "INSERT OR REPLACE INTO kept (run_id, site, kind, round, arrays) VALUES (?, ?, ?, ?, ?)",
                (run_id, site, kind, int(server_round), data),
            )
