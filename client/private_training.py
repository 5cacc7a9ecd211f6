"""DP-SGD local training at a node: the private counterpart of ``train_local``.

Same arguments and result as ``flowerbed.client.training.train_local``, plus the run's
``DPPlan``; the mechanism (per-sample clipping, noise) is in ``flowerbed.privacy.dp_sgd``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flowerbed.client.training import TrainResult, corrected_gradient, make_optimizer, proximal_gradient
from flowerbed.exception import TaskError
from flowerbed.experiment import TrainConfig
from flowerbed.privacy.dp_sgd import (
    OpacusPerSample,
    Unsupported,
    generators,
    noisy_step_grads,
    per_sample_engine,
)
from flowerbed.privacy.planner import DPPlan
from flowerbed.tasks.task import Task


def train_private(
    model: nn.Module,
    task: Task,
    x: np.ndarray,
    y: np.ndarray,
    train: TrainConfig,
    *,
    plan: DPPlan,
    seed: int | None = None,
    device: torch.device | str = "cpu",
    fast: bool = True,
    proximal_mu: float = 0.0,
    correction: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """One round of DP-SGD on a node's training rows, as planned.

    Takes exactly ``plan.steps_per_round`` Poisson-sampled steps (empty batches included), with a
    fresh optimizer (``train.optimizer``, ``train.lr``, ``train.momentum``) each call. The model is
    trained in place and left unwrapped.

    Parameters
    ----------
    model : nn.Module
        The raw model (already passed through ``make_private_compatible``).
    task : Task
        The task; its ``loss_fn`` must be a mean over the batch.
    x, y : np.ndarray
        Training features and labels.
    train : TrainConfig
        The experiment's local training settings (batch size is already in the plan).
    plan : DPPlan
        Noise multiplier, sample rate, steps per round and clipping norm.
    seed : int | None (default: None)
        ``None`` draws sampling and noise from OS randomness. An integer makes them
        deterministic: tests only.
    device : torch.device | str (default: "cpu")
        Where to train.
    fast : bool (default: True)
        Use the fast per-sample engine where it supports the model.
    proximal_mu : float (default: 0.0)
        FedProx's proximal term, added to the noisy gradient (it does not touch the data).
    correction : dict[str, Tensor] | None (default: None)
        SCAFFOLD's ``c - c_i``, added to the noisy gradient (it does not touch the data either).

    Returns
    -------
    TrainResult
        Mean loss over the non-empty steps, steps taken, training rows.
    """
    device = torch.device(device)
    model.to(device).train()
    features = torch.as_tensor(x, device=device)
    labels = torch.as_tensor(y, device=device)
    n = len(labels)
    if n == 0:
        raise TaskError("DP-SGD needs at least one training row at this node")
    optimizer = make_optimizer(model, train)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()} if proximal_mu else {}
    sampler, noise_gen = generators(seed, device)
    expected = max(1, int(n * plan.sample_rate))
    std = plan.noise_multiplier * plan.max_grad_norm
    engine = per_sample_engine(model, fast)
    params = engine.params
    loss_fn = task.loss_fn
    total, nonempty = 0.0, 0
    try:
        for _ in range(plan.steps_per_round):
            mask = torch.rand(n, generator=sampler) < plan.sample_rate
            idx = mask.nonzero().reshape(-1).to(device)
            if len(idx):
                try:
                    sums, loss = engine.clipped_sum(features[idx], labels[idx], loss_fn, plan.max_grad_norm)
                except Unsupported:
                    engine.close()
                    engine = OpacusPerSample(model)
                    sums, loss = engine.clipped_sum(features[idx], labels[idx], loss_fn, plan.max_grad_norm)
                total += loss
                nonempty += 1
            else:
                sums = [torch.zeros_like(p) for p in params]
            grads = noisy_step_grads(sums, std=std, expected_batch_size=expected, generator=noise_gen)
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad
            proximal_gradient(model, anchor, proximal_mu)
            corrected_gradient(model, correction)
            optimizer.step()
    finally:
        engine.close()
        for p in params:
            p.grad = None
    return TrainResult(
        loss=total / nonempty if nonempty else float("nan"),
        steps=plan.steps_per_round,
        num_examples=n,
    )
