"""A node's state file: the rounds each site trained, kept in memory per connection while no other one writes."""

from __future__ import annotations

import gc
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from flowerbed.client.node_state import NodeState


def test_counts_only_earlier_rounds_of_the_run_for_each_site_asked(tmp_path: Path) -> None:
    state = NodeState(tmp_path / "node-state.sqlite", power_safe=False)
    state.record("run", [("a", 1), ("b", 1), ("a", 2), ("a", 2)])  # a round noted twice counts once
    state.record("other-run", [("a", 1)])
    assert state.rounds_before("run", [("a", 3), ("a", 2), ("b", 3), ("c", 3)]) == [2, 1, 1, 0]
    many = [(f"site-{i}", 5) for i in range(1200)]  # more sites than one query takes
    state.record("run", [(site, 1) for site, _ in many[::2]])
    counts = state.rounds_before("run", many)
    assert counts == [1 if i % 2 == 0 else 0 for i in range(1200)]


def test_a_deleted_file_is_made_again_not_written_through_a_stale_connection(tmp_path: Path) -> None:
    path = tmp_path / "nodes" / "node-state.sqlite"
    NodeState(path).record("run", [("a", 1)])
    for leftover in path.parent.iterdir():  # the file, its WAL and its shared memory
        leftover.unlink()
    NodeState(path).record("run", [("b", 1)])
    assert path.exists()
    fresh = NodeState(path)
    assert fresh.rounds_before("run", [("a", 2), ("b", 2)]) == [0, 1]


def test_rounds_written_by_another_connection_are_read_again(tmp_path: Path) -> None:
    path = tmp_path / "node-state.sqlite"
    state = NodeState(path, power_safe=False)
    state.record("run", [("a", 1)])
    assert state.rounds_before("run", [("a", 9), ("b", 9)]) == [1, 0]  # read once, then kept
    state.record("run", [("a", 4), ("b", 2)])  # its own writes update what it keeps
    assert state.rounds_before("run", [("a", 4), ("a", 5), ("b", 9)]) == [1, 2, 1]
    with sqlite3.connect(path) as other:  # another writer in this process
        other.execute("INSERT INTO trained (run_id, site, round) VALUES ('run', 'a', 2)")
    assert state.rounds_before("run", [("a", 5)]) == [3]
    code = (
        "import sys; from flowerbed.client.node_state import NodeState; "
        "NodeState(sys.argv[1]).record('run', [('b', 3), ('c', 1)])"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)  # and another process
    assert state.rounds_before("run", [("a", 5), ("b", 9), ("c", 2)]) == [3, 2, 1]


def test_a_state_file_from_before_one_row_per_round_is_still_read(tmp_path: Path) -> None:
    path = tmp_path / "node-state.sqlite"
    with sqlite3.connect(path) as old:  # the layout of earlier releases: a row per site and round
        old.execute("CREATE TABLE trained (run_id TEXT, site TEXT, round INTEGER, PRIMARY KEY (run_id, site, round))")
        old.executemany("INSERT INTO trained VALUES ('run', ?, ?)", [("a", 1), ("a", 2), ("b", 1)])
    state = NodeState(path, power_safe=False)
    state.record("run", [("a", 3), ("a", 2), ("b", 3)])
    assert state.rounds_before("run", [("a", 9), ("b", 9), ("b", 2)]) == [3, 2, 1]
    assert NodeState(tmp_path / "node-state.sqlite").rounds_before("run", [("a", 9)]) == [3]  # another connection


def test_a_new_threads_connection_never_inherits_what_a_dead_one_read(tmp_path: Path) -> None:
    """Each thread keeps its own connection; what one read goes with it (no cache outlives its connection)."""
    path = tmp_path / "node-state.sqlite"
    NodeState(path).record("run", [("a", 1)])
    seen = []

    def read() -> None:
        seen.append(NodeState(path).rounds_before("run", [("a", 100)])[0])

    for number in range(2, 8):
        worker = threading.Thread(target=read)
        worker.start()
        worker.join()
        gc.collect()  # the dead thread's connection is freed: a new one may take its address
        NodeState(path).record("run", [("a", number)])  # the main thread's connection writes
    worker = threading.Thread(target=read)
    worker.start()
    worker.join()
    assert seen == list(range(1, 8))


def test_one_connection_serves_both_durability_levels_and_keeps_its_reads(tmp_path: Path) -> None:
    path = tmp_path / "node-state.sqlite"
    simulated, deployed = NodeState(path, power_safe=False), NodeState(path)
    simulated.record("run", [("a", 1)])
    assert simulated.rounds_before("run", [("a", 5)]) == [1]
    deployed.keep("run", "a", "control", 1, {"w": np.ones(2, np.float32)})  # FULL for this write only
    simulated.record("run", [("a", 2)])
    con = simulated._connect()
    assert con is deployed._connect() and con.trained is not None
    version = con.trained.version
    assert simulated.rounds_before("run", [("a", 5)]) == [2] and con.trained.version == version  # nothing re-read
    assert con.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: the last write was a simulated one
