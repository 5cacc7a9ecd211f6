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

    @property
    def noise_std(self) -> torch.Tensor:
        """Each client's noise scale ``sigma C`` ``[K]`` (float32)."""
        return (self.noise_multiplier * self.max_grad_norm).float()

    def shared_scale(self) -> tuple[float, float] | None:
        """(noise scale ``sigma C``, expected batch) when every client has the same, else ``None``."""
        std = self.noise_std
        if not len(std) or bool((std != std[0]).any() or (self.expected_batch != self.expected_batch[0]).any()):
            return None
        return float(std[0]), float(self.expected_batch[0])

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
    cohort: Cohort, rows: torch.Tensor, rate: torch.Tensor, generator: torch.Generator, ragged: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Poisson-sampled row indices ``[g, m]`` and validity ``[g, m]`` for the clients in ``rows``.

    Each client's members keep their order in its data; padding points at row 0. ``ragged=False``
    says that every client has the cohort's largest number of rows (nothing to mask).
    """
    n = cohort.n[rows]
    n_max = cohort.x.shape[1]
    draws = torch.rand((len(rows), n_max), generator=generator)  # float32, as Opacus's Poisson sampler draws
    member = draws.to(cohort.x.device) < rate[rows, None]
    if ragged:
        member &= torch.arange(n_max, device=n.device) < n[:, None]
    counts = member.sum(1)
    m = int(counts.max()) if len(rows) else 0
    slot = member.cumsum(1).sub_(1).masked_fill_(~member, m)  # a member's place in its batch, or a spare column
    idx = torch.zeros((len(rows), m + 1), dtype=torch.int64, device=n.device)
    idx.scatter_(1, slot, torch.arange(n_max, device=n.device).expand(len(rows), n_max))
    idx = idx[:, :m]
    valid = torch.arange(m, device=n.device) < counts[:, None]
    return idx, valid


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
    net = stacked_net(model, loss_fn) if batched_kernels else None
    params = stacked(start, k, wide_last=net is not None)
    optimizer = StackedOptimizer(train, params, proximal_mu=proximal_mu, anchor=start)
    per_client = vmap(per_sample_function(model, loss_fn)) if net is None else None
    scale = plan.shared_scale() or plan.noise_std  # one (scale, batch) for all, else each client's scale
    ragged = bool((cohort.n < cohort.x.shape[1]).any())  # once a round, not a device sync a step
    total = torch.zeros(k, dtype=torch.float64, device=device)
    nonempty = torch.zeros(k, dtype=torch.int64, device=device)
    for t in range(int(plan.steps.max()) if k else 0):
        rows = (plan.steps > t).nonzero().reshape(-1)
        everyone = len(rows) == k
        cur = params if everyone else {name: p[rows] for name, p in params.items()}
        idx, valid = poisson_batches(cohort, rows, plan.sample_rate, sampler, ragged)
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
        noisy = noisy_means(sums, rows, scale, plan.expected_batch, noise_gen)
        optimizer.step(noisy, None if everyone else rows, t + 1)
    loss = [
        float(tot) / cnt if cnt else float("nan") for tot, cnt in zip(total.tolist(), nonempty.tolist(), strict=True)
    ]
    return CohortResult(params=params, loss=loss, steps=[int(s) for s in plan.steps.tolist()])


def noisy_means(
    sums: Params,
    rows: torch.Tensor,
    std: torch.Tensor | tuple[float, float],
    expected_batch: torch.Tensor,
    generator: torch.Generator,
) -> Params:
    """``(clipped sum + N(0, std^2)) / expected batch`` of every parameter, for the clients in ``rows``.

    ``std`` is every client's noise scale ``[K]``, or (noise scale, expected batch) shared by all
    (then both apply as scalars). The noise of all parameters is drawn in one call.
    """
    total = sum(s.numel() for s in sums.values())
    first = next(iter(sums.values()))
    noise = torch.empty(total, dtype=first.dtype, device=first.device).normal_(generator=generator)
    grads: Params = {}
    offset = 0
    for name, s in sums.items():
        part = noise[offset : offset + s.numel()].view(s.shape)
        offset += s.numel()
        if isinstance(std, tuple):
            grads[name] = part.mul_(std[0]).add_(s).div_(std[1])
        else:
            shape = (len(rows),) + (1,) * (s.dim() - 1)
            scale, batch = std[rows].view(shape), expected_batch[rows].view(shape).to(s.dtype)
            grads[name] = part.mul_(scale).add_(s).div_(batch)
    return grads
