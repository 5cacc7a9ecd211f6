"""What a node remembers between the rounds of a run besides its ledger.

Which rounds each site trained (a row per round, listing its sites), and arrays a site keeps from
round to round: its SCAFFOLD control variate, its personal parameters (personalized federated
learning).

A site that trains in ``train.local_steps`` continues its own iterator from round to round; where
it stands is ``local_steps x`` the rounds of this run it trained before the current one. The node
records a round after training it and before replying (like a ledger charge), so a round that is
run again after a crash takes the same batches, and a resumed run goes on where it stopped. A
connection reads a run's trained rounds once and keeps them, with its own writes, while no other
connection writes to the file (SQLite's ``data_version``).

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


_OPEN = threading.local()  # this thread's open connections: {(path, power_safe): (pid, file id, connection)}
# id(connection): (its data_version when read, {run: {site: trained rounds}})
_TRAINED: dict[int, tuple[int, dict[str, dict[str, list[int]]]]] = {}
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

    def _connect(self) -> sqlite3.Connection:
        """This thread's connection to the file (opened, and the schema made, once; a forked child opens its own).

        Kept open: closing the last connection to a WAL database checkpoints it, an fsync every time.
        It is opened again when the file at the path is no longer the one it was opened on (deleted
        or replaced). ``with`` on it commits.
        """
        held: OrderedDict[tuple[Path, bool], tuple[int, tuple[int, int], sqlite3.Connection]]
        held = _OPEN.__dict__.setdefault("connections", OrderedDict())
        key = (self.path, self.power_safe)
        found = held.pop(key, None)
        if found is not None:
            if found[0] == os.getpid() and found[1] == _file_id(self.path):
                held[key] = found  # the most recently used, last
                return found[2]
            _TRAINED.pop(id(found[2]), None)
            if found[0] == os.getpid():
                found[2].close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=60.0)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(f"PRAGMA synchronous={'FULL' if self.power_safe else 'NORMAL'}")
        con.executescript(_SCHEMA)
        held[key] = (os.getpid(), _file_id(self.path), con)
        while len(held) > _KEEP_OPEN:
            pid, _, oldest = held.popitem(last=False)[1]
            _TRAINED.pop(id(oldest), None)
            if pid == os.getpid():
                oldest.close()
        return con

    def rounds_before(self, run_id: str, rounds: Iterable[tuple[str, int]]) -> list[int]:
        """For each (site, round): how many earlier rounds of ``run_id`` that site trained."""
        trained = self._trained(self._connect(), run_id)
        return [bisect_left(trained.get(site, ()), int(number)) for site, number in rounds]

    def record(self, run_id: str, rounds: Iterable[tuple[str, int]]) -> None:
        """Note that each (site, round) was trained (durably; a round noted twice counts once).

        One row per round lists its sites: a cohort's round is one small append, not a row per
        site in a growing index (which made SQLite write and checkpoint many pages a round).
        """
        by_round: dict[int, list[str]] = {}
        for site, number in rounds:
            by_round.setdefault(int(number), []).append(str(site))
        with self._connect() as con:
            con.executemany(
                "INSERT INTO trained_sites (run_id, round, sites) VALUES (?, ?, ?)",
                [(run_id, number, json.dumps(sites)) for number, sites in by_round.items()],
            )
        kept = _TRAINED.get(id(con))
        if kept is not None and run_id in kept[1]:
            trained = kept[1][run_id]
            for number, sites in by_round.items():
                for site in sites:
                    _note(trained.setdefault(site, []), number)

    @staticmethod
    def _trained(con: sqlite3.Connection, run_id: str) -> dict[str, list[int]]:
        """Each site's trained rounds of ``run_id``, sorted: read once, again only after another connection wrote."""
        (version,) = con.execute("PRAGMA data_version").fetchone()
        kept = _TRAINED.get(id(con))
        if kept is None or kept[0] != version:
            kept = _TRAINED[id(con)] = (version, {})
        runs = kept[1]
        if run_id not in runs:
            trained: dict[str, list[int]] = {}
            for site, number in con.execute("SELECT site, round FROM trained WHERE run_id = ?", (run_id,)):
                _note(trained.setdefault(site, []), int(number))  # a file written before ``trained_sites``
            for number, sites in con.execute("SELECT round, sites FROM trained_sites WHERE run_id = ?", (run_id,)):
                for site in json.loads(sites):
                    _note(trained.setdefault(site, []), int(number))
            runs[run_id] = trained
        return runs[run_id]

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
        with self._connect() as con:
            con.execute(
                "INSERT OR REPLACE INTO kept (run_id, site, kind, round, arrays) VALUES (?, ?, ?, ?, ?)",
                (run_id, site, kind, int(server_round), data),
            )
