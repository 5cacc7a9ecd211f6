"""Atomic per-round checkpoints: a crashed coordinator resumes from its last complete round.

A checkpoint is a folder ``checkpoints/round-NNNN/`` with ``weights.safetensors``, ``state.json``
(the loop's state and the strategy's scalars), ``strategy.safetensors`` (the strategy's arrays)
and, when the run selects on validation, ``best.safetensors`` (the best global model so far):
no pickle, so resuming a run folder never executes what it holds. It is written under a temporary
name, every file fsynced, then renamed; only
then does ``checkpoints/LATEST`` (itself replaced atomically) point at it. A crash at any moment
leaves either the previous or the new checkpoint, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from flowerbed.exception import RunError
from flowerbed.experiment import StrategyConfig
from flowerbed.server.strategy_state import restore_strategy, strategy_state
from flowerbed.strategies.registry import build_strategy
from flowerbed.weights import load_safetensors, save_safetensors

KEEP = 2


@dataclass
class Checkpoint:
    """The state after a complete round: weights, strategy, and the loop's own state."""

    round: int
    weights: dict[str, np.ndarray]
    strategy: Strategy
    state: dict[str, Any]
    best: dict[str, np.ndarray] | None = None  # the best global model on validation so far


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically and point ``LATEST`` at it; keep the last ``KEEP``."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{checkpoint.round:04d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_safetensors(checkpoint.weights, tmp / "weights.safetensors")
    meta, tensors = strategy_state(checkpoint.strategy)
    save_safetensors(tensors, tmp / "strategy.safetensors")
    if checkpoint.best is not None:
        save_safetensors(checkpoint.best, tmp / "best.safetensors")
    state = {"round": checkpoint.round, "strategy": meta, **checkpoint.state}
    _write_bytes(tmp / "state.json", json.dumps(state, separators=(",", ":")).encode())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_bytes(root / ".LATEST.tmp", name.encode())
    os.replace(root / ".LATEST.tmp", root / "LATEST")
    _fsync_dir(root)
    for old in sorted(root.glob("round-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
