"""docs/tasks.md's worked example runs as the page says, from another folder, and DP refuses its loss."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flowerbed.client.node_round import NodeRequest, Refusal, admit
from flowerbed.experiment import load_experiment
from flowerbed.protocol import ErrorCode

from .conftest import ROOT

EXAMPLE = ROOT / "docs" / "examples" / "survival" / "survival.toml"


def test_the_worked_example_runs_with_the_documented_command(tmp_path: Path):
    command = [sys.executable, "-m", "flowerbed.cli", "simulate", str(EXAMPLE), "-q", "-o", str(tmp_path)]
    result = subprocess.run([*command, "--set", "rounds=3"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((Path(result.stdout.strip().splitlines()[-1]) / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert set(summary["final"]["sites"]) == {"north", "south", "east"}
    assert 0.5 < summary["final"]["federated"]["c-index"] <= 1.0


def test_dp_refuses_the_worked_examples_loss(tmp_path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    monkeypatch.setenv("FLOWERBED_SIM_NODE_DIR", str(tmp_path))
    experiment = load_experiment(EXAMPLE, ["privacy.enabled=true", "privacy.noise_multiplier=1.0"])
    (outcome,) = admit([NodeRequest("train", experiment, "guide", 1, {"partition-id": 0})])
    assert isinstance(outcome, Refusal) and outcome.code == ErrorCode.POLICY
    assert "couples the rows of a batch" in outcome.reason
