"""The background checkpoint writer: in order, durable before ``then``, snapshots, failures never lost."""

from __future__ import annotations

import json
import signal
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from flowerbed.exception import RunError
from flowerbed.experiment import StrategyConfig
from flowerbed.server import checkpoint, checkpoint_files, run_folder
from flowerbed.server.checkpoint import Checkpoint, CheckpointWriter, latest_round, load_checkpoint, save_checkpoint
from flowerbed.server.checkpoint_files import CheckpointFilesProcess
from flowerbed.strategies.registry import build_strategy

STRATEGY = StrategyConfig(name="FedAdam")


def _checkpoint(server_round: int, history: list | None = None) -> Checkpoint:
    rng = np.random.default_rng(server_round)
    strategy = build_strategy(STRATEGY)
    strategy.m_t = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}  # the strategy's own arrays
    return Checkpoint(
        server_round,
        {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": np.arange(4, dtype=np.float32) + server_round},
        strategy,
        {
            "history": history if history is not None else [{"round": r} for r in range(1, server_round + 1)],
            "pinned_examples": {"a": 3.0},
        },
        best={"w": np.full((3, 4), float(server_round), dtype=np.float32)},
    )


def _assert_loads_as(run_dir: Path, expected: Checkpoint) -> None:
    loaded = load_checkpoint(run_dir, STRATEGY)
    assert loaded.round == expected.round and loaded.state == expected.state
    for got, want in ((loaded.weights, expected.weights), (loaded.best, expected.best)):
        assert got is not None and want is not None and got.keys() == want.keys()
        assert all(np.array_equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert all(np.array_equal(loaded.strategy.m_t[k], expected.strategy.m_t[k]) for k in expected.strategy.m_t)


def _files(run_dir: Path) -> dict[str, bytes]:
    root = run_dir / "checkpoints"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _gate(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold every background write until the returned event is set."""
    gate, save = threading.Event(), checkpoint.save_checkpoint

    def held(run_dir, state, **how):
        assert gate.wait(30)
        return save(run_dir, state, **how)

    monkeypatch.setattr(checkpoint, "save_checkpoint", held)
    return gate


def test_writes_land_in_order_and_equal_the_synchronous_ones(tmp_path: Path) -> None:
    background, synchronous = tmp_path / "background", tmp_path / "synchronous"
    background.mkdir()
    done: list[int] = []
    checkpoints = [_checkpoint(r) for r in range(1, 5)]
    with CheckpointWriter() as writer:
        for state in checkpoints:
            writer.submit(background, state, then=lambda r=state.round: done.append(r))
            save_checkpoint(synchronous, state)
    assert done == [1, 2, 3, 4] and writer.durable_round == 4
    assert latest_round(background) == 4
    assert sorted(p.name for p in (background / "checkpoints").glob("round-*")) == ["round-0003", "round-0004"]
    ours, theirs = _files(background), _files(synchronous)
    assert ours.keys() == theirs.keys()
    assert {k: v for k, v in ours.items() if "state.json" not in k} == {
        k: v for k, v in theirs.items() if "state.json" not in k
    }  # byte for byte; the background state.json holds only the history not in metrics.jsonl yet
    assert run_folder.read_metrics(background) == checkpoints[-1].state["history"]
    _assert_loads_as(background, checkpoints[-1])
    _assert_loads_as(synchronous, checkpoints[-1])  # the whole history in state.json, as older runs wrote it


def test_then_runs_once_the_checkpoint_is_durable(tmp_path: Path) -> None:
    seen: list[tuple[int | None, bool]] = []

    def then(r: int) -> None:
        folder = tmp_path / "checkpoints" / f"round-{r:04d}"
        seen.append((latest_round(tmp_path), (folder / "state.json").is_file()))

    with CheckpointWriter() as writer:
        for r in (1, 2, 3):
            writer.submit(tmp_path, _checkpoint(r), then=lambda r=r: then(r))
    assert seen == [(1, True), (2, True), (3, True)]


def test_submit_snapshots_what_the_caller_changes_afterwards(tmp_path: Path, monkeypatch) -> None:
    gate = _gate(monkeypatch)
    history = [{"round": 1, "sites": {"a": {"loss": 0.5}}}]
    state = _checkpoint(1, history)
    expected = _checkpoint(1, [{"round": 1, "sites": {"a": {"loss": 0.5}}}])
    with CheckpointWriter() as writer:
        writer.submit(tmp_path, state)
        for arrays in (state.weights, state.best, state.strategy.m_t):
            for value in arrays.values():
                value += 100.0
        history[0]["sites"]["a"]["loss"] = 9.0
        history.append({"round": 2})
        state.strategy.eta = 7.0
        gate.set()
    _assert_loads_as(tmp_path, expected)
    assert load_checkpoint(tmp_path, STRATEGY).strategy.eta == expected.strategy.eta


def test_submit_waits_for_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    gate = _gate(monkeypatch)
    with CheckpointWriter() as writer:
        writer.submit(tmp_path, _checkpoint(1))  # returns while round 1 is held
        second = threading.Thread(target=writer.submit, args=(tmp_path, _checkpoint(2)))
        second.start()
        second.join(0.2)
        assert second.is_alive(), "a second checkpoint was taken while the first was still being written"
        assert latest_round(tmp_path) is None
        gate.set()
        second.join(30)
    assert latest_round(tmp_path) == 2


def test_a_failed_write_is_raised_by_wait_submit_and_close(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    called: list[int] = []
    writer = CheckpointWriter()
    writer.submit(not_a_folder, _checkpoint(1), then=lambda: called.append(1))
    with pytest.raises(OSError) as failure:
        writer.wait()
    assert "round 1's checkpoint, while writing it" in str(failure.value.__notes__)
    with pytest.raises(OSError):
        writer.submit(tmp_path, _checkpoint(2))
    with pytest.raises(OSError):
        writer.close()
    assert called == [] and latest_round(tmp_path) is None and writer.durable_round is None


def test_the_next_submit_raises_and_writes_nothing_after_a_failure(tmp_path: Path, monkeypatch) -> None:
    save = checkpoint.save_checkpoint

    def fail_round_2(run_dir, state, **how):
        if state.round == 2:
            raise RuntimeError("disk gone")
        return save(run_dir, state, **how)

    monkeypatch.setattr(checkpoint, "save_checkpoint", fail_round_2)
    with pytest.raises(RuntimeError, match="disk gone"), CheckpointWriter() as writer:
        for r in (1, 2, 3):
            writer.submit(tmp_path, _checkpoint(r))
        pytest.fail("round 3's submit should have raised round 2's failure")
    assert latest_round(tmp_path) == 1 and writer.durable_round == 1


def test_a_failing_then_is_raised_with_its_checkpoint_durable(tmp_path: Path) -> None:
    def then() -> None:
        raise ValueError("metrics line")

    writer = CheckpointWriter()
    writer.submit(tmp_path, _checkpoint(1), then=then)
    with pytest.raises(ValueError, match="metrics line") as failure:
        writer.close()
    assert "after it was durable" in str(failure.value.__notes__)
    assert latest_round(tmp_path) == 1


def test_an_error_in_the_body_still_drains_and_carries_the_writers(tmp_path: Path, monkeypatch) -> None:
    gate = _gate(monkeypatch)
    with pytest.raises(KeyError) as failure, CheckpointWriter() as writer:
        writer.submit(tmp_path, _checkpoint(1))  # held while the body fails
        threading.Timer(0.1, gate.set).start()
        raise KeyError("round 2 failed")
    assert latest_round(tmp_path) == 1  # the completed round's checkpoint is not lost
    assert not getattr(failure.value, "__notes__", None)

    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(KeyError) as failure, CheckpointWriter() as writer:
        writer.submit(file, _checkpoint(1))
        raise KeyError("round 2 failed")
    assert "the checkpoint writer had also failed" in str(failure.value.__notes__)


def test_close_drains_and_stops_the_thread(tmp_path: Path, monkeypatch) -> None:
    gate = _gate(monkeypatch)
    writer = CheckpointWriter()
    writer.submit(tmp_path, _checkpoint(1))
    closer = threading.Thread(target=writer.close)
    closer.start()
    gate.set()
    closer.join(30)
    assert not closer.is_alive() and latest_round(tmp_path) == 1
    assert writer._thread is not None and not writer._thread.is_alive()
    assert writer._process is not None and writer._process.returncode == 0  # its child process has exited
    writer.close()  # again: nothing to do
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(tmp_path, _checkpoint(2))


def test_a_strategy_that_cannot_be_checkpointed_is_refused_at_submit(tmp_path: Path) -> None:
    state = _checkpoint(1)
    state.strategy.sites = {"a": object()}
    with CheckpointWriter() as writer, pytest.raises(RunError, match="cannot be checkpointed"):
        writer.submit(tmp_path, state)
    assert latest_round(tmp_path) is None


def test_a_long_history_lives_in_metrics_and_a_checkpoint_stays_the_same_size(tmp_path: Path) -> None:
    history: list[dict] = []
    sizes = []
    with CheckpointWriter() as writer:
        for server_round in range(1, 41):
            history.append({"round": server_round, "sites": {f"s{i}": {"loss": 0.5} for i in range(20)}})
            writer.submit(tmp_path, _checkpoint(server_round, history))
            writer.wait()
            sizes.append((tmp_path / "checkpoints" / f"round-{server_round:04d}" / "state.json").stat().st_size)
            _assert_loads_as(tmp_path, _checkpoint(server_round, list(history)))
    assert max(sizes[1:]) - min(sizes[1:]) < 10, f"state.json grows with the rounds: {sizes}"
    assert run_folder.read_metrics(tmp_path) == history

    resumed = [dict(r) for r in history]  # a resumed run's history: equal records, new objects
    (tmp_path / "metrics.jsonl").write_text("")  # resume rewrites it
    with CheckpointWriter() as writer:
        writer.resume(tmp_path, resumed)
        writer.submit(tmp_path, _checkpoint(41, [*resumed, {"round": 41}]))
    _assert_loads_as(tmp_path, _checkpoint(41, [*history, {"round": 41}]))
    assert run_folder.read_metrics(tmp_path) == [*history, {"round": 41}]


def _three_rounds(run_dir: Path) -> list[str]:
    """Rounds 1 to 3 through the writer; ``metrics.jsonl``'s lines (newline included)."""
    with CheckpointWriter() as writer:
        for server_round in (1, 2, 3):
            writer.submit(run_dir, _checkpoint(server_round))
    return (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)


def test_a_crash_before_the_rounds_line_loses_no_record(tmp_path: Path) -> None:
    """The newest checkpoint holds its own round's record: a torn or missing last line is no loss."""
    lines = _three_rounds(tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    for torn in ("", lines[2][:5]):  # round 3's line never written, or cut short
        metrics.write_text("".join(lines[:2]) + torn)
        _assert_loads_as(tmp_path, _checkpoint(3))


def test_a_checkpoint_whose_history_lines_are_gone_is_refused_by_name(tmp_path: Path) -> None:
    first, second, _ = _three_rounds(tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    for text, problem in (
        (first, "round-0003 counts 2 records there, through round 2, but it has 1, through round 1"),
        (second, "round-0003 counts 2 records there, through round 2, but it has 1, through round 2"),
        ("", "but it has none"),
        ("not json\n" + first, "metrics.jsonl, line 1: not a JSON record"),
        ("[1]\n" + first, "metrics.jsonl, line 1: not a round's record"),
        ('{"round": "1"}\n' + first, "metrics.jsonl, line 1: not a round's record"),
    ):
        metrics.write_text(text)
        with pytest.raises(RunError, match=problem) as failure:
            load_checkpoint(tmp_path, STRATEGY)
        assert "start a new run" in str(failure.value)
    metrics.unlink()
    with pytest.raises(RunError, match="but it has none"):
        load_checkpoint(tmp_path, STRATEGY)


def test_a_line_repeated_by_a_dead_runs_writer_is_skipped(tmp_path: Path) -> None:
    """A dead run's writer that appends after a restart rewrote the file repeats a round: it is left out."""
    lines = _three_rounds(tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(lines[0] + lines[1] + lines[1] + lines[0] + lines[2])  # then round 3's own line
    _assert_loads_as(tmp_path, _checkpoint(3))
    metrics.write_text(lines[0] + lines[1] + '{"round": 2, "loss": 9}\n')  # the same round, other figures
    with pytest.raises(RunError, match=r"metrics.jsonl, line 3: round 2 again, with other figures"):
        load_checkpoint(tmp_path, STRATEGY)


def test_a_checkpoint_of_a_newer_layout_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(1))
    state_file = tmp_path / "checkpoints" / "round-0001" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["layout"] == checkpoint.CHECKPOINT_LAYOUT
    state_file.write_text(json.dumps({**state, "layout": checkpoint.CHECKPOINT_LAYOUT + 1}))
    with pytest.raises(RunError, match="newer than this flowerbed's"):
        load_checkpoint(tmp_path, STRATEGY)


@pytest.mark.parametrize("counted", [True, 2, -1, "2", {"records": 2}, {"records": 1.5, "last_round": 2}])
def test_a_malformed_history_count_is_refused(tmp_path: Path, counted: object) -> None:
    _three_rounds(tmp_path)
    state_file = tmp_path / "checkpoints" / "round-0003" / "state.json"
    state = json.loads(state_file.read_text())
    state["history_in_metrics"] = counted
    state_file.write_text(json.dumps(state))
    with pytest.raises(RunError, match="history_in_metrics = .* is not valid"):
        load_checkpoint(tmp_path, STRATEGY)


def test_a_short_append_goes_on_writing(tmp_path: Path, monkeypatch) -> None:
    """``os.write`` may write part of a line (a full disk): the rest follows, or the error is raised."""
    real = checkpoint_files.os.write
    monkeypatch.setattr(checkpoint_files.os, "write", lambda fd, data: real(fd, bytes(data[:3])))
    checkpoint_files.append_lines([(tmp_path / "metrics.jsonl", b'{"round": 1}\n')])
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 1}\n'
    monkeypatch.setattr(checkpoint_files.os, "write", lambda fd, data: 0)
    with pytest.raises(OSError, match="no byte could be appended"):
        checkpoint_files.append_lines([(tmp_path / "metrics.jsonl", b'{"round": 2}\n')])


def test_one_writer_serves_one_run_folder_and_resumes_before_its_first_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with CheckpointWriter() as writer:
        writer.submit(tmp_path / "a", _checkpoint(1))
        writer.submit(tmp_path / "b" / ".." / "a", _checkpoint(2))  # the same folder
        with pytest.raises(ValueError, match="one writer per run folder"):
            writer.submit(tmp_path / "b", _checkpoint(3))
        with pytest.raises(RuntimeError, match="before its first checkpoint"):
            writer.resume(tmp_path / "a", [{"round": 1}])
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    failed = CheckpointWriter()
    failed.submit(not_a_folder, _checkpoint(1))
    with pytest.raises(OSError):
        failed.wait()
    with pytest.raises(RuntimeError, match="before its first checkpoint"):  # a failed write counts as begun
        failed.resume(tmp_path / "a", [{"round": 1}])
    with pytest.raises(OSError):
        failed.close()


def test_the_round_sent_record_is_overwritten_in_place_and_stays_readable(tmp_path: Path, monkeypatch) -> None:
    from flowerbed.server import run_folder

    long_record = {1: [f"site-{i}" for i in range(40)], 2: ["a"]}
    run_folder.note_rounds_sent(tmp_path, long_record)
    run_folder.note_rounds_sent(tmp_path, {3: ["b"]})
    assert run_folder.read_rounds_sent(tmp_path) == {3: ["b"]}
    assert (tmp_path / run_folder.ROUND_SENT).read_bytes().endswith(b"]}")  # truncated: no padding left
    run_folder.note_rounds_sent(tmp_path, long_record)

    def die(fd: int, length: int) -> None:  # the process dies between the write and the truncate
        raise KeyboardInterrupt

    monkeypatch.setattr(run_folder.os, "ftruncate", die)
    with pytest.raises(KeyboardInterrupt):
        run_folder.note_rounds_sent(tmp_path, {4: ["c"]})
    assert run_folder.read_rounds_sent(tmp_path) == {4: ["c"]}  # the old tail is blanked, the JSON reads


def test_the_files_are_written_by_the_child_process(tmp_path: Path, monkeypatch) -> None:
    """The writer's thread hands the files over: this process's own folder writer is never called."""

    def not_here(*args, **kwargs):
        raise AssertionError("the checkpoint folder was written in the training process")

    monkeypatch.setattr(checkpoint_files, "write_checkpoint_folder", not_here)
    monkeypatch.setattr(checkpoint_files, "append_lines", not_here)
    monkeypatch.setattr(checkpoint, "write_checkpoint", not_here)
    with CheckpointWriter() as writer:
        writer.submit(tmp_path, _checkpoint(1), lines=[(tmp_path / "timings.jsonl", {"round": 1, "time": 0.5})])
        writer.wait()
        assert writer._process is not None and writer._process.returncode is None
    _assert_loads_as(tmp_path, _checkpoint(1))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 1}\n'
    assert (tmp_path / "timings.jsonl").read_text() == '{"round": 1, "time": 0.5}\n'


def test_a_parent_that_dies_mid_checkpoint_leaves_nothing_half_written(tmp_path: Path) -> None:
    """The child reads a whole checkpoint before it writes: a frame cut short writes nothing, and it exits."""
    save_checkpoint(tmp_path, _checkpoint(1))
    files = CheckpointFilesProcess()
    header = json.dumps({"root": str(tmp_path / "checkpoints"), "name": "round-0002", "keep": 2,
                         "files": [["weights.safetensors", 100], ["state.json", 10]]}).encode()  # fmt: skip
    child = files._child
    assert child.stdin is not None
    child.stdin.write(struct.pack("<I", len(header)) + header + b"x" * 60)  # the parent dies 60 bytes in
    files.close()
    assert child.returncode == 0
    assert latest_round(tmp_path) == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", "round-0001"]


def test_a_frame_cut_short_in_its_lines_writes_neither_checkpoint_nor_lines(tmp_path: Path) -> None:
    files = CheckpointFilesProcess()
    metrics = tmp_path / "metrics.jsonl"
    header = json.dumps({"root": str(tmp_path / "checkpoints"), "name": "round-0001", "keep": 2,
                         "files": [["state.json", 2]], "lines": [[str(metrics), 20]]}).encode()  # fmt: skip
    child = files._child
    assert child.stdin is not None
    child.stdin.write(struct.pack("<I", len(header)) + header + b"{}" + b'{"round": 1')  # 11 of 20 bytes
    files.close()
    assert child.returncode == 0 and latest_round(tmp_path) is None and not metrics.exists()


def test_a_child_whose_parent_is_gone_commits_nothing(tmp_path: Path, monkeypatch) -> None:
    """The child writes for the parent it was started by; here it is told of another, as if orphaned."""
    monkeypatch.setattr(checkpoint_files.os, "getpid", lambda: 1)
    files = CheckpointFilesProcess()
    metrics = tmp_path / "metrics.jsonl"
    monkeypatch.undo()
    with pytest.raises(RunError, match="stopped"):
        save_checkpoint(tmp_path, _checkpoint(1), files_process=files, lines=[(metrics, b"{}\n")])
    files.close()
    assert latest_round(tmp_path) is None and not metrics.exists()
    assert not (tmp_path / "checkpoints" / "round-0001").exists()


def test_lines_wait_for_a_durable_checkpoint_and_a_failed_line_is_named_after_it(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    writer = CheckpointWriter()
    writer.submit(not_a_folder, _checkpoint(1), lines=[(metrics, {"round": 1})])
    with pytest.raises(OSError):
        writer.close()
    assert not metrics.exists(), "a line was appended for a checkpoint that was never written"

    metrics.mkdir()  # appending the history's line fails once the checkpoint is durable
    writer = CheckpointWriter()
    writer.submit(tmp_path, _checkpoint(1))
    with pytest.raises(checkpoint_files.LinesNotAppended, match="is durable") as failure:
        writer.close()
    assert "after it was durable" in str(failure.value.__notes__)
    assert latest_round(tmp_path) == 1 and writer.durable_round == 1


def test_old_checkpoints_are_pruned_by_round_number(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for server_round in (9999, 10000, 10001):
        checkpoint_files.write_checkpoint_folder(root, f"round-{server_round:04d}", {"state.json": b"{}"}, keep=2)
    assert sorted(p.name for p in root.glob("round-*")) == ["round-10000", "round-10001"]
    assert latest_round(tmp_path) == 10001


def test_a_stopped_child_process_is_a_failed_write(tmp_path: Path) -> None:
    files = CheckpointFilesProcess()
    files._child.kill()
    files._child.wait(30)
    with pytest.raises(RunError, match=r"checkpoint writer process stopped \(exit code -9\)"):
        save_checkpoint(tmp_path, _checkpoint(1), files_process=files)
    files.close()
    assert latest_round(tmp_path) is None


def test_the_childs_failure_comes_back_as_the_same_os_error(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    files = CheckpointFilesProcess()
    try:
        with pytest.raises(NotADirectoryError) as failure:
            save_checkpoint(not_a_folder, _checkpoint(1), files_process=files)
        assert failure.value.filename == str(not_a_folder / "checkpoints")
        save_checkpoint(tmp_path, _checkpoint(2), files_process=files)  # the child goes on serving
    finally:
        files.close()
    assert latest_round(tmp_path) == 2 and files.returncode == 0


def test_the_child_process_finishes_its_work_through_ctrl_c(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group: the child goes on, and its parent decides when to stop."""
    files = CheckpointFilesProcess()
    try:
        save_checkpoint(tmp_path, _checkpoint(1), files_process=files)  # it has started and set its handlers
        files._child.send_signal(signal.SIGINT)
        save_checkpoint(tmp_path, _checkpoint(2), files_process=files)
    finally:
        files.close()
    assert latest_round(tmp_path) == 2 and files.returncode == 0


def test_a_rounds_lines_are_appended_once_its_checkpoint_is_durable(tmp_path: Path, monkeypatch) -> None:
    """The metrics line follows the checkpoint; a history record is encoded once, for both."""
    gate = _gate(monkeypatch)
    encoded: list[dict] = []
    monkeypatch.setattr(checkpoint, "json_line", lambda r: encoded.append(r) or run_folder.json_line(r))
    metrics = tmp_path / "metrics.jsonl"
    history = [{"round": 1, "sites": {"b": {"loss": 0.5}, "a": {"loss": 0.25}}}]
    with CheckpointWriter() as writer:
        writer.submit(tmp_path, _checkpoint(1, history))
        assert not metrics.exists()  # the checkpoint is still being written
        gate.set()
        writer.wait()
        assert run_folder.read_metrics(tmp_path) == history and latest_round(tmp_path) == 1
    line = metrics.read_text()
    assert line == run_folder.json_line(history[0]) + "\n"
    assert line.strip() in (tmp_path / "checkpoints" / "round-0001" / "state.json").read_text()
    assert encoded == [history[0]], "the record was encoded again for its line"
