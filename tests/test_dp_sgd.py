"""DP-SGD at the node gives exactly Opacus's clipped, noised gradients, only faster."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flowerbed.client.private_training import train_private
from flowerbed.experiment import TrainConfig
from flowerbed.privacy.dp_sgd import (
    FastPerSample,
    OpacusPerSample,
    make_private_compatible,
    noisy_step_grads,
)
from flowerbed.privacy.planner import DPPlan, sampling
from flowerbed.tasks.models import mlp, small_cnn
from flowerbed.tasks.task import DataSchema, Task

TABULAR = DataSchema(kind="tabular", input_shape=(13,), num_classes=2)
IMAGES = DataSchema(kind="image", input_shape=(1, 8, 8), num_classes=10)


def _group_norm_net(schema: DataSchema) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, stride=2),
        nn.GroupNorm(4, 8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def _sequence_net(schema: DataSchema) -> nn.Module:
    # A Linear layer on 3-D input (rows x 4 tokens x 4 features), and a LayerNorm that only
    # Opacus's own engine handles.
    return nn.Sequential(
        nn.Unflatten(1, (4, 4)),
        nn.Linear(4, 6),
        nn.LayerNorm(6),
        nn.Flatten(),
        nn.Linear(24, 2),
    )


CASES = {
    "mlp": (mlp, TABULAR),
    "cnn": (small_cnn, IMAGES),
    "groupnorm": (_group_norm_net, IMAGES),
    "sequence": (_sequence_net, DataSchema(kind="tabular", input_shape=(16,), num_classes=2)),
}


def _data(schema: DataSchema, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *schema.input_shape)).astype(np.float64) * 3
    y = rng.integers(0, schema.num_classes, size=n).astype(np.int64)
    return x, y


def _opacus_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, clip: float, seed: int
) -> list[torch.Tensor]:
    """p.grad after one step of Opacus's own GradSampleModule + DPOptimizer."""
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=16,
        generator=torch.Generator().manual_seed(seed),
    )
    opt.zero_grad()
    nn.functional.cross_entropy(wrapped(x), y).backward()
    opt.pre_step()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    wrapped.to_standard_module()
    return grads


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("sigma", [0.0, 1.3])
def test_clipped_noised_gradients_equal_opacus(case: str, sigma: float) -> None:
    build, schema = CASES[case]
    torch.manual_seed(0)
    model = build(schema).double()
    x, y = (torch.as_tensor(a) for a in _data(schema, 24))
    # Clip hard enough that some rows are clipped and some are not.
    clip = 0.5
    expected = _opacus_grads(copy.deepcopy(model), x, y, sigma, clip, seed=5)
    engine_type = FastPerSample if FastPerSample.supports(model) else OpacusPerSample
    assert (engine_type is FastPerSample) == (case != "sequence")
    for make_engine in (engine_type, OpacusPerSample):
        engine = make_engine(model)
        sums, _ = engine.clipped_sum(x, y, nn.functional.cross_entropy, clip)
        engine.close()
        got = noisy_step_grads(
            sums,
            std=sigma * clip,
            expected_batch_size=16,
            generator=torch.Generator().manual_seed(5),
        )
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=0)
    # The raw model carries no hooks or per-sample buffers afterwards.
    assert not any(m._forward_hooks for m in model.modules())
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())


def _opacus_round(model: nn.Module, x: np.ndarray, y: np.ndarray, plan: DPPlan, lr: float, seed: int) -> None:
    """Opacus's default path: Poisson DPDataLoader, GradSampleModule, DPOptimizer."""
    loader = DataLoader(TensorDataset(torch.as_tensor(x), torch.as_tensor(y)), batch_size=32)
    dp_loader = DPDataLoader.from_data_loader(loader, generator=torch.Generator().manual_seed(seed))
    # DataLoader draws a worker base seed from its own generator; keep that draw off the
    # Poisson sampler's generator so both sides see the same batches.
    dp_loader.generator = None
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=int(len(y) * dp_loader.sample_rate),
        generator=torch.Generator().manual_seed(seed + 7919),
    )
    for xb, yb in dp_loader:
        opt.zero_grad()
        nn.functional.cross_entropy(wrapped(xb), yb).backward()
        opt.step()
    wrapped.to_standard_module()


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_a_whole_round_matches_opacus_default_path(case: str) -> None:
    build, schema = CASES[case]
    torch.manual_seed(1)
    model = build(schema).double()
    n = 70  # q = 1/3: with 3 steps some Poisson batches are small; the loop never skips them
    x, y = _data(schema, n, seed=1)
    q, steps = sampling(n, 32)
    plan = DPPlan(
        noise_multiplier=0.7,
        sample_rate=q,
        steps_per_round=steps,
        rounds=1,
        max_grad_norm=0.8,
        delta=1e-5,
    )
    reference = copy.deepcopy(model)
    _opacus_round(reference, x, y, plan, lr=0.1, seed=11)
    task = Task(name=case, model_fn=build)
    result = train_private(model, task, x, y, TrainConfig(lr=0.1), plan=plan, seed=11)
    assert result.steps == steps and result.num_examples == n
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, r, atol=1e-6, rtol=0)


def test_empty_poisson_batches_still_step_with_noise() -> None:
    torch.manual_seed(0)
    model = mlp(TABULAR)
    x, y = _data(TABULAR, 40)
    # q so small that almost every batch is empty: the weights still move (noise only).
    plan = DPPlan(
        noise_multiplier=1.0,
        sample_rate=1e-4,
        steps_per_round=3,
        rounds=1,
        max_grad_norm=1.0,
        delta=1e-5,
    )
    before = [p.detach().clone() for p in model.parameters()]
    result = train_private(model, Task("t", mlp), x.astype(np.float32), y, TrainConfig(), plan=plan, seed=0)
    assert result.steps == 3
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_noise_comes_from_os_randomness_unless_seeded() -> None:
    x, y = _data(TABULAR, 64)
    x = x.astype(np.float32)
    plan = DPPlan(
        noise_multiplier=1.0,
        sample_rate=0.5,
        steps_per_round=2,
        rounds=1,
        max_grad_norm=1.0,
        delta=1e-5,
    )

    def weights(seed: int | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = mlp(TABULAR)
        train_private(model, Task("t", mlp), x, y, TrainConfig(), plan=plan, seed=seed)
        return [p.detach() for p in model.parameters()]

    for a, b in zip(weights(3), weights(3), strict=True):
        assert torch.equal(a, b)
    # torch's global seed does not fix the noise: two unseeded rounds differ.
    assert not torch.equal(weights(None)[0], weights(None)[0])


def test_batchnorm_is_fixed_identically_everywhere() -> None:
    def with_bn() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2))

    a, b = make_private_compatible(with_bn()), make_private_compatible(with_bn())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in a.modules())
    assert list(a.state_dict()) == list(b.state_dict())
    assert FastPerSample.supports(a)
    plain = mlp(TABULAR)
    assert make_private_compatible(plain) is plain


def test_overhead_benchmark_writes_its_figures(tmp_path) -> None:
    from flowerbed.benchmarks.dp_overhead import main

    out = tmp_path / "dp.json"
    results = main(["--repeats", "1", "--json", str(out)])
    written = json.loads(out.read_text())["results"]
    assert [r["model"] for r in written] == ["heart-mlp", "digits-cnn"] == [r["model"] for r in results]
    for r in written:
        assert r["dp_ratio"] == pytest.approx(r["dp_s"] / r["plain_s"])
        assert r["plain_s"] > 0 and r["opacus_s"] > 0


class _InPlace(nn.Module):
    """A Linear whose output a functional in-place op overwrites (invisible to module flags)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(13, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu_(self.a(x)))


def test_what_the_fast_engine_cannot_compute_falls_back_to_opacus() -> None:
    torch.manual_seed(0)
    model = _InPlace().double()
    x, y = (torch.as_tensor(a) for a in _data(TABULAR, 20))
    engine = FastPerSample(model)
    with pytest.raises(Exception, match="in place"):  # never a silently wrong gradient
        engine.clipped_sum(x, y, nn.functional.cross_entropy, 0.5)
    engine.close()
    # Tied weights: the fast engine declines, train_private switches to Opacus's engine and
    # takes exactly the step Opacus's own optimizer takes.
    tied = nn.Sequential(nn.Linear(13, 13), nn.ReLU(), nn.Linear(13, 13)).double()
    tied[2].weight = tied[0].weight
    assert not FastPerSample.supports(tied)
    expected = _opacus_grads(copy.deepcopy(tied), x, y, 0.0, 0.5, seed=0)
    plan = DPPlan(
        noise_multiplier=1e-12, sample_rate=1.0, steps_per_round=1, rounds=1, max_grad_norm=0.5,
        delta=1e-5,
    )  # fmt: skip
    before = [p.detach().clone() for p in tied.parameters()]
    train_private(tied, Task("t", mlp), x.numpy(), y.numpy(), TrainConfig(lr=1.0), plan=plan, seed=0)
    for b, p, e in zip(before, tied.parameters(), expected, strict=True):
        # one SGD step, lr 1, on the clipped sum over the expected batch (20 rows; 16 in the helper)
        torch.testing.assert_close(b - p, e * 16 / 20, atol=1e-6, rtol=0)
