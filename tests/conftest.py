"""Shared fixtures: small, fast experiments on the bundled data."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowerbed.experiment import Experiment, load_experiment

ROOT = Path(__file__).resolve().parents[1]
HEART_TOML = ROOT / "simulations" / "experiments" / "heart.toml"
HEART_DATA = ROOT / "tasks" / "data" / "heart_disease"


@pytest.fixture
def heart_experiment(tmp_path: Path):
    """``make(*overrides)``: the bundled heart experiment, inline backend, writing under tmp_path."""

    def make(*overrides: str) -> Experiment:
        base = [
            f"output={str(tmp_path / 'runs')!r}",
            "backend.name='inline'",
            "rounds=3",
            "evaluate.local_baselines=false",
            "evaluate.plots=false",
        ]
        return load_experiment(HEART_TOML, [*base, *overrides])

    return make
