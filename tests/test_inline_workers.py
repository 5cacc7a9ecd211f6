"""Scale-out: inline cohorts shared among Ray actors give the single-process answer.

Starting Ray takes 20 to 50 s on a small machine, so this test runs only when
``FLOWERBED_RAY_TESTS=1`` is set (see docs/performance.md).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from flowerbed.simulations.simulate import simulate
from flowerbed.weights import load_safetensors


@pytest.mark.skipif(os.environ.get("FLOWERBED_RAY_TESTS") != "1", reason="starts Ray: set FLOWERBED_RAY_TESTS=1")
def test_two_ray_workers_equal_one_process(heart_experiment):
    base = ("rounds=2", "train.momentum=0.9", "evaluate.central=false")
    single = simulate(heart_experiment(*base), quiet=True)
    shared = simulate(heart_experiment(*base, "backend.workers=2"), quiet=True)
    a, b = load_safetensors(single / "model.safetensors"), load_safetensors(shared / "model.safetensors")
    for key in a:
        assert np.allclose(a[key], b[key], atol=1e-6, rtol=0), key
