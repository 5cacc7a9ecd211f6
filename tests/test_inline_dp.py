"""Vectorized DP-SGD: Opacus's clipped gradients, the planned noise scale, and the node's accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer

from flowerbed.client import node_round
from flowerbed.client.node_round import SIM_NODE_DIR_ENV, NodeRequest, Refusal, admit, release_train
from flowerbed.client.training import TrainResult
from flowerbed.experiment import TrainConfig
from flowerbed.privacy.ledger import PrivacyLedger, fingerprint_arrays
from flowerbed.privacy.planner import DPPlan, epsilon_for, make_plan
from flowerbed.protocol import ErrorCode
from flowerbed.server.run_folder import read_summary
from flowerbed.simulations.cohort.per_sample_grads import clipped_sample_sums
from flowerbed.simulations.cohort.stacked_net import StackedNet
from flowerbed.simulations.cohort.vectorized import Cohort, stack_cohort, stacked
from flowerbed.simulations.cohort.vectorized_dp import (
    PrivateCohortPlan,
    clipped_sums,
    per_sample_function,
    poisson_batches,
    train_cohort_private,
)
from flowerbed.simulations.simulate import simulate
from flowerbed.tasks import resolve_task
from flowerbed.tasks.task import DataSchema, SiteData

CPU = torch.device("cpu")
TABULAR = DataSchema("tabular", (13,), 2)
IMAGE = DataSchema("image", (1, 8, 8), 10)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _opacus_grads(model: torch.nn.Module, loss_fn, x, y, max_grad_norm: float, expected: int) -> dict:
    """The gradient Opacus's optimizer steps with, for zero noise."""
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected,
        loss_reduction="mean",
    )
    optimizer.zero_grad()
    loss_fn(wrapped(x), y).backward()
    optimizer.step()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    wrapped.to_standard_module()
    return grads


def _vmap_sums(model, task, params, x, y, valid, max_grad_norm):
    sample_grads, _ = torch.func.vmap(per_sample_function(model, task.loss_fn))(params, x, y)
    return clipped_sums(sample_grads, valid, max_grad_norm)


def _stacked_sums(model, task, params, x, y, valid, max_grad_norm):
    sums, factor, _ = clipped_sample_sums(StackedNet(model), params, x, y, valid, max_grad_norm)
    return sums, factor


def _stacked_autograd_sums(model, task, params, x, y, valid, max_grad_norm):
    net = StackedNet(model)
    sums, factor, _ = clipped_sample_sums(net, params, x, y, valid, max_grad_norm, hand_written=False)
    return sums, factor


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize(
    "clip_sums",
    [_vmap_sums, _stacked_sums, _stacked_autograd_sums],
    ids=["nested-vmap", "stacked-net", "stacked-autograd"],
)
@pytest.mark.parametrize("task_name,schema", [("tabular-mlp", TABULAR), ("image-cnn", IMAGE)])
def test_vectorized_clipped_step_equals_opacus_for_zero_noise(task_name, schema, clip_sums):
    task = resolve_task(task_name, {})
    gen = torch.Generator().manual_seed(0)
    sizes = [5, 1, 9, 3]  # ragged Poisson batches: padding must not leak into the sums
    models = [task.build_model(schema, seed=s) for s in range(len(sizes))]
    names = [n for n, _ in models[0].named_parameters()]
    params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]) for n in names}
    m = max(sizes)
    x = torch.randn((len(sizes), m, *schema.input_shape), generator=gen) * 3
    y = torch.randint(0, schema.num_classes, (len(sizes), m), generator=gen)
    valid = torch.arange(m) < torch.tensor(sizes)[:, None]
    max_grad_norm, expected = 0.7, 4
    sums, factor = clip_sums(models[0], task, params, x, y, valid, max_grad_norm)
    assert (factor < 1).any() and (factor[~valid] == 0).all()  # clipping is active; padding is masked
    for j, size in enumerate(sizes):
        reference = _opacus_grads(models[j], task.loss_fn, x[j, :size], y[j, :size], max_grad_norm, expected)
        for name in names:
            assert torch.allclose(sums[name][j] / expected, reference[name], atol=1e-6, rtol=1e-5), (j, name)


def test_poisson_batches_hold_each_clients_members_in_order():
    n = torch.tensor([40, 7, 0, 40])
    cohort = Cohort(torch.zeros((4, 40, 3)), torch.zeros((4, 40), dtype=torch.int64), n)
    rate = torch.tensor([0.5, 0.9, 0.5, 0.05], dtype=torch.float64)
    gen, replay = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    seen = torch.zeros(4)
    for _ in range(200):
        idx, valid = poisson_batches(cohort, torch.arange(4), rate, gen)
        member = (torch.rand((4, 40), generator=replay) < rate[:, None]) & (torch.arange(40) < n[:, None])
        for j in range(4):
            rows = idx[j][valid[j]]
            assert rows.tolist() == member[j].nonzero().reshape(-1).tolist()  # every member once, in order
            assert (idx[j][~valid[j]] == 0).all()
        seen += valid.sum(1)
    assert seen[2] == 0 and seen[1] / 200 == pytest.approx(0.9 * 7, rel=0.05)
    assert seen[0] / 200 == pytest.approx(20, rel=0.05)


@pytest.mark.parametrize(
    "task_name,args,schema", [("image-cnn", {"channels": 4}, IMAGE), ("tabular-mlp", {"hidden": 8}, TABULAR)]
)
def test_private_cohort_on_stacked_net_equals_nested_vmap(task_name, args, schema):
    """The same sampling and noise give the same DP-SGD round on either per-sample gradient engine."""
    task = resolve_task(task_name, args)
    rng = np.random.default_rng(0)
    sizes = (12, 5, 9)
    xs = [rng.normal(size=(n, *schema.input_shape)).astype(np.float32) for n in sizes]
    ys = [rng.integers(0, schema.num_classes, n) for n in sizes]
    train = TrainConfig(local_epochs=1, batch_size=4, lr=0.5, momentum=0.9)
    plans = [
        make_plan(n=n, batch_size=4, local_epochs=1, rounds=2, max_grad_norm=0.5, noise_multiplier=0.3) for n in sizes
    ]
    model = task.build_model(schema, seed=0)
    weights = {k: v.detach() for k, v in model.named_parameters()}
    cohort = stack_cohort(xs, ys, CPU)
    stacked_plan = PrivateCohortPlan.from_plans(plans, list(sizes), CPU)
    results = [
        train_cohort_private(model, task.loss_fn, cohort, weights, train, stacked_plan, seed=5, batched_kernels=b)
        for b in (True, False)
    ]
    assert results[0].steps == results[1].steps
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-5)
    for name in weights:
        assert torch.allclose(results[0].params[name], results[1].params[name], atol=1e-5, rtol=0), name


def test_noise_has_the_planned_scale():
    """One step with lr = 1 from zero weights and a zero-gradient task exposes the noise itself."""
    task = resolve_task("tabular-logreg", {})
    model = task.build_model(TABULAR)
    k, n, sigma, clip = 64, 40, 1.3, 0.5
    weights = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    cohort = Cohort(torch.zeros((k, n, 13)), torch.zeros((k, n), dtype=torch.int64), torch.full((k,), n))
    plan = DPPlan(noise_multiplier=sigma, sample_rate=0.25, steps_per_round=1, rounds=1, max_grad_norm=clip, delta=1e-5)
    stacked_plan = PrivateCohortPlan.from_plans([plan] * k, [n] * k, CPU)

    def zero_loss(logits, labels):
        return logits.sum() * 0.0

    train = TrainConfig(lr=1.0, batch_size=10)
    result = train_cohort_private(model, zero_loss, cohort, weights, train, stacked_plan, seed=3)
    expected_batch = int(n * 0.25)
    noise = torch.cat([-p.reshape(-1) * expected_batch for p in result.params.values()])
    assert noise.numel() == k * 28
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.06)
    assert abs(float(noise.mean())) < 0.05


def _site(n: int, seed: int = 0) -> SiteData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 13)).astype(np.float32)
    y = rng.integers(0, 2, n)
    return SiteData("alpha", x, y, x[:2], y[:2], TABULAR)


def test_private_cohort_trains_every_client_its_planned_steps():
    task = resolve_task("tabular-mlp", {"hidden": 16})
    sites = [_site(n, i) for i, n in enumerate((40, 17, 64))]
    train = TrainConfig(local_epochs=2, batch_size=8, lr=0.1)
    plans = [
        make_plan(n=s.num_train, batch_size=8, local_epochs=2, rounds=3, max_grad_norm=1.0, noise_multiplier=0.8)
        for s in sites
    ]
    model = task.build_model(TABULAR, seed=0)
    weights = {k: v.detach() for k, v in model.named_parameters()}
    cohort = stack_cohort([s.x_train for s in sites], [s.y_train for s in sites], CPU)
    result = train_cohort_private(
        model,
        task.loss_fn,
        cohort,
        weights,
        train,
        PrivateCohortPlan.from_plans(plans, [s.num_train for s in sites], CPU),
        seed=1,
    )
    assert result.steps == [p.steps_per_round for p in plans] == [10, 6, 16]
    assert all(np.isfinite(v) for v in result.loss)
    start = stacked(weights, 3)
    for j in range(3):
        assert any(not torch.equal(result.params[k][j], start[k][j]) for k in weights)


def test_release_accounting_follows_the_node_ledger(tmp_path, monkeypatch, heart_experiment):
    monkeypatch.setenv(SIM_NODE_DIR_ENV, str(tmp_path / "sim"))
    experiment = heart_experiment("privacy.enabled=true", "privacy.noise_multiplier=1.1", "rounds=5")
    site = _site(50)
    monkeypatch.setattr(node_round, "resolve_site", lambda config, experiment: site)

    def round_trip(node_config: dict, run_id: str, server_round: int):
        request = NodeRequest("train", experiment, run_id, server_round, node_config)
        (admitted,) = admit([request])
        if isinstance(admitted, Refusal):
            return admitted
        steps = admitted.private.plan.steps_per_round
        (released,) = release_train([admitted], [TrainResult(loss=0.0, steps=steps, num_examples=site.num_train)])
        return released

    virtual = {"partition-id": 0}
    eps = [round_trip(virtual, "r1", r)["epsilon"] for r in (1, 2)]
    plan = make_plan(n=50, batch_size=16, local_epochs=2, rounds=5, max_grad_norm=1.0, noise_multiplier=1.1)
    assert eps[1] == pytest.approx(epsilon_for(1.1, plan.sample_rate, 2 * plan.steps_per_round, plan.delta))
    assert 0 < eps[0] < eps[1]
    # A resumed run (a fresh process) goes on from the node's own ledger, never from the coordinator's files.
    node_round.open_ledger.cache_clear()
    third = round_trip(virtual, "r1", 3)["epsilon"]
    assert third == pytest.approx(epsilon_for(1.1, plan.sample_rate, 3 * plan.steps_per_round, plan.delta))
    assert (tmp_path / "sim" / "ledger.sqlite").is_file()
    dataset = fingerprint_arrays(site.x_train, site.y_train)
    # A node with its own ledger and budget: charged there, refused before training when spent.
    ledger_path = tmp_path / "ledger.sqlite"
    config = {"partition-id": 0, "ledger": str(ledger_path), "budget-epsilon": eps[0] * 1.2, "budget-delta": plan.delta}
    first = round_trip(config, "r2", 1)["epsilon"]
    own = PrivacyLedger(ledger_path)
    assert first == pytest.approx(own.epsilon(dataset, plan.delta))
    refused = round_trip(config, "r2", 2)
    assert refused.code == ErrorCode.BUDGET_EXHAUSTED and "site alpha" in refused.reason
    assert len(own.releases(dataset)) == 1


def test_inline_dp_run_reports_the_clientapps_epsilon(heart_experiment, tmp_path, monkeypatch):
    monkeypatch.setenv(SIM_NODE_DIR_ENV, str(tmp_path / "sim"))
    base = ("privacy.enabled=true", "privacy.noise_multiplier=1.2", "rounds=2", "evaluate.central=false")
    fast = read_summary(simulate(heart_experiment(*base), quiet=True))
    slow = read_summary(simulate(heart_experiment(*base, "backend.vectorize=false"), quiet=True))
    assert set(fast["epsilon"]["per_site"]) == {"cleveland", "hungarian", "switzerland", "va"}
    for site, eps in slow["epsilon"]["per_site"].items():
        assert fast["epsilon"]["per_site"][site] == pytest.approx(eps, rel=1e-9)
