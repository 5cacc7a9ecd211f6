"""What a node remembers between the rounds of a run besides its ledger: which rounds it trained.

A site that trains in ``train.local_steps`` continues its own iterator from round to round; where
it stands is ``local_steps x`` the rounds of this run it trained before the current one. The node
records a round after training it and before replying (like a ledger charge), so a round that is
run again after a crash takes the same batches, and a resumed run goes on where it stopped.

A deployed node keeps ``node-state.sqlite`` in its state folder (``state`` in its config, set by
``flowerbed node start``); a simulated one beside its ledger (``FLOWERBED_SIM_NODE_DIR``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from flowerbed.exception import NodeError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trained (
    run_id TEXT NOT NULL,
    site TEXT NOT NULL,
    round INTEGER NOT NULL,
    PRIMARY KEY (run_id, site, round)
);
"""


class NodeState:
    """The rounds each site of this node trained, per run (a SQLite file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                con.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise NodeError(
                f"node state {self.path}: cannot open ({exc}); give the node a writable state folder"
            ) from None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60.0)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        return con

    def rounds_before(self, run_id: str, rounds: Iterable[tuple[str, int]]) -> list[int]:
        """For each (site, round): how many earlier rounds of ``run_id`` that site trained."""
        wanted = list(rounds)
        with self._connect() as con:
            done: dict[str, list[int]] = {}
            for site, number in con.execute("SELECT site, round FROM trained WHERE run_id = ?", (run_id,)):
                done.setdefault(site, []).append(int(number))
        return [sum(1 for r in done.get(site, ()) if r < number) for site, number in wanted]

    def record(self, run_id: str, rounds: Iterable[tuple[str, int]]) -> None:
        """Note that each (site, round) was trained (durably; a round noted twice counts once)."""
        with self._connect() as con:
            con.executemany(
                "INSERT OR IGNORE INTO trained (run_id, site, round) VALUES (?, ?, ?)",
                [(run_id, site, int(number)) for site, number in rounds],
            )
