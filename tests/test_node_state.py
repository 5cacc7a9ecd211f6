"""A node's state file: the rounds each site trained, kept in memory per connection while no other one writes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

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
