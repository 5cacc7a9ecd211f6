"""Vectorized cohorts: many clients of one model architecture train together on stacked weights.

Every client keeps exactly the semantics of ``flowerbed.client.training.train_local``: a fresh
optimizer, batches in the order of ``epoch_permutations(seed, epoch, n)`` (every client's order of
an epoch drawn at once), the task's loss (a mean over the batch), and the mean of the step losses. The
weights of ``K`` clients are stacked along a leading dimension and one step of all of them is one
``torch.func.vmap`` of ``grad_and_value`` over ``functional_call``.

Clients of different sizes are ragged: at a given step, some clients are already done and the
others may have batches of different sizes (the last batch of an epoch is short). For the built-in
models with the built-in cross-entropy (``flowerbed.simulations.cohort.stacked_net``), one step of every
active client is one forward and backward pass: batches are padded to the longest, and each
client's loss is the mean of its own rows' cross-entropies (padding is masked out), which is the
task's loss on the unpadded batch. Any other model or loss runs each step per group of clients
that share a batch size, with ``vmap``. Either way the results equal the sequential path up to
floating-point rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from flowerbed.client.training import StepSchedule, epoch_permutations, schedule_indices
from flowerbed.experiment import TrainConfig
from flowerbed.simulations.cohort.stacked_net import StackedNet, mlp_grads, mlp_sgd_step, per_row_cross_entropy
from flowerbed.tasks.task import cross_entropy

HAND_WRITTEN_MLP = True  # MLP stacks take ``mlp_grads`` (no autograd); False: autograd for every model

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Params = dict[str, torch.Tensor]


class Unsupported(Exception):
    """This cohort cannot take the vectorized path; the caller falls back to the ClientApp."""


@dataclass
class Cohort:
    """The training rows of ``K`` clients, padded to the largest client.

    Attributes
    ----------
    x : torch.Tensor
        Features, ``[K, n_max, *feature_shape]`` (rows past a client's size repeat row 0).
    y : torch.Tensor
        Labels, ``[K, n_max]``.
    n : torch.Tensor
        Rows per client, ``[K]`` (int64).
    """

    x: torch.Tensor
    y: torch.Tensor
    n: torch.Tensor

    @property
    def size(self) -> int:
        """Number of clients."""
        return int(self.n.shape[0])

    def rows(self, clients: torch.Tensor | None, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of rows ``index[j, ...]`` of client ``clients[j]`` (``None``: client ``j``).

        One ``index_select`` on the flattened rows (an advanced index over two dimensions is several
        times slower).
        """
        k, n_max = self.x.shape[:2]
        base = torch.arange(k, device=index.device) if clients is None else clients
        offsets = base.reshape(-1, *([1] * (index.dim() - 1))) * n_max
        flat = (index + offsets).reshape(-1)
        x = self.x.reshape(k * n_max, *self.x.shape[2:]).index_select(0, flat)
        y = self.y.reshape(k * n_max).index_select(0, flat)
        return x.reshape(*index.shape, *self.x.shape[2:]), y.reshape(index.shape)


def stack_cohort(xs: Sequence, ys: Sequence, device: torch.device) -> Cohort:
    """Pad and stack per-client arrays (numpy or torch) into one ``Cohort`` on ``device``."""
    if _equal_numpy(xs) and _equal_numpy(ys) and len(ys[0]) and len(xs[0]) == len(ys[0]):  # no padding
        n = torch.full((len(ys),), len(ys[0]), dtype=torch.int64)
        x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
        return Cohort(x.to(device), y.to(device), n.to(device))
    feats = [torch.as_tensor(x) for x in xs]
    labels = [torch.as_tensor(y) for y in ys]
    n = torch.tensor([len(y) for y in labels], dtype=torch.int64)
    if len(labels) and len({len(y) for y in labels}) == 1 and len(labels[0]):  # equal sizes: no padding
        return Cohort(torch.stack(feats).to(device), torch.stack(labels).to(device), n.to(device))
    n_max = max(1, int(n.max()) if len(n) else 1)
    shape = feats[0].shape[1:]
    x = torch.zeros((len(feats), n_max, *shape), dtype=feats[0].dtype)
    y = torch.zeros((len(labels), n_max), dtype=labels[0].dtype)
    for i, (f, lab) in enumerate(zip(feats, labels, strict=True)):
        if len(lab):
            x[i, : len(lab)] = f
            y[i, : len(lab)] = lab
            x[i, len(lab) :] = f[0]
            y[i, len(lab) :] = lab[0]
    return Cohort(x.to(device), y.to(device), n.to(device))


def _equal_numpy(arrays: Sequence) -> bool:
    """Whether every array is a numpy array of one shape and dtype (then one ``np.stack`` does)."""
    if not len(arrays) or not isinstance(arrays[0], np.ndarray):
        return False
    shape, dtype = arrays[0].shape, arrays[0].dtype
    return all(isinstance(a, np.ndarray) and a.shape == shape and a.dtype == dtype for a in arrays)


def check_functional(model: nn.Module) -> list[str]:
    """Parameter names of a model that ``functional_call`` can run on stacked weights.

    Raises
    ------
    Unsupported
        When the model has buffers (BatchNorm statistics) or frozen parameters.
    """
    if any(True for _ in model.buffers()):
        raise Unsupported("the model has buffers")
    names = [name for name, _ in model.named_parameters()]
    if set(names) != set(model.state_dict()) or not all(p.requires_grad for p in model.parameters()):
        raise Unsupported("the model's state is not exactly its trainable parameters")
    return names


def stacked(weights: Params, k: int, *, wide_last: bool = False) -> Params:
    """``k`` independent copies of one set of weights, stacked on a new leading dimension.

    With ``wide_last`` (for ``StackedNet``'s kernels only: other code may ``.view`` a weight), a 2-D
    weight ``[out, in]`` with fewer inputs than outputs, such as a 13 -> 64 linear layer's, is kept
    as ``[in, out]`` in memory behind a transposed view of the usual shape ``[k, out, in]``. MKL's
    batched products into and with such a weight are faster with the longer dimension last: on
    this project's 2-core CPU, the step of 100 clients' 13 -> 64 layer took 140 µs against 202 µs
    (not measured on a GPU, where the layout changes nothing else).
    """
    return {
        name: w.t().unsqueeze(0).repeat(k, 1, 1).transpose(1, 2)
        if wide_last and w.dim() == 2 and w.shape[1] < w.shape[0]
        else w.unsqueeze(0).repeat(k, *([1] * w.dim()))
        for name, w in weights.items()
    }


class StackedOptimizer:
    """``torch.optim.SGD`` (with momentum) or ``Adam`` for stacked weights, one state per client.

    All clients start together, so a client active at step ``t`` has taken exactly ``t`` steps
    before; the state of clients that are not stepped is left untouched.

    Parameters
    ----------
    train : TrainConfig
        ``optimizer``, ``lr`` and ``momentum`` as ``flowerbed.client.training.make_optimizer`` reads them.
    params : dict[str, torch.Tensor]
        The stacked weights (updated in place by ``step``).
    proximal_mu : float (default: 0.0)
        FedProx's mu: every gradient gets ``mu * (w - anchor)``, as ``proximal_gradient`` adds it.
    anchor : dict[str, torch.Tensor] | None
        The global weights the proximal term pulls towards (unstacked; needed when ``proximal_mu > 0``).
    """

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(
        self, train: TrainConfig, params: Params, *, proximal_mu: float = 0.0, anchor: Params | None = None
    ) -> None:
        self.kind = train.optimizer
        self.lr = train.lr
        self.momentum = train.momentum
        self.params = params
        self.mu = float(proximal_mu)
        self.anchor = {k: v.detach().clone() for k, v in (anchor or {}).items()} if self.mu else {}
        self.state: dict[str, list[torch.Tensor]] = {}
        if self.kind == "adam":
            self.state = {k: [torch.zeros_like(p), torch.zeros_like(p)] for k, p in params.items()}
        elif self.momentum > 0:
            self.state = {k: [torch.zeros_like(p)] for k, p in params.items()}

    @property
    def plain(self) -> bool:
        """Plain SGD: not Adam, no momentum, no proximal term (a step is ``w -= lr * grad``, which can be fused)."""
        return self.kind != "adam" and self.momentum == 0 and not self.mu

    def step(self, grads: Params, rows: torch.Tensor | None, t: int) -> None:
        """Apply step number ``t`` (1-based) to the clients in ``rows`` (``None``: all)."""
        if self.mu:  # FedProx: the proximal term's gradient, per client, from its current weights
            grads = {
                name: g.add(self.params[name] if rows is None else self.params[name][rows], alpha=self.mu).sub_(
                    self.anchor[name], alpha=self.mu
                )
                for name, g in grads.items()
            }
        if rows is None and self.kind != "adam" and self.momentum == 0:  # plain SGD on everyone: in place
            for name, grad in grads.items():
                self.params[name].add_(grad, alpha=-self.lr)
            return
        for name, grad in grads.items():
            p = self.params[name]
            state = self.state.get(name, [])
            cur_p = p if rows is None else p[rows]
            cur_s = [s if rows is None else s[rows] for s in state]
            new_p, new_s = self._update(cur_p, grad, cur_s, t)
            if rows is None:
                p.copy_(new_p)
                for s, v in zip(state, new_s, strict=True):
                    s.copy_(v)
            else:
                p[rows] = new_p
                for s, v in zip(state, new_s, strict=True):
                    s[rows] = v

    def _update(
        self, p: torch.Tensor, g: torch.Tensor, state: list[torch.Tensor], t: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.kind == "adam":
            beta1, beta2 = self.BETAS
            exp_avg = state[0].lerp(g, 1 - beta1)
            exp_avg_sq = state[1].mul(beta2).addcmul(g, g, value=1 - beta2)
            step_size = self.lr / (1 - beta1**t)
            denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add(self.EPS)
            return p.addcdiv(exp_avg, denom, value=-step_size), [exp_avg, exp_avg_sq]
        if self.momentum > 0:
            buf = g.clone() if t == 1 else state[0].mul(self.momentum).add(g)
            return p.add(buf, alpha=-self.lr), [buf]
        return p.add(g, alpha=-self.lr), []


def loss_function(model: nn.Module, loss_fn: LossFn) -> Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(params, x, y) -> loss`` of ``model`` with the given weights (for ``torch.func``)."""

    def loss(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, params, (x,)), y)

    return loss


def epoch_orders(n: Sequence[int], seeds: Sequence[int], epochs: int, device: torch.device) -> torch.Tensor:
    """Each client's batch order, ``[K, epochs, n_max]``, drawn exactly as ``train_local`` draws it."""
    k = len(n)
    sizes = np.repeat(np.asarray(n, dtype=np.int64).reshape(k), epochs)
    clients = np.repeat(np.asarray(seeds, dtype=np.int64).reshape(k), epochs)
    epoch = np.tile(np.arange(epochs, dtype=np.int64), k)
    orders = epoch_permutations(clients, epoch, np.maximum(sizes, 1)) if k else np.zeros((0, 1), dtype=np.int64)
    return torch.from_numpy(orders.reshape(k, epochs, -1)).to(device)


@dataclass
class CohortResult:
    """What a cohort's local training did: final stacked weights, mean loss and steps per client."""

    params: Params
    loss: list[float]
    steps: list[int]


def stacked_net(model: nn.Module, loss_fn: LossFn) -> StackedNet | None:
    """The model on batched kernels when it and the loss allow it (the built-in ones), else ``None``."""
    return StackedNet(model) if loss_fn is cross_entropy and StackedNet.supports(model) else None


def masked_grads(
    net: StackedNet, params: Params, x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, full: bool | None = None
) -> tuple[Params, torch.Tensor]:
    """Every client's gradient and loss on its batch: the first ``counts[k]`` of its ``B`` rows.

    Client ``k``'s loss is the mean cross-entropy of its own rows; the padded rows are multiplied
    by zero. The clients' losses are summed for one backward pass: each client's weights only see
    its own loss. ``full`` says (when the caller knows) whether every client's batch has ``B`` rows.
    """
    width = x.shape[1]
    if full is None:
        full = bool((counts == width).all())
    if net.is_mlp and HAND_WRITTEN_MLP:
        if full:
            row_weight = torch.full(y.shape, 1.0 / width, dtype=x.dtype, device=x.device)
        else:
            row_weight = _row_weight(counts, width, x.dtype)
        grads, rows = mlp_grads(net, params, x, y, row_weight)
        loss = rows.mean(1) if full else (rows * row_weight).sum(1)
        return grads, loss.detach()
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    rows = per_row_cross_entropy(net.forward(leaves, x), y)
    if full:
        loss = rows.mean(1)
    else:
        mask = torch.arange(width, device=x.device) < counts[:, None]
        loss = (rows * mask).sum(1) / counts.to(rows.dtype)
    grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
    return dict(zip(leaves, grads, strict=True)), loss.detach()


def _row_weight(counts: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``[K, width]``: ``1 / counts[k]`` for client ``k``'s first ``counts[k]`` rows, 0 for its padding."""
    mask = torch.arange(width, device=counts.device) < counts[:, None]
    return mask.to(dtype) / counts.to(dtype)[:, None]


def _fusable(net: StackedNet | None, optimizer: StackedOptimizer) -> bool:
    """Whether a step of every client can be ``masked_sgd_step`` (an MLP on hand-written kernels, plain SGD)."""
    return net is not None and net.is_mlp and HAND_WRITTEN_MLP and optimizer.plain


def masked_sgd_step(
    net: StackedNet, params: Params, x: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, lr: float, full: bool
) -> torch.Tensor:
    """``masked_grads`` and a plain SGD step of every client, fused (an MLP on hand-written kernels); the loss."""
    row_weight = None if full else _row_weight(counts, x.shape[1], x.dtype)
    rows = mlp_sgd_step(net, params, x, y, row_weight, lr)
    return rows.mean(1) if row_weight is None else (rows * row_weight).sum(1)


def train_cohort(
    model: nn.Module,
    loss_fn: LossFn,
    cohort: Cohort,
    weights: Params,
    train: TrainConfig,
    seeds: Sequence[int],
    *,
    batched_kernels: bool = True,
    proximal_mu: float = 0.0,
    schedules: Sequence[StepSchedule] | None = None,
) -> CohortResult:
    """``train_local`` for every client of ``cohort`` at once, starting from the same ``weights``.

    Parameters
    ----------
    model : nn.Module
        A module of the task's architecture (its own weights are not used).
    loss_fn : callable
        The task's loss, a mean over the batch.
    cohort : Cohort
        The clients' training rows.
    weights : dict[str, torch.Tensor]
        The global weights every client starts from (names as ``model.named_parameters``).
    train : TrainConfig
        Epochs, batch size and optimizer.
    seeds : sequence of int
        One batch-order seed per client (``derive_seed(seed, "train", round, site)``).
    batched_kernels : bool (default: True)
        ``False`` runs every step with ``vmap`` per batch size even where ``StackedNet`` applies.
    proximal_mu : float (default: 0.0)
        FedProx's proximal term towards ``weights``.
    schedules : sequence of StepSchedule, optional
        ``train.local_steps``: each client's steps of its own iterator (``seeds`` unused).
    """
    model.train()
    device = cohort.x.device
    k, size = cohort.size, train.batch_size
    n_max = cohort.x.shape[1]
    start = {name: w.to(device) for name, w in weights.items()}
    net = stacked_net(model, loss_fn) if batched_kernels else None
    params = stacked(start, k, wide_last=net is not None)
    optimizer = StackedOptimizer(train, params, proximal_mu=proximal_mu, anchor=start)
    n_list = [int(v) for v in cohort.n.tolist()]
    if schedules is not None:
        return _train_scheduled(model, loss_fn, cohort, params, optimizer, schedules, net)
    orders = epoch_orders(n_list, seeds, train.local_epochs, device)
    per_epoch = (cohort.n + size - 1) // size
    total_steps = per_epoch * train.local_epochs
    grad_fn = None if net is not None else vmap(grad_and_value(loss_function(model, loss_fn)))
    fused = _fusable(net, optimizer)
    losses = torch.zeros(k, dtype=torch.float64, device=device)
    for t in range(int(total_steps.max()) if k else 0):
        active = (total_steps > t).nonzero().reshape(-1)
        epoch = t // per_epoch[active]
        start = (t % per_epoch[active]) * size
        batch = torch.clamp(cohort.n[active] - start, max=size)
        if net is not None:  # one padded call for every active client
            groups = [torch.ones_like(batch, dtype=torch.bool)]
        else:  # one unpadded call per batch size
            groups = [batch == b for b in torch.unique(batch).tolist()]
        for pick in groups:
            rows, counts = active[pick], batch[pick]
            width = int(counts.max())
            pos = (start[pick, None] + torch.arange(width, device=device)).clamp(max=n_max - 1)
            idx = orders[rows, epoch[pick]].gather(1, pos)
            everyone = len(rows) == k
            cur = params if everyone else {name: p[rows] for name, p in params.items()}
            x, y = cohort.rows(rows, idx)
            if fused and everyone:
                loss = masked_sgd_step(net, params, x, y, counts, optimizer.lr, bool((counts == width).all()))
                losses += loss.double()
                continue
            if net is not None:
                grads, loss = masked_grads(net, cur, x, y, counts)
            else:
                grads, loss = grad_fn(cur, x, y)
            optimizer.step(grads, None if everyone else rows, t + 1)
            losses[rows] += loss.detach().double()
    steps = total_steps.tolist()
    mean = [float(total) / max(s, 1) for total, s in zip(losses.tolist(), steps, strict=True)]
    return CohortResult(params=params, loss=mean, steps=[int(s) for s in steps])


def _train_scheduled(
    model: nn.Module,
    loss_fn: LossFn,
    cohort: Cohort,
    params: Params,
    optimizer: StackedOptimizer,
    schedules: Sequence[StepSchedule],
    net: StackedNet | None,
) -> CohortResult:
    """``train_cohort`` for clients that each take their schedule's steps (``train.local_steps``)."""
    device, k = cohort.x.device, cohort.size
    index_np, counts_np = schedule_indices(schedules, cohort.n.tolist())
    total = int(max((s.count for s in schedules), default=0))
    index, counts = torch.from_numpy(index_np).to(device), torch.from_numpy(counts_np).to(device)
    grad_fn = None if net is not None else vmap(grad_and_value(loss_function(model, loss_fn)))
    losses = torch.zeros(k, dtype=torch.float64, device=device)
    everyone_steps = (counts_np > 0).all(axis=0)  # per step: every client takes it (known before the loop)
    widths = counts_np.max(axis=0) if k else np.zeros(total, dtype=np.int64)
    full = (counts_np == widths).all(axis=0)
    chunk = _steps_per_gather(cohort, index.shape[2])
    fused = _fusable(net, optimizer)
    for t in range(total):
        if t % chunk == 0:  # the rows of the next ``chunk`` steps, gathered at once
            xs, ys = cohort.rows(None, index[:, t : t + chunk])
        step_x, step_y = xs[:, t % chunk], ys[:, t % chunk]
        if net is not None and everyone_steps[t]:  # one padded call, no selection of clients
            width = int(widths[t])
            x, y = step_x[:, :width], step_y[:, :width]
            if fused:
                loss = masked_sgd_step(net, params, x, y, counts[:, t], optimizer.lr, bool(full[t]))
            else:
                grads, loss = masked_grads(net, params, x, y, counts[:, t], full=bool(full[t]))
                optimizer.step(grads, None, t + 1)
            losses += loss.double()
            continue
        active = (counts[:, t] > 0).nonzero().reshape(-1)
        batch = counts[active, t]
        groups = (
            [torch.ones_like(batch, dtype=torch.bool)]
            if net is not None
            else [batch == b for b in torch.unique(batch).tolist()]
        )
        for pick in groups:
            rows, sizes = active[pick], batch[pick]
            width = int(sizes.max())
            everyone = len(rows) == k
            cur = params if everyone else {name: p[rows] for name, p in params.items()}
            x, y = step_x[rows, :width], step_y[rows, :width]
            grads, loss = masked_grads(net, cur, x, y, sizes) if net is not None else grad_fn(cur, x, y)
            optimizer.step(grads, None if everyone else rows, t + 1)
            losses[rows] += loss.detach().double()
    steps = [int(v) for v in (counts_np > 0).sum(axis=1)]
    mean = [float(tot) / max(s, 1) for tot, s in zip(losses.tolist(), steps, strict=True)]
    return CohortResult(params=params, loss=mean, steps=steps)


_GATHER_BYTES = 64 << 20  # the most the rows of the steps gathered at once may take


def _steps_per_gather(cohort: Cohort, width: int) -> int:
    """How many steps' rows to gather at once: as many as fit in ``_GATHER_BYTES``."""
    per_step = cohort.x[:1, :1].element_size() * cohort.x[0, 0].numel() * width * max(cohort.size, 1)
    return max(1, _GATHER_BYTES // max(per_step, 1))


@torch.no_grad()
def cohort_logits(
    model: nn.Module, weights: Params, xs: Sequence[torch.Tensor], chunk: int = 65536
) -> list[torch.Tensor]:
    """Logits of the same global weights on every client's rows (one forward pass per chunk)."""
    model.eval()
    sizes = [len(x) for x in xs]
    if not sum(sizes):
        return [torch.zeros(0) for _ in xs]
    rows = torch.cat([x for x in xs if len(x)])
    out = torch.cat([functional_call(model, weights, (rows[i : i + chunk],)) for i in range(0, len(rows), chunk)])
    return list(torch.split(out, sizes))
