"""Atomic per-round checkpoints: a crashed coordinator resumes from its last complete round.

A checkpoint is a folder ``checkpoints/round-NNNN/`` with ``weights.safetensors``, ``state.json``
(the loop's state and the strategy's scalars), ``strategy.safetensors`` (the strategy's arrays)
and, when the run selects on validation, ``best.safetensors`` (the best global model so far):
no pickle, so resuming a run folder never executes what it holds. It is written under a temporary
name, every file and the folder fsynced, then renamed; only
then does ``checkpoints/LATEST`` (itself replaced atomically) point at it. A crash at any moment
leaves either the previous or the new checkpoint, never a half-written one.

The run's history (one record per round, each with its ``round``) is kept in the run folder's
``metrics.jsonl``, one line per record, each line fsynced before the next checkpoint is written; a
checkpoint's ``state.json`` holds only the records whose lines were not durable yet and names the
rest (``history_in_metrics``: how many records, through which round). So a checkpoint stays the
same size however long the run, and resuming needs the run folder's ``metrics.jsonl`` with it.

``CheckpointWriter`` does the same writes off the round's critical path: a background thread
hands each checkpoint's files to a child process (``checkpoint_files``) and waits for it, so the
writes' system calls do not contend with the training thread for the interpreter's lock.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from flowerbed.exception import RunError
from flowerbed.experiment import StrategyConfig
from flowerbed.server.checkpoint_files import CheckpointFilesProcess, LinesNotAppended, write_checkpoint
from flowerbed.server.run_folder import METRICS, json_line, write_metrics
from flowerbed.server.strategy_state import restore_strategy, strategy_state
from flowerbed.strategies.registry import build_strategy
from flowerbed.weights import load_safetensors, safetensors_bytes

KEEP = 2
LAYOUT = "layout"  # ``state.json``: which layout wrote it (absent: 1, the whole history in ``state.json``)
CHECKPOINT_LAYOUT = 2  # the history in ``metrics.jsonl`` (``history_in_metrics``)
HISTORY_IN_METRICS = "history_in_metrics"  # ``state.json``: {"records": n, "last_round": r} in ``metrics.jsonl``


@dataclass
class Checkpoint:
    """The state after a complete round: weights, strategy, and the loop's own state."""

    round: int
    weights: dict[str, np.ndarray]
    strategy: Strategy
    state: dict[str, Any]
    best: dict[str, np.ndarray] | None = None  # the best global model on validation so far


@dataclass(frozen=True)
class Snapshot:
    """A checkpoint ready to write: the strategy's state taken, ``state.json`` encoded, arrays owned."""

    round: int
    weights: dict[str, np.ndarray]
    strategy: dict[str, np.ndarray]  # the strategy's arrays (its scalars are in ``state``)
    state: bytes  # ``state.json``
    best: dict[str, np.ndarray] | None = None
    history_tail: tuple[str, ...] = ()  # the JSON of the history records ``state.json`` holds


def _arrays(values: dict[str, np.ndarray], copy: bool) -> dict[str, np.ndarray]:
    return {k: np.array(v, order="C", copy=True) if copy else v for k, v in values.items()}


def snapshot(checkpoint: Checkpoint, *, copy: bool = True, history_in_metrics: int = 0) -> Snapshot:
    """Take ``checkpoint``'s state now (``copy``: of every array, so later changes to them do not reach it).

    ``history_in_metrics`` leading records of ``state["history"]`` are durable in the run folder's
    ``metrics.jsonl`` already: ``state.json`` names their count and the last one's round and holds
    only the records after them (``load_checkpoint`` joins the two).

    Raises
    ------
    RunError
        If the strategy holds state that cannot be checkpointed.
    """
    meta, tensors = strategy_state(checkpoint.strategy)
    state = {LAYOUT: CHECKPOINT_LAYOUT, "round": checkpoint.round, "strategy": meta, **checkpoint.state}
    text, tail = _encode_state(state, history_in_metrics)
    return Snapshot(
        round=checkpoint.round,
        weights=_arrays(checkpoint.weights, copy),
        strategy=_arrays(tensors, copy),
        state=text.encode(),
        best=_arrays(checkpoint.best, copy) if checkpoint.best is not None else None,
        history_tail=tuple(tail),
    )


def _encode_state(state: dict[str, Any], in_metrics: int) -> tuple[str, list[str]]:
    """``state`` as JSON, the history last and only from record ``in_metrics`` on; and those records' lines."""
    history = state.get("history")
    if not isinstance(history, list):
        if in_metrics:
            raise ValueError(f"{in_metrics} history records are in metrics.jsonl, but the state has no history")
        return json.dumps(state, separators=(",", ":")), []
    if in_metrics > len(history):
        raise ValueError(f"{in_metrics} history records are in metrics.jsonl, but the history has {len(history)}")
    tail = [json_line(record) for record in history[in_metrics:]]  # each also its metrics.jsonl line
    rest = {k: v for k, v in state.items() if k != "history"}
    if in_metrics:
        last_round = history[in_metrics - 1].get("round")
        if type(last_round) is not int:
            raise ValueError(f"history record {in_metrics - 1} has no integer round: {last_round!r}")
        rest[HISTORY_IN_METRICS] = {"records": in_metrics, "last_round": last_round}
    head = json.dumps(rest, separators=(",", ":"))
    return f'{head[:-1]}{"," if len(head) > 2 else ""}"history":[{",".join(tail)}]}}', tail


def save_checkpoint(
    run_dir: Path,
    checkpoint: Checkpoint | Snapshot,
    *,
    files_process: CheckpointFilesProcess | None = None,
    lines: Sequence[tuple[Path, bytes]] = (),
) -> Path:
    """Write ``checkpoint`` atomically and point ``LATEST`` at it; keep the last ``KEEP``; then append ``lines``.

    It is durable when this returns: every file, the folder's rename and ``LATEST`` are fsynced.
    Each of ``lines`` is appended to its file only after that. ``files_process`` does the writes in
    that child process instead of this one.
    """
    frozen = checkpoint if isinstance(checkpoint, Snapshot) else snapshot(checkpoint, copy=False)
    files = {
        "weights.safetensors": safetensors_bytes(frozen.weights),
        "strategy.safetensors": safetensors_bytes(frozen.strategy),
    }
    if frozen.best is not None:
        files["best.safetensors"] = safetensors_bytes(frozen.best)
    files["state.json"] = frozen.state
    root, name = run_dir / "checkpoints", f"round-{frozen.round:04d}"
    if files_process is None:
        return write_checkpoint(root, name, files, KEEP, lines)
    return files_process.write(root, name, files, KEEP, lines)


class CheckpointWriter:
    """Writes one run folder's checkpoints on one background thread, in the order they were submitted.

    ``submit`` takes a snapshot of the checkpoint (arrays copied, state encoded) and returns once
    the checkpoint before it is durable: at most one checkpoint is being written while the caller
    goes on, so memory stays bounded and each checkpoint waits for the one before.

    The history (``state["history"]``, a list that only grows) lives in the run folder's
    ``metrics.jsonl``: each record submitted for the first time is appended there as a line once
    its checkpoint is durable, and a checkpoint's ``state.json`` holds only the records whose
    lines were not yet durable when it was taken (``snapshot``'s ``history_in_metrics``), so
    checkpoints stay the same size however long the run. A resumed run's writer starts with
    ``resume``, which rewrites ``metrics.jsonl`` from the loaded history.

    Ordering guarantee: a checkpoint's history lines and ``lines`` are appended (and fsynced), and
    its ``then`` runs on the writer thread, only after that checkpoint is durable (files, folder
    and ``LATEST`` fsynced), and before the next checkpoint is written. So a line of
    ``metrics.jsonl`` never names a round whose checkpoint a crash could lose. The caller goes on
    meanwhile: while round ``r``'s checkpoint is written, round ``r + 1``'s training may go out, so
    after a crash up to two rounds past the latest durable checkpoint had their training sent (and
    charged), not one. Before a round's training goes out, record every sent round past
    ``durable_round``.

    A failure (in the write or in ``then``) stops the writer: no later checkpoint is written, and
    ``submit``, ``check``, ``wait`` and ``close`` raise it in the caller, each time. ``close`` (or
    leaving the ``with`` block) waits for everything submitted; a writer dropped without it may lose
    its last checkpoint, as a crash would, never leave a half-written one.

    The child process starts with the writer, the thread at the first ``submit``; ``close`` stops both.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._job: tuple[Path, Snapshot, list[tuple[Path, bytes]], Callable[[], object] | None] | None = None
        self._error: BaseException | None = None
        self._durable: int | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._process = CheckpointFilesProcess()  # started now: it is ready by the first checkpoint
        self._run_dir: Path | None = None
        self._in_metrics = 0  # history records handed over for metrics.jsonl (durable before the next write)

    @property
    def durable_round(self) -> int | None:
        """The round of the last checkpoint this writer made durable (None: none yet)."""
        with self._lock:
            return self._durable

    def resume(self, run_dir: Path, history: list[dict[str, Any]]) -> None:
        """Go on with a resumed run: rewrite its ``metrics.jsonl`` from ``history`` (atomically), which later
        checkpoints then count as there.

        Raises
        ------
        RuntimeError
            After a checkpoint was submitted to this writer, or a second ``resume``.
        """
        run_dir = Path(run_dir).resolve()
        with self._lock:
            if self._run_dir is not None:
                raise RuntimeError("a checkpoint writer resumes a run before its first checkpoint")
            write_metrics(run_dir, history)
            self._run_dir, self._in_metrics = run_dir, len(history)

    def submit(
        self,
        run_dir: Path,
        checkpoint: Checkpoint,
        then: Callable[[], object] | None = None,
        lines: Sequence[tuple[Path, dict[str, Any]]] = (),
    ) -> None:
        """Write ``checkpoint`` in the background, append its new history lines and ``lines``, then call ``then``.

        Each of ``lines`` is a file and a record appended to it as one JSON line (``json_line``) once
        the checkpoint is durable, after the history's new records in ``metrics.jsonl``; ``then``
        runs on the writer thread after that.

        Returns once the snapshot is taken and the previous checkpoint is durable.

        Raises
        ------
        BaseException
            An earlier write's (or ``then``'s) failure; ``RunError`` if the strategy cannot be
            checkpointed; ``RuntimeError`` after ``close``; ``ValueError`` for a second run folder
            or a history shorter than one submitted before.
        """
        self.check()
        run_dir = Path(run_dir).resolve()
        if self._run_dir is not None and run_dir != self._run_dir:
            raise ValueError(f"this checkpoint writer writes {self._run_dir}, not {run_dir}: one writer per run folder")
        # The records handed over by earlier submits: their lines are durable before this checkpoint is
        # written, since the writer writes in order and stops at the first failure.
        in_metrics = self._in_metrics
        frozen = snapshot(checkpoint, history_in_metrics=in_metrics)  # while the previous one is still being written
        texts = [(run_dir / METRICS, f"{line}\n".encode()) for line in frozen.history_tail]
        texts += [(Path(path), f"{json_line(record)}\n".encode()) for path, record in lines]
        with self._lock:
            self._lock.wait_for(lambda: self._job is None)
            self._raise_if_failed()
            if self._closed:
                raise RuntimeError("checkpoint writer is closed")
            self._job = (run_dir, frozen, texts, then)
            self._run_dir = run_dir
            self._in_metrics = in_metrics + len(frozen.history_tail)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def check(self) -> None:
        """Raise a failure the writer has had so far, without waiting."""
        with self._lock:
            self._raise_if_failed()

    def wait(self) -> None:
        """Block until everything submitted is durable (and its ``then`` has run); raise a failure."""
        with self._lock:
            self._lock.wait_for(lambda: self._job is None)
            self._raise_if_failed()

    def close(self) -> None:
        """Wait for everything submitted, stop the thread, and raise a failure (idempotent)."""
        with self._lock:
            self._lock.wait_for(lambda: self._job is None)
            self._closed = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._process.close()
        self.check()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
            return
        try:  # the checkpoints of completed rounds still become durable; the body's error goes on
            self.close()
        except BaseException as failure:  # never hidden: noted on the error that propagates
            if failure is not exc:
                exc.add_note(f"the checkpoint writer had also failed: {failure!r}")

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while self._write_next():
            pass

    def _write_next(self) -> bool:
        """Write the next job and run its ``then``; ``False`` once closed."""
        with self._lock:
            self._lock.wait_for(lambda: self._job is not None or self._closed)
            if self._job is None:
                return False
            run_dir, frozen, lines, then = self._job
        error: BaseException | None = None
        durable = False
        try:
            try:
                save_checkpoint(run_dir, frozen, files_process=self._process, lines=lines)
            except LinesNotAppended:
                durable = True  # only the lines after it failed
                raise
            durable = True
            if then is not None:
                then()
        except BaseException as exc:  # handed to the caller by submit, check, wait and close
            stage = "after it was durable" if durable else "while writing it"
            exc.add_note(f"raised by the checkpoint writer at round {frozen.round}'s checkpoint, {stage}")
            error = exc
        with self._lock:
            if durable:
                self._durable = frozen.round
            self._error = self._error or error
            self._job = None
            self._lock.notify_all()
        return True


def latest_round(run_dir: Path) -> int | None:
    """The round of the newest complete checkpoint, or None."""
    pointer = run_dir / "checkpoints" / "LATEST"
    if not pointer.is_file():
        return None
    return int(pointer.read_text().strip().removeprefix("round-"))


def latest_state(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The newest complete checkpoint's folder and its ``state.json``, with the whole history joined.

    What ``load_checkpoint`` and ``flowerbed run resume`` check before anything else.

    Raises
    ------
    RunError
        As ``load_checkpoint``.
    """
    pointer = run_dir / "checkpoints" / "LATEST"
    if not pointer.is_file():
        raise RunError(f"{run_dir}: no checkpoint to resume from (no round has completed yet); start a new run")
    folder = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (folder / "strategy.safetensors").is_file():
        raise RunError(
            f"{folder}: written by an older flowerbed (its strategy state is a pickle, which flowerbed no longer "
            "loads); start a new run"
        )
    state = json.loads((folder / "state.json").read_text())
    layout = state.pop(LAYOUT, 1)
    if type(layout) is not int or layout > CHECKPOINT_LAYOUT:
        raise RunError(
            f"{folder / 'state.json'}: checkpoint layout {layout!r}, newer than this flowerbed's "
            f"({CHECKPOINT_LAYOUT}); resume it with the flowerbed that wrote it"
        )
    in_metrics = state.pop(HISTORY_IN_METRICS, None)
    if in_metrics is not None:
        state["history"] = _history_in_metrics(run_dir, in_metrics, folder) + state.get("history", [])
    return folder, state


def load_checkpoint(run_dir: Path, strategy: StrategyConfig) -> Checkpoint:
    """The newest complete checkpoint of a run folder, with the strategy rebuilt from ``strategy``.

    Its history is joined from two places: the records ``state.json`` counts in ``metrics.jsonl``
    (``snapshot``'s ``history_in_metrics``), then the records ``state.json`` holds itself.

    Raises
    ------
    RunError
        If the run folder has no complete checkpoint, only one written by an older flowerbed or of a
        newer layout, or a ``metrics.jsonl`` without the records the checkpoint counts there.
    """
    folder, state = latest_state(run_dir)
    rebuilt = restore_strategy(
        build_strategy(strategy), state.pop("strategy", {}), load_safetensors(folder / "strategy.safetensors")
    )
    weights = load_safetensors(folder / "weights.safetensors")
    best = load_safetensors(folder / "best.safetensors") if (folder / "best.safetensors").is_file() else None
    return Checkpoint(round=int(state.pop("round")), weights=weights, strategy=rebuilt, state=state, best=best)


def _history_in_metrics(run_dir: Path, counted: object, folder: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` that checkpoint ``folder`` counts there (``{"records", "last_round"}``).

    Records are taken by round: a line that repeats an earlier round (a dead run's writer that
    appended after a restart rewrote the file) is skipped, and the lines after ``last_round`` (the
    rounds after this checkpoint) are left.
    """
    if not (
        isinstance(counted, dict)
        and type(counted.get("records")) is int
        and type(counted.get("last_round")) is int
        and counted["records"] > 0
    ):
        raise RunError(f"{folder / 'state.json'}: {HISTORY_IN_METRICS} = {counted!r} is not valid; start a new run")
    records, last_round = counted["records"], counted["last_round"]
    path = run_dir / METRICS
    fix = "restore it from a backup of the whole run folder, or start a new run"
    try:
        lines = path.read_text().split("\n")[:-1] if path.is_file() else []  # newline-terminated
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: cannot be read ({exc}); {fix}") from None
    history: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunError(f"{path}, line {number}: not a JSON record ({exc.msg}); {fix}") from None
        server_round = record.get("round") if isinstance(record, dict) else None
        if type(server_round) is not int:
            raise RunError(f"{path}, line {number}: not a round's record (no integer round); {fix}")
        if history and server_round <= history[-1]["round"]:
            if record not in history:  # a repeated line is the same record, never another one
                raise RunError(f"{path}, line {number}: round {server_round} again, with other figures; {fix}")
            continue
        if server_round > last_round:
            break
        history.append(record)
    if len(history) != records or history[-1]["round"] != last_round:
        found = f"{len(history)}, through round {history[-1]['round']}" if history else "none"
        raise RunError(
            f"{path}: checkpoint {folder.name} counts {records} records there, through round {last_round}, "
            f"but it has {found}; {fix}"
        )
    return history
