"""A coordinator killed with SIGKILL mid-run resumes from its last checkpoint, losing nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flowerbed.server.checkpoint import latest_round
from flowerbed.server.run_folder import read_metrics
from flowerbed.weights import load_safetensors

from .conftest import HEART_TOML

SETTINGS = [
    "rounds=12",
    "backend.name='inline'",
    "evaluate.local_baselines=false",
    "evaluate.central=false",
    "evaluate.plots=false",  # the weights are what is compared
]


# Local work in steps under SCAFFOLD: each site's iterator keeps its place across rounds, a sampled
# subset each round, one site with its own batch size, the coordinator's control variate in the
# checkpoint and each site's at its node (per round): the resumed run must take exactly the same
# batches and corrections.
STEPS_SCAFFOLD = [
    "train.local_steps=7",
    "train.clients_per_round=3",
    "train.sites.switzerland.batch_size=8",
    "strategy.name='SCAFFOLD'",
    "rounds=6",
]


def simulate_command(output: Path, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "flowerbed.cli", "simulate", str(HEART_TOML), "-q", "-o", str(output)]
    for item in [*SETTINGS, *extra]:
        command += ["--set", item]
    return command


@pytest.mark.parametrize("extra", [[], STEPS_SCAFFOLD], ids=["epochs", "local-steps-scaffold"])
def test_sigkill_after_round_k_then_resume_gives_the_uninterrupted_weights(tmp_path: Path, extra: list[str]):
    out = tmp_path / "killed"
    process = subprocess.Popen(simulate_command(out, extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run_dir = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            runs = list(out.glob("heart-*"))
            if runs and len(read_metrics(runs[0])) >= 3:
                run_dir = runs[0]
                break
            time.sleep(0.05)
        assert run_dir is not None, f"no round completed: {process.stderr.read().decode() if process.stderr else ''}"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"
    rounds = int(next((e for e in reversed([*SETTINGS, *extra]) if e.startswith("rounds=")), "rounds=12")[7:])
    killed_at = latest_round(run_dir)
    assert killed_at is not None and 3 <= killed_at < rounds

    subprocess.run([sys.executable, "-m", "flowerbed.cli", "resume", str(run_dir), "-q"], check=True, timeout=300)
    assert [r["round"] for r in read_metrics(run_dir)] == list(range(1, rounds + 1))

    # The uninterrupted reference runs the same command in a process of its own (same threads, same libraries).
    subprocess.run(simulate_command(tmp_path / "reference", extra), check=True, timeout=300, capture_output=True)
    reference = next((tmp_path / "reference").glob("heart-*"))
    resumed = load_safetensors(run_dir / "model.safetensors")
    expected = load_safetensors(reference / "model.safetensors")
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(resumed[key], expected[key]), key
