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
from flowerbed.server.checkpoint_files import fsync_dir
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
    fsync_dir(path.parent)  # the rename: a crash cannot bring the old file back


def write_experiment(run_dir: Path, experiment: Experiment) -> None:
    """Save the resolved configuration (``experiment.json``)."""
    _atomic_write(run_dir / "experiment.json", json.dumps(experiment.to_dict(), indent=2))


def read_experiment(run_dir: Path) -> dict[str, Any]:
    """The resolved configuration of a run folder."""
    return json.loads((run_dir / "experiment.json").read_text())


METRICS = "metrics.jsonl"
TIMINGS = "timings.jsonl"


def json_line(record: dict[str, Any]) -> str:
    """A record as one line of ``metrics.jsonl`` or ``timings.jsonl``, without its newline (sorted keys).

    The round loop's lines are appended (and fsynced) by the checkpoint writer once their round's
    checkpoint is durable (``CheckpointWriter``): ``metrics.jsonl`` is the durable home of the
    run's history, and a checkpoint holds only the records not in it yet. A crash can at worst
    leave a last line without its newline; readers ignore such a line, and a resumed run rewrites
    the files from its checkpoint's history first.
    """
    return json.dumps(record, sort_keys=True)


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """The complete (newline-terminated) JSON lines of ``path``; a torn last line is left out."""
    if not path.is_file():
        return []
    complete = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in complete if line.strip()]


def write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` from the complete history (atomic; at the start of a resumed run)."""
    _atomic_write(run_dir / METRICS, "".join(json_line(r) + "\n" for r in records))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every round's record from ``metrics.jsonl``."""
    return _read_lines(run_dir / METRICS)


def write_timings(run_dir: Path, timings: list[dict[str, Any]]) -> None:
    """Rewrite ``timings.jsonl``: per round, seconds since the run (or its resumption) started.

    Wall-clock time lives apart from ``metrics.jsonl`` so that the same experiment and seed give a
    byte-identical ``metrics.jsonl``.
    """
    _atomic_write(run_dir / TIMINGS, "".join(json_line(t) + "\n" for t in timings))


def read_timings(run_dir: Path) -> list[dict[str, Any]]:
    """Every round's ``{"round", "time"}`` from ``timings.jsonl``."""
    return _read_lines(run_dir / TIMINGS)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """Save ``summary.json``."""
    _atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The summary of a finished run (empty if the run has not finished)."""
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


INITIAL_WEIGHTS = "initial.safetensors"


def save_initial_weights(run_dir: Path, weights: dict[str, np.ndarray]) -> Path:
    """Keep the global model a run started from (``task.initial_weights`` or ``init_fn``) in its run folder."""
    path = run_dir / INITIAL_WEIGHTS
    save_safetensors(weights, path)
    return path


BEST_WEIGHTS = "best.safetensors"


def save_best_model(run_dir: Path, weights: dict[str, np.ndarray]) -> Path:
    """Keep the best global model on the federated validation metric (``summary.json`` names its round)."""
    path = run_dir / BEST_WEIGHTS
    save_safetensors(weights, path)
    return path


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


ROUND_SENT = "round-sent.json"


def note_round_sent(run_dir: Path, server_round: int, sites: list[str]) -> None:
    """Record which sites a round's training goes to, before it goes out.

    A round whose training went out but whose checkpoint was never written (a stop or a crash in
    between) is trained again on resume; this record lets the resumed run say so.
    """
    overwrite_json(run_dir / ROUND_SENT, json.dumps({"round": server_round, "sites": sorted(sites)}))


def note_rounds_sent(run_dir: Path, rounds: dict[int, list[str]]) -> None:
    """Record, before the newest goes out, every round whose training went out and whose checkpoint may not be durable.

    ``round`` and ``sites`` name the newest (what ``run stop`` reads); ``earlier`` the others.
    """
    newest = max(rounds)
    earlier = {str(r): sorted(s) for r, s in sorted(rounds.items()) if r != newest}
    record = {"round": newest, "sites": sorted(rounds[newest]), **({"earlier": earlier} if earlier else {})}
    overwrite_json(run_dir / ROUND_SENT, json.dumps(record))


def overwrite_json(path: Path, text: str) -> None:
    """Replace a small JSON file's content with one write, without truncating it to zero first.

    ext4 flushes a file truncated to zero and rewritten when it is closed (0.3 ms a round here);
    this writes over it instead. Spaces cover what is left of a longer old content, and JSON
    ignores them, so a process that dies before the final truncate leaves a readable file. Like
    the write it replaces, it does not fsync: after a power cut the record may be the old one or
    unreadable (read as no record). It only lets a resumed run say that a round went out twice;
    the nodes' ledgers count every release whatever it says.
    """
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        padded = data.ljust(os.fstat(fd).st_size, b" ")
        view = memoryview(padded)
        while view:
            view = view[os.write(fd, view) :]
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def read_rounds_sent(run_dir: Path) -> dict[int, list[str]]:
    """``{round: sites}`` of every round ``note_rounds_sent`` recorded."""
    sent = read_round_sent(run_dir)
    if not sent:
        return {}
    rounds = {int(r): list(s) for r, s in (sent.get("earlier") or {}).items()}
    rounds[sent["round"]] = list(sent.get("sites") or [])
    return rounds


def read_round_sent(run_dir: Path) -> dict[str, Any]:
    """The last round whose training went out (``round``, ``sites``), or ``{}``."""
    path = run_dir / ROUND_SENT
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) and isinstance(value.get("round"), int) else {}
