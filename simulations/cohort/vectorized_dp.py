"""DP-SGD for vectorized cohorts: per-sample clipping and Gaussian noise for every client at once.

Each client follows ``flowerbed.client.private_training.train_private`` (the mechanism described
in ``flowerbed.privacy.dp_sgd``): ``plan.steps_per_round`` Poisson-sampled steps, each row joins a
step with probability ``q``; every per-sample gradient is clipped to ``C`` with the factor
``min(1, C / (||g_i|| + 1e-6))``; the clipped sum gets ``N(0, (sigma C)^2)`` noise and is divided
by the expected batch size ``max(1, int(n q))``; then the client's own optimizer steps. Empty
batches are steps too (noise only).

The Poisson batches of a step are padded to the largest one and the padding is masked out of
the sums. For the built-in models with the built-in cross-entropy, the per-sample gradients of
all ``K`` clients come from one forward and one backward pass on batched kernels
(``flowerbed.simulations.cohort.per_sample_grads``); any other model or loss uses two nested ``vmap``
(over clients, then over the rows of each client's batch). Sampling and noise are drawn from a
generator seeded by the operating system unless a seed is given (tests only).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from flowerbed.experiment import TrainConfig
from flowerbed.privacy.planner import DPPlan
from flowerbed.simulations.cohort.per_sample_grads import CLIP_EPS, clipped_sample_sums
from flowerbed.simulations.cohort.vectorized import (
    Cohort,
    CohortResult,
    LossFn,
    Params,
    StackedOptimizer,
    stacked,
    stacked_net,
)


@dataclass(frozen=True)
class PrivateCohortPlan:
    """Per-client DP settings as tensors (one entry per client of the cohort)."""

    noise_multiplier: torch.Tensor
    sample_rate: torch.Tensor
    steps: torch.Tensor
    expected_batch: torch.Tensor
    max_grad_norm: float

    @classmethod
    def from_plans(cls, plans: Sequence[DPPlan], n: Sequence[int], device: torch.device) -> PrivateCohortPlan:
        """Stack per-client ``DPPlan``s (they must share the clipping norm)."""
        norms = {p.max_grad_norm for p in plans}
        if len(norms) != 1:
            raise ValueError(f"clients of one cohort must share max_grad_norm, got {sorted(norms)}")
        return cls(
            noise_multiplier=torch.tensor([p.noise_multiplier for p in plans], dtype=torch.float64, device=device),
            sample_rate=torch.tensor([p.sample_rate for p in plans], dtype=torch.float64, device=device),
            steps=torch.tensor([p.steps_per_round for p in plans], dtype=torch.int64, device=device),
            expected_batch=torch.tensor(
                [max(1, int(size * p.sample_rate)) for p, size in zip(plans, n, strict=True)],
                dtype=torch.int64,
                device=device,
            ),
            max_grad_norm=float(norms.pop()),
        )


def per_sample_function(model: nn.Module, loss_fn: LossFn):
    """``(params, x_rows, y_rows) -> (per-sample grads, per-sample losses)`` for one client.

    Each row's gradient is that of ``loss_fn`` on a batch of that row alone, which is what Opacus's
    ``GradSampleModule(loss_reduction="mean")`` reports for a loss that is a mean over the batch.
    """

    def one(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    return vmap(grad_and_value(one), in_dims=(None, 0, 0))


def clipped_sums(sample_grads: Params, valid: torch.Tensor, max_grad_norm: float) -> tuple[Params, torch.Tensor]:
    """Sum over rows of per-sample gradients clipped to ``max_grad_norm`` (rows where ``valid``).

    Parameters
    ----------
    sample_grads : dict[str, torch.Tensor]
        ``[K, m, *shape]`` per-sample gradients of ``K`` clients with ``m`` (padded) rows each.
    valid : torch.Tensor
        ``[K, m]`` booleans: which rows are real members of the batch.

    Returns
    -------
    tuple
        The clipped sums ``[K, *shape]`` and the clipping factors ``[K, m]`` (zero on padding).
    """
    k, m = valid.shape
    norm2 = sum(g.reshape(k, m, -1).pow(2).sum(-1) for g in sample_grads.values())
    factor = (max_grad_norm / (norm2.sqrt() + CLIP_EPS)).clamp(max=1.0) * valid
    sums = {name: torch.einsum("km,km...->k...", factor.to(g.dtype), g) for name, g in sample_grads.items()}
    return sums, factor


def poisson_batches(
    cohort: Cohort, rows: torch.Tensor, rate: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Poisson-sampled row indices ``[g, m]`` and validity ``[g, m]`` for the clients in ``rows``."""
    n = cohort.n[rows]
    n_max = cohort.x.shape[1]
    draws = torch.rand((len(rows), n_max), generator=generator, dtype=torch.float64)
    draws = draws.to(cohort.x.device)
    member = (draws < rate[rows, None]) & (torch.arange(n_max, device=n.device) < n[:, None])
    counts = member.sum(1)
    m = int(counts.max()) if len(rows) else 0
    position = torch.arange(n_max, device=n.device).expand(len(rows), n_max)
    order = torch.argsort(torch.where(member, position, position + n_max), dim=1, stable=True)
    idx = order[:, :m]
    valid = torch.arange(m, device=n.device) < counts[:, None]
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


def train_cohort_private(
    model: nn.Module,
    loss_fn: LossFn,
    cohort: Cohort,
    weights: Params,
    train: TrainConfig,
    plan: PrivateCohortPlan,
    *,
    seed: int | None = None,
    batched_kernels: bool = True,
    proximal_mu: float = 0.0,
) -> CohortResult:
    """DP-SGD for every client of ``cohort`` at once, starting from the same ``weights``.

    FedProx's proximal term (``proximal_mu``) is added after the noise: it does not touch the data.

    Parameters
    ----------
    seed : int | None (default: None)
        ``None`` draws sampling and noise from OS randomness; an integer is for tests only.
    batched_kernels : bool (default: True)
        ``False`` computes per-sample gradients with nested ``vmap`` even where ``StackedNet`` applies.

    Returns
    -------
    CohortResult
        Final stacked weights, mean loss over each client's non-empty steps (NaN when every step
        was empty), and steps taken.
    """
    model.train()
    device = cohort.x.device
    k = cohort.size
    seed = secrets.randbits(63) if seed is None else seed
    sampler = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 7919)
    start = {name: w.to(device) for name, w in weights.items()}
    params = stacked(start, k)
    optimizer = StackedOptimizer(train, params, proximal_mu=proximal_mu, anchor=start)
    net = stacked_net(model, loss_fn) if batched_kernels else None
    per_client = vmap(per_sample_function(model, loss_fn)) if net is None else None
    std = (plan.noise_multiplier * plan.max_grad_norm).float()
    total = torch.zeros(k, dtype=torch.float64, device=device)
    nonempty = torch.zeros(k, dtype=torch.int64, device=device)
    for t in range(int(plan.steps.max()) if k else 0):
        rows = (plan.steps > t).nonzero().reshape(-1)
        everyone = len(rows) == k
        cur = params if everyone else {name: p[rows] for name, p in params.items()}
        idx, valid = poisson_batches(cohort, rows, plan.sample_rate, sampler)
        if idx.shape[1]:
            x, y = cohort.rows(rows, idx)
            if net is not None:
                sums, _, sample_loss = clipped_sample_sums(net, cur, x, y, valid, plan.max_grad_norm)
            else:
                sample_grads, sample_loss = per_client(cur, x, y)
                sums, _ = clipped_sums(sample_grads, valid, plan.max_grad_norm)
            counts = valid.sum(1)
            has = counts > 0
            batch_loss = (sample_loss.double() * valid).sum(1) / counts.clamp(min=1)
            total[rows] += torch.where(has, batch_loss, torch.zeros_like(batch_loss))
            nonempty[rows] += has.long()
        else:
            sums = {name: torch.zeros_like(p) for name, p in cur.items()}
        grads = {}
        step_std = std if everyone else std[rows]
        step_batch = plan.expected_batch if everyone else plan.expected_batch[rows]
        for name, s in sums.items():
            shape = (len(rows),) + (1,) * (s.dim() - 1)
            noise = torch.normal(0.0, 1.0, size=s.shape, generator=noise_gen, device=device, dtype=s.dtype)
            grads[name] = noise.mul_(step_std.view(shape)).add_(s).div_(step_batch.view(shape).to(s.dtype))
        optimizer.step(grads, None if everyone else rows, t + 1)
    loss = [
        float(tot) / cnt if cnt else float("nan") for tot, cnt in zip(total.tolist(), nonempty.tolist(), strict=True)
    ]
    return CohortResult(params=params, loss=loss, steps=[int(s) for s in plan.steps.tolist()])
