"""The inline backend and Flower's simulation engine give the same model for the same seed."""

from __future__ import annotations

import numpy as np
import pytest

from flowerbed.server.run_folder import read_metrics
from flowerbed.simulations.simulate import simulate
from flowerbed.weights import load_safetensors


def test_inline_and_flower_backends_give_the_same_final_weights(heart_experiment):
    """Starts Ray once (about 25 s): the same ServerApp and ClientApp on both engines."""
    base = (
        "rounds=2",
        "train.momentum=0.9",
        "train.clients_per_round=3",
        "evaluate.central=false",
        "evaluate.federated=false",
    )
    inline = simulate(heart_experiment(*base), quiet=True)
    flower = simulate(heart_experiment(*base, "backend.name='flower'"), quiet=True)
    a, b = load_safetensors(inline / "model.safetensors"), load_safetensors(flower / "model.safetensors")
    assert set(a) == set(b)
    for key in a:
        assert np.allclose(a[key], b[key], atol=1e-5, rtol=0), key
    assert [r["participants"] for r in read_metrics(inline)] == [r["participants"] for r in read_metrics(flower)]
    for ra, rb in zip(read_metrics(inline), read_metrics(flower), strict=True):
        for site, values in ra["sites"].items():
            assert values["train-loss"] == pytest.approx(rb["sites"][site]["train-loss"], abs=1e-5)
