"""Workload a1 of the throughput benchmark: the data follows its recipe and the raw floor computes SGD/DP-SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flowerbed.benchmarks.simulation_throughput import (
    FloorDP,
    a1_data,
    a1_federation,
    a1_floor_round,
    a1_initial_weights,
)
from flowerbed.experiment import DataConfig
from flowerbed.tasks.data.catalog import pooled_test_set


def _rule() -> tuple[np.ndarray, float, list[np.random.SeedSequence]]:
    s_rule, s_mu, s_x, s_flip, s_test = np.random.SeedSequence(0).spawn(5)
    g = np.random.default_rng(s_rule)
    w = g.normal(size=13)
    b = 0.5 * g.normal()
    return w, b, [s_mu, s_x, s_flip, s_test]


def _client(n: int, i: int, seeds: list[np.random.SeedSequence], w: np.ndarray, b: float):
    """Client ``i`` of ``n`` rebuilt row by row: features (float64), clean and flipped labels."""
    s_mu, s_x, s_flip = seeds
    mu = np.random.default_rng(s_mu).normal(0, 0.3, n * 13).reshape(n, 13)[i]
    x = np.random.default_rng(s_x).standard_normal(n * 128 * 13).reshape(n, 128, 13)[i] + mu
    clean = np.array([float(np.dot(row, w)) + b > 0 for row in x], dtype=np.int64)
    flip = np.random.default_rng(s_flip).random((n, 128))[i] < 0.1
    return x, clean, np.where(flip, 1 - clean, clean)


def test_the_data_follows_the_recipe():
    n = 20
    x, y, x_test, y_test = a1_data(n)
    assert x.shape == (n, 128, 13) and x.dtype == np.float32
    assert y.shape == (n, 128) and y.dtype == np.int64
    assert x_test.shape == (50, 128, 13) and x_test.dtype == np.float32
    assert y_test.shape == (50, 128) and y_test.dtype == np.int64
    w, b, (s_mu, s_x, s_flip, s_test) = _rule()
    for i in (0, 7, n - 1):
        rows, _, labels = _client(n, i, [s_mu, s_x, s_flip], w, b)
        np.testing.assert_array_equal(x[i], rows.astype(np.float32))
        np.testing.assert_array_equal(y[i], labels)
    test_seeds = s_test.spawn(3)
    for i in (0, 49):
        rows, _, labels = _client(50, i, test_seeds, w, b)
        np.testing.assert_array_equal(x_test[i], rows.astype(np.float32))
        np.testing.assert_array_equal(y_test[i], labels)
    flipped = np.mean(y != (x.astype(np.float64) @ w + b > 0))
    assert 0.08 < flipped < 0.12
    again = a1_data(n)
    for first, second in zip((x, y, x_test, y_test), again, strict=True):
        np.testing.assert_array_equal(first, second)


def test_the_federation_carries_the_held_out_set_in_its_test_splits():
    sites = a1_federation(DataConfig(dataset="x:y", partition={"kind": "natural", "num_clients": 60}), seed=3)
    x, y, x_test, y_test = a1_data(60)
    assert len(sites) == 60 and len({s.name for s in sites}) == 60
    assert all(s.num_train == 128 for s in sites)
    assert [len(s.y_test) for s in sites] == [128] * 50 + [0] * 10
    np.testing.assert_array_equal(sites[5].x_train, x[5])
    np.testing.assert_array_equal(sites[5].y_train, y[5])
    pooled_x, pooled_y = pooled_test_set(sites)
    np.testing.assert_array_equal(pooled_x, x_test.reshape(-1, 13))
    np.testing.assert_array_equal(pooled_y, y_test.reshape(-1))


def _model(weights) -> nn.Sequential:
    w1, b1, w2, b2 = weights
    model = nn.Sequential(nn.Linear(13, 64), nn.ReLU(), nn.Linear(64, 2))
    with torch.no_grad():
        model[0].weight.copy_(w1.T), model[0].bias.copy_(b1), model[2].weight.copy_(w2.T), model[2].bias.copy_(b2)
    return model


def _flat(weights) -> list[torch.Tensor]:
    w1, b1, w2, b2 = weights
    return [w1.T, b1, w2.T, b2]


def test_the_floor_is_sgd_then_the_mean():
    x_np, y_np, _, _ = a1_data(3)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    start = a1_initial_weights()
    with torch.no_grad():
        result = a1_floor_round(start, x, y, torch.Generator().manual_seed(4), steps=2, batch=16, lr=0.1)
    order = torch.rand((3, 128), generator=torch.Generator().manual_seed(4)).argsort(1)
    finals = []
    for k in range(3):
        model = _model(start)
        for t in range(2):
            rows = order[k, 16 * t : 16 * (t + 1)]
            model.zero_grad()
            nn.functional.cross_entropy(model(x[k, rows]), y[k, rows]).backward()
            with torch.no_grad():
                for param in model.parameters():
                    param -= 0.1 * param.grad
        finals.append([p.detach() for p in model.parameters()])
    expected = [torch.stack(ps).mean(0) for ps in zip(*finals, strict=True)]
    assert [tuple(t.shape) for t in result] == [tuple(t.shape) for t in start]
    for got, want in zip(_flat(result), expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_the_dp_floor_clips_every_row_and_divides_by_the_expected_batch():
    x_np, y_np, _, _ = a1_data(2)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    start = a1_initial_weights()
    dp = FloorDP(noise_multiplier=0.0, max_grad_norm=0.5)
    with torch.no_grad():
        result = a1_floor_round(start, x, y, torch.Generator().manual_seed(9), steps=1, dp=dp)
    member = torch.rand((2, 128), generator=torch.Generator().manual_seed(9)) < dp.sample_rate
    finals = []
    for k in range(2):
        model = _model(start)
        total = [torch.zeros_like(p) for p in model.parameters()]
        for row in member[k].nonzero().reshape(-1):
            model.zero_grad()
            nn.functional.cross_entropy(model(x[k, row : row + 1]), y[k, row : row + 1]).backward()
            grads = [p.grad for p in model.parameters()]
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            factor = min(1.0, dp.max_grad_norm / (float(norm) + 1e-6))
            total = [t + factor * g for t, g in zip(total, grads, strict=True)]
        finals.append([p.detach() - 0.1 / 16 * t for p, t in zip(model.parameters(), total, strict=True)])
    expected = [torch.stack(ps).mean(0) for ps in zip(*finals, strict=True)]
    for got, want in zip(_flat(result), expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dp", [None, FloorDP()])
def test_the_floor_runs_a_tiny_cohort(dp):
    x_np, y_np, _, _ = a1_data(4)
    with torch.no_grad():
        result = a1_floor_round(
            a1_initial_weights(), torch.from_numpy(x_np), torch.from_numpy(y_np), torch.Generator(), dp=dp
        )
    assert [tuple(t.shape) for t in result] == [(13, 64), (64,), (64, 2), (2,)]
    assert all(bool(torch.isfinite(t).all()) for t in result)
