"""The run folder: resolved configuration, metrics per round, summary, final model."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowerbed.experiment import Experiment
from flowerbed.weights import save_safetensors


def new_run_dir(experiment: Experiment, parent: str | Path | None = None) -> Path:
    """A fresh, uniquely named folder ``<output>/<name>-<UTC timestamp>``."""
    root = Path(parent or experiment.output)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    path = root / f"{experiment.name}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = root / f"{experiment.name}-{stamp}-{suffix}"
    path.mkdir(parents=True)
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_experiment(run_dir: Path, experiment: Experiment) -> None:
    """Save the resolved configuration (``experiment.json``)."""
    _atomic_write(run_dir / "experiment.json", json.dumps(experiment.to_dict(), indent=2))


def read_experiment(run_dir: Path) -> dict[str, Any]:
    """The resolved configuration of a run folder."""
    return json.loads((run_dir / "experiment.json").read_text())


def write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` from the complete history (atomic; used on every round)."""
    _atomic_write(run_dir / "metrics.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every round's record from ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_timings(run_dir: Path, timings: list[dict[str, Any]]) -> None:
    """Rewrite ``timings.jsonl``: per round, seconds since the run (or its resumption) started.

    Wall-clock time lives apart from ``metrics.jsonl`` so that the same experiment and seed give a
    byte-identical ``metrics.jsonl``.
    """
    _atomic_write(run_dir / "timings.jsonl", "".join(json.dumps(t, sort_keys=True) + "\n" for t in timings))


def read_timings(run_dir: Path) -> list[dict[str, Any]]:
    """Every round's ``{"round", "time"}`` from ``timings.jsonl``."""
    path = run_dir / "timings.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Save ``summary.json``."""
    _atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The summary of a finished run (empty if the run has not finished)."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_final_model(
    run_dir: Path, weights: dict[str, np.ndarray], model: torch.nn.Module, input_shape: tuple[int, ...]
) -> None:
    """``model.safetensors`` plus ``model.pt2``, a ``torch.export`` program of the same weights.

    ``torch.export.load(path).module()(x)`` runs the model without flowerbed installed.
    """
    save_safetensors(weights, run_dir / "model.safetensors")
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    model.eval().cpu()
    example = torch.zeros((2, *input_shape))
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(run_dir / "model.pt2"))
