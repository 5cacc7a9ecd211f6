"""Plain local training and evaluation on one site's arrays (no DP: see privacy for DP-SGD)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flowerbed.experiment import TrainConfig
from flowerbed.tasks.task import Task

_U64 = np.uint64


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, element-wise on uint64 (wrapping arithmetic)."""
    z = z + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def epoch_permutations(seeds: np.ndarray, epochs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Row ``i``: the rows of a site with ``sizes[i]`` rows in epoch ``epochs[i]`` of iterator ``seeds[i]``.

    Each row's place is the order of a 64-bit hash of (seed, epoch, row), so any number of sites
    and epochs are shuffled at once and a site's order depends only on its own seed, epoch and
    size. The first ``sizes[i]`` entries of row ``i`` are a permutation of ``range(sizes[i])``;
    the rest is padding (the largest row indices).
    """
    seeds = np.asarray(seeds, dtype=np.int64).astype(_U64)
    epochs = np.asarray(epochs, dtype=np.int64).astype(_U64)
    sizes = np.asarray(sizes, dtype=np.int64)
    width = int(sizes.max()) if sizes.size else 0
    rows = np.arange(width, dtype=_U64)
    with np.errstate(over="ignore"):
        key = _mix64(seeds ^ _mix64(epochs ^ _U64(0x5851F42D4C957F2D)))
        hashed = _mix64(key[:, None] ^ _mix64(rows)[None, :])
    hashed[rows[None, :].astype(np.int64) >= sizes[:, None]] = np.iinfo(_U64).max
    # Only padding ties (distinct rows collide with odds of 2**-64): the order needs no stable sort.
    return np.argsort(hashed, axis=1)


@dataclass(frozen=True)
class StepSchedule:
    """``count`` optimizer steps that continue a site's own iterator over its rows (``train.local_steps``).

    The iterator walks an endless sequence of epochs, each a fresh permutation of the rows
    (``epoch_permutations`` of the schedule's seed and the epoch) cut into batches of
    ``batch_size`` with the last partial batch kept. A round takes steps
    ``first .. first + count - 1`` of it, so the next round goes on where this one stopped, and a
    round that is run again takes the same batches.
    """

    first: int
    count: int
    seed: int
    batch_size: int

    def batches(self, n: int) -> Iterator[torch.Tensor]:
        """Row indices of each step's batch."""
        index, counts = schedule_indices([self], [n])
        for t in range(self.count):
            yield torch.from_numpy(index[0, t, : counts[0, t]].copy())


def schedule_indices(schedules: Sequence[StepSchedule], sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every site's batches at once: ``index[i, t, :counts[i, t]]`` are site ``i``'s rows at its step ``t``.

    ``counts[i, t]`` is 0 past site ``i``'s own steps. The same batches as each schedule's
    ``batches``, for any number of sites (each with its own size, seed, steps and batch size).
    """
    k = len(schedules)
    n = np.asarray(sizes, dtype=np.int64).reshape(k)
    first = np.array([s.first for s in schedules], dtype=np.int64)
    count = np.array([s.count for s in schedules], dtype=np.int64)
    size = np.array([s.batch_size for s in schedules], dtype=np.int64)
    seeds = np.array([s.seed for s in schedules], dtype=np.int64)
    total = int(count.max()) if k else 0
    width = int(np.minimum(size, np.maximum(n, 1)).max()) if k else 1
    if k == 0 or total == 0:
        return np.zeros((k, max(total, 1), max(width, 1)), dtype=np.int64), np.zeros((k, max(total, 1)), dtype=np.int64)
    per_epoch = -(-n // size)
    steps = first[:, None] + np.arange(total)[None, :]
    epoch = steps // per_epoch[:, None]
    first_epoch = first // per_epoch
    spans = (first + count - 1) // per_epoch - first_epoch + 1
    span = int(spans.max())
    sites = np.repeat(np.arange(k), span)
    epochs = (first_epoch[:, None] + np.arange(span)[None, :]).reshape(-1)
    orders = epoch_permutations(seeds[sites], epochs, n[sites]).reshape(k, span, -1)
    start = (steps % per_epoch[:, None]) * size[:, None]
    counts = np.clip(n[:, None] - start, 0, size[:, None])
    counts[np.arange(total)[None, :] >= count[:, None]] = 0
    position = np.minimum(start[:, :, None] + np.arange(width)[None, None, :], orders.shape[2] - 1)
    local_epoch = np.minimum(epoch - first_epoch[:, None], span - 1)
    index = orders[np.arange(k)[:, None, None], local_epoch[:, :, None], position]
    return index, counts


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
    orders = epoch_permutations(
        np.full(train.local_epochs, seed), np.arange(train.local_epochs), np.full(train.local_epochs, n)
    )
    for epoch in range(train.local_epochs):
        order = torch.from_numpy(orders[epoch, :n].copy())
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
