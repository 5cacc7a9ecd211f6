"""Plain local training and evaluation on one site's arrays (no DP: see privacy for DP-SGD)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flowerbed.experiment import TrainConfig
from flowerbed.seeds import derive_seed
from flowerbed.tasks.task import Task


@dataclass(frozen=True)
class StepSchedule:
    """``count`` optimizer steps that continue a site's own iterator over its rows (``train.local_steps``).

    The iterator walks an endless sequence of epochs, each a fresh permutation of the rows seeded
    by ``derive_seed(seed, "epoch", e)`` and cut into batches of ``batch_size`` with the last
    partial batch kept. A round takes steps ``first .. first + count - 1`` of it, so the next round
    goes on where this one stopped, and a round that is run again takes the same batches.
    """

    first: int
    count: int
    seed: int
    batch_size: int

    def batches(self, n: int) -> Iterator[torch.Tensor]:
        """Row indices of each step's batch."""
        per_epoch = -(-n // self.batch_size)
        current, order = -1, torch.empty(0, dtype=torch.int64)
        for step in range(self.first, self.first + self.count):
            epoch, position = divmod(step, per_epoch)
            if epoch != current:
                generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
                current, order = epoch, torch.randperm(n, generator=generator)
            yield order[position * self.batch_size : (position + 1) * self.batch_size]


@dataclass(frozen=True)
class TrainResult:
    """What one local training call did: mean loss over its steps, steps taken, examples seen."""

    loss: float
    steps: int
    num_examples: int
    control: dict[str, np.ndarray] | None = None  # SCAFFOLD: the site's new control variate
    control_delta: dict[str, np.ndarray] | None = None  # SCAFFOLD: its change, which the node sends
    personal: dict[str, np.ndarray] | None = None  # personalization: what the site keeps at its node


def corrected_gradient(model: nn.Module, correction: dict[str, torch.Tensor] | None) -> None:
    """Add a fixed vector to every parameter's gradient (SCAFFOLD's ``c - c_i``, Karimireddy et al. 2020).

    Under DP-SGD it is added after clipping and noise: it depends on no row of this step's data.
    """
    if not correction:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.grad is not None and name in correction:
                p.grad.add_(correction[name])


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
    params = [p for p in model.parameters() if p.requires_grad]  # frozen layers (FedRep's phases) stay put
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr)
    return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum)


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
    schedule: StepSchedule | None = None,
    correction: dict[str, torch.Tensor] | None = None,
    anchor: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Mini-batch training for ``train.local_epochs`` epochs, shuffled by ``seed``.

    Deterministic on CPU for a fixed seed: the batch order comes from a seeded generator and the
    built-in models have no dropout. ``proximal_mu`` adds FedProx's proximal term towards the
    weights the model starts from. With ``schedule``, the round is its steps instead of epochs
    (``train.batch_size`` of the schedule, ``seed`` unused). ``correction`` is added to every
    step's gradient (SCAFFOLD). ``anchor`` replaces the starting weights as the proximal term's
    centre (Ditto's personal model is pulled towards the global one).
    """
    model.to(device).train()
    optimizer = make_optimizer(model, train)
    if anchor is None:
        anchor = {k: v.detach().clone() for k, v in model.named_parameters()} if proximal_mu else {}
    features = torch.as_tensor(x, device=device)
    labels = torch.as_tensor(y, device=device)
    total, steps = 0.0, 0
    for batch in _batches(len(labels), train, seed, schedule):
        batch = batch.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss_fn(model(features[batch]), labels[batch])
        loss.backward()
        proximal_gradient(model, anchor, proximal_mu)
        corrected_gradient(model, correction)
        optimizer.step()
        total += float(loss.detach())
        steps += 1
    return TrainResult(loss=total / max(steps, 1), steps=steps, num_examples=len(labels))


def _batches(n: int, train: TrainConfig, seed: int, schedule: StepSchedule | None) -> Iterator[torch.Tensor]:
    """Each step's rows: ``local_epochs`` epochs shuffled by ``seed``, or the schedule's steps."""
    if schedule is not None:
        yield from schedule.batches(n)
        return
    generator = torch.Generator().manual_seed(seed)
    for _ in range(train.local_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, train.batch_size):
            yield order[start : start + train.batch_size]


@torch.no_grad()
def evaluate_local(
    model: nn.Module, task: Task, x: np.ndarray, y: np.ndarray, *, device: torch.device, batch_size: int = 1024
) -> dict[str, float]:
    """Loss and the task's metrics on a whole evaluation set."""
    if len(y) == 0:
        return {"loss": float("nan"), "num-examples": 0}
    labels = torch.as_tensor(y, device=device)
    return {
        **task_metrics(task, predict(model, x, device=device, batch_size=batch_size), labels),
        "num-examples": len(y),
    }


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, *, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """The model's outputs on every row of ``x``, in batches, in evaluation mode."""
    model.to(device).eval()
    return torch.cat(
        [model(torch.as_tensor(x[i : i + batch_size], device=device)) for i in range(0, len(x), batch_size)]
    )


@torch.no_grad()
def task_metrics(task: Task, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The task's loss and its metrics on a whole set of outputs."""
    return {"loss": float(task.loss_fn(logits, labels)), **task.metrics_fn(logits, labels)}
