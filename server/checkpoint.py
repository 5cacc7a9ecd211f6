"""Atomic per-round checkpoints: a crashed coordinator resumes from its last complete round.

A checkpoint is a folder ``checkpoints/round-NNNN/`` with ``weights.safetensors``, ``state.json``
(the loop's state and the strategy's scalars), ``strategy.safetensors`` (the strategy's arrays)
and, when the run selects on validation, ``best.safetensors`` (the best global model so far):
no pickle, so resuming a run folder never executes what it holds. It is written under a temporary
name, every file and the folder fsynced, then renamed; only
then does ``checkpoints/LATEST`` (itself replaced atomically) point at it. A crash at any moment
leaves either the previous or the new checkpoint, never a half-written one.

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
import safetensors.numpy
from flwr.serverapp.strategy import Strategy

from flowerbed.exception import RunError
from flowerbed.experiment import StrategyConfig
from flowerbed.server.checkpoint_files import CheckpointFilesProcess, LinesNotAppended, write_checkpoint
from flowerbed.server.run_folder import json_line
from flowerbed.server.strategy_state import restore_strategy, strategy_state
from flowerbed.strategies.registry import build_strategy
from flowerbed.weights import load_safetensors

KEEP = 2


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


def _arrays(values: dict[str, np.ndarray], copy: bool) -> dict[str, np.ndarray]:
    return {k: np.array(v, order="C", copy=True) if copy else v for k, v in values.items()}


def snapshot(
    checkpoint: Checkpoint, *, copy: bool = True, encoded: dict[int, tuple[Any, str]] | None = None
) -> Snapshot:
    """Take ``checkpoint``'s state now (``copy``: of every array, so later changes to them do not reach it).

    ``encoded`` keeps the JSON of each record of ``state["history"]`` between snapshots of one run:
    the history only grows, and its records are not changed once in it, so a round encodes only
    its own record instead of the whole history again.

    Raises
    ------
    RunError
        If the strategy holds state that cannot be checkpointed.
    """
    meta, tensors = strategy_state(checkpoint.strategy)
    state = {"round": checkpoint.round, "strategy": meta, **checkpoint.state}
    return Snapshot(
        round=checkpoint.round,
        weights=_arrays(checkpoint.weights, copy),
        strategy=_arrays(tensors, copy),
        state=_encode_state(state, encoded).encode(),
        best=_arrays(checkpoint.best, copy) if checkpoint.best is not None else None,
    )


def _encode_state(state: dict[str, Any], encoded: dict[int, tuple[Any, str]] | None) -> str:
    """``state`` as JSON, the history last; its records' JSON is taken from ``encoded`` where it is there."""
    history = state.get("history")
    if not isinstance(history, list):
        return json.dumps(state, separators=(",", ":"))
    encoded = {} if encoded is None else encoded
    texts = []
    kept: dict[int, tuple[Any, str]] = {}
    for record in history:
        held = encoded.get(id(record))
        if held is None or held[0] is not record:
            held = (record, json_line(record))  # the text of its metrics.jsonl line
        kept[id(record)] = held
        texts.append(held[1])
    encoded.clear()
    encoded.update(kept)  # only the current history's records are kept
    rest = json.dumps({k: v for k, v in state.items() if k != "history"}, separators=(",", ":"))
    return f'{rest[:-1]}{"," if len(rest) > 2 else ""}"history":[{",".join(texts)}]}}'


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
    files = {"weights.safetensors": _safetensors(frozen.weights), "strategy.safetensors": _safetensors(frozen.strategy)}
    if frozen.best is not None:
        files["best.safetensors"] = _safetensors(frozen.best)
    files["state.json"] = frozen.state
    root, name = run_dir / "checkpoints", f"round-{frozen.round:04d}"
    if files_process is None:
        return write_checkpoint(root, name, files, KEEP, lines)
    return files_process.write(root, name, files, KEEP, lines)


def _safetensors(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes ``save_safetensors`` writes for ``arrays``."""
    return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


class CheckpointWriter:
    """Writes checkpoints on one background thread, in the order they were submitted.

    ``submit`` takes a snapshot of the checkpoint (arrays copied, state encoded) and returns once
    the checkpoint before it is durable: at most one checkpoint is being written while the caller
    goes on, so memory stays bounded and each checkpoint waits for the one before.

    Ordering guarantee: a checkpoint's ``lines`` are appended, and its ``then`` runs on the writer
    thread, only after that checkpoint is durable (files, folder and ``LATEST`` fsynced), and
    before the next checkpoint is written. So a line of ``metrics.jsonl`` never names a round whose
    checkpoint a crash could lose. The caller goes on meanwhile: while
    round ``r``'s checkpoint is written, round ``r + 1``'s training may go out, so after a crash up
    to two rounds past the latest durable checkpoint had their training sent (and charged), not
    one. Before a round's training goes out, record every sent round past ``durable_round``.

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
        self._encoded: dict[int, tuple[Any, str]] = {}  # the history's records, encoded (see ``snapshot``)

    @property
    def durable_round(self) -> int | None:
        """The round of the last checkpoint this writer made durable (None: none yet)."""
        with self._lock:
            return self._durable

    def submit(
        self,
        run_dir: Path,
        checkpoint: Checkpoint,
        then: Callable[[], object] | None = None,
        lines: Sequence[tuple[Path, dict[str, Any]]] = (),
    ) -> None:
        """Write ``checkpoint`` in the background, append ``lines``, then call ``then`` (on the writer thread).

        Each of ``lines`` is a file and a record appended to it as one JSON line (``json_line``) once
        the checkpoint is durable; a record of the checkpoint's history is encoded once for both.

        Returns once the snapshot is taken and the previous checkpoint is durable.

        Raises
        ------
        BaseException
            An earlier write's (or ``then``'s) failure; ``RunError`` if the strategy cannot be
            checkpointed; ``RuntimeError`` after ``close``.
        """
        self.check()
        frozen = snapshot(checkpoint, encoded=self._encoded)  # while the previous one is still being written
        texts = [(Path(path), (self._text(record) + "\n").encode()) for path, record in lines]
        with self._lock:
            self._lock.wait_for(lambda: self._job is None)
            self._raise_if_failed()
            if self._closed:
                raise RuntimeError("checkpoint writer is closed")
            self._job = (Path(run_dir), frozen, texts, then)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="checkpoint-writer", daemon=True)
                self._thread.start()
            self._lock.notify_all()

    def _text(self, record: dict[str, Any]) -> str:
        """``json_line(record)``, from the history's encodings when the record is one of them."""
        held = self._encoded.get(id(record))
        return held[1] if held is not None and held[0] is record else json_line(record)

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


def load_checkpoint(run_dir: Path, strategy: StrategyConfig) -> Checkpoint:
    """The newest complete checkpoint of a run folder, with the strategy rebuilt from ``strategy``.

    Raises
    ------
    RunError
        If the run folder has no complete checkpoint, or only one written by an older flowerbed.
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
    rebuilt = restore_strategy(
        build_strategy(strategy), state.pop("strategy", {}), load_safetensors(folder / "strategy.safetensors")
    )
    weights = load_safetensors(folder / "weights.safetensors")
    best = load_safetensors(folder / "best.safetensors") if (folder / "best.safetensors").is_file() else None
    return Checkpoint(round=int(state.pop("round")), weights=weights, strategy=rebuilt, state=state, best=best)
