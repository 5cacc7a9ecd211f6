"""Plain local training and evaluation on one site's arrays (no DP: see privacy for DP-SGD)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flowerbed.experiment import TrainConfig
from flowerbed.tasks.task import Task


@dataclass(frozen=True)
class TrainResult:
    """What one local training call did: mean loss over its steps, steps taken, examples seen."""

    loss: float
    steps: int
    num_examples: int


def proximal_gradient(model: nn.Module, anchor: dict[str, torch.Tensor], mu: float) -> None:
    """Add FedProx's proximal term's gradient, ``mu * (w - anchor)``, to every parameter's gradient.

    The term ``mu / 2 * ||w - anchor||^2`` pulls the local model towards the global weights it
    started from (Li et al. 2020); it is added to the gradient, not to the reported loss.
    """
    if not mu:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.grad is not None:
                p.grad.add_(p.detach() - anchor[name], alpha=mu)


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """A fresh optimizer for one round (no state carried across rounds)."""
    if train.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=train.lr)
    return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum)


def train_local(
    model: nn.Module,
    task: Task,
    x: np.ndarray,
    y: np.ndarray,
    train: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Mini-batch training for ``train.local_epochs`` epochs, shuffled by ``seed``.

    Deterministic on CPU for a fixed seed: the batch order comes from a seeded generator and the
    built-in models have no dropout. ``proximal_mu`` adds FedProx's proximal term towards the
    weights the model starts from.
    """
    model.to(device).train()
    optimizer = make_optimizer(model, train)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()} if proximal_mu else {}
    features = torch.as_tensor(x, device=device)
    labels = torch.as_tensor(y, device=device)
    generator = torch.Generator().manual_seed(seed)
    total, steps = 0.0, 0
    for _ in range(train.local_epochs):
        order = torch.randperm(len(labels), generator=generator).to(device)
        for start in range(0, len(labels), train.batch_size):
            batch = order[start : start + train.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss_fn(model(features[batch]), labels[batch])
            loss.backward()
            proximal_gradient(model, anchor, proximal_mu)
            optimizer.step()
            total += float(loss.detach())
            steps += 1
    return TrainResult(loss=total / max(steps, 1), steps=steps, num_examples=len(labels))


@torch.no_grad()
def evaluate_local(
    model: nn.Module, task: Task, x: np.ndarray, y: np.ndarray, *, device: torch.device, batch_size: int = 1024
) -> dict[str, float]:
    """Loss and the task's metrics on a whole evaluation set."""
    model.to(device).eval()
    if len(y) == 0:
        return {"loss": float("nan"), "num-examples": 0}
    logits = torch.cat(
        [model(torch.as_tensor(x[i : i + batch_size], device=device)) for i in range(0, len(y), batch_size)]
    )
    labels = torch.as_tensor(y, device=device)
    metrics = {"loss": float(task.loss_fn(logits, labels))}
    metrics.update(task.metrics_fn(logits, labels))
    metrics["num-examples"] = len(y)
    return metrics
