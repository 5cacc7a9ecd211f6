"""The DP-SGD mechanism: per-sample clipping and Gaussian noise, exactly as Opacus computes them.

Each step of ``flowerbed.client.private_training.train_private`` follows Opacus's
``DPOptimizer`` with a Poisson ``DPDataLoader``:

1. every training row joins the batch with probability ``q`` (an empty batch is still a step);
2. each row's gradient is clipped to norm ``C``: factor ``min(1, C / (||g_i|| + 1e-6))``;
3. the clipped gradients are summed, ``N(0, (sigma C)^2)`` noise is added to every parameter
   (drawn with ``torch.normal`` in parameter order), and the sum is divided by the expected
   batch size ``int(n q)``;
4. the ordinary optimizer steps.

Per-sample gradients come from one of two engines. ``FastPerSample`` handles models whose
trainable layers are ``Linear``, ``Conv2d`` and ``GroupNorm``: it records each layer's input and
output in a forward hook, takes the gradient of the loss with respect to the layer outputs only
(no parameter gradient is computed), and forms per-sample norms without materialising per-sample
gradients where it can (``||g_i a_i^T|| = ||g_i|| ||a_i||`` for a linear layer on flat input). Any
other model uses Opacus's own ``GradSampleModule`` (hooks mode). A test checks that both give the
same clipped, noised gradients as Opacus's optimizer.

Noise and sampling generators are seeded from the operating system's randomness; an integer
``seed`` makes them deterministic and exists for tests only (whoever knows the seed can remove
the noise).
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from flowerbed.exception import TaskError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_private_compatible(model: nn.Module) -> nn.Module:
    """Replace what DP-SGD cannot handle (BatchNorm -> GroupNorm) with Opacus's fixers.

    Call it on the server's global model and on every node's model alike, so that weights keep
    the same names and shapes on both sides. A model that is already compatible is returned
    unchanged (same object).

    Raises
    ------
    TaskError
        When some layer cannot be made compatible; the message lists each problem.
    """
    if ModuleValidator.is_valid(model):
        return model
    fixed = ModuleValidator.fix(model)
    problems = ModuleValidator.validate(fixed, strict=False)
    if problems:
        listed = "; ".join(str(p) for p in problems)
        raise TaskError(f"the task's model cannot be trained with DP-SGD: {listed}")
    return fixed


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Unsupported(Exception):
    """The fast engine met something it cannot compute exactly."""


class FastPerSample:
    """Exact clipped per-sample gradient sums for Linear, Conv2d and GroupNorm layers.

    Parameters
    ----------
    model : nn.Module
        The raw model (not wrapped); hooks are removed by ``close``.
    """

    SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm)

    def __init__(self, model: nn.Module) -> None:
        if not self.supports(model):
            raise Unsupported(type(model).__name__)
        self.model = model
        self.params = _trainable(model)
        self._records: list[tuple[nn.Module, torch.Tensor, torch.Tensor, int]] = []
        self._layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        self._handles = [m.register_forward_hook(self._record) for m in self._layers]

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether every trainable layer is one this engine computes exactly."""
        seen: set[int] = set()
        for m in model.modules():
            own = [id(p) for p in m.parameters(recurse=False)]
            if seen.intersection(own):
                return False  # a parameter shared by two layers: per-layer sums would collide
            seen.update(own)
            if getattr(m, "inplace", False):
                return False  # an in-place op would overwrite a recorded layer output
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                continue
            if type(m) not in cls.SUPPORTED:
                return False
            if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
                return False
        return True

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._records.append((module, inputs[0].detach(), output, output._version))

    def close(self) -> None:
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def clipped_sum(
        self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, max_grad_norm: float
    ) -> tuple[list[torch.Tensor], float]:
        """Sum over the batch of per-sample gradients clipped to ``max_grad_norm``, and the loss."""
        self._records = []
        loss = loss_fn(self.model(x), y)
        records, self._records = self._records, []
        if len({id(r[0]) for r in records}) != len(records):
            raise Unsupported("a layer is called more than once in one forward pass")
        if any(out._version != version for _, _, out, version in records):
            raise Unsupported("a layer's output was changed in place")
        outs = [r[2] for r in records]
        backprops = torch.autograd.grad(loss, outs, allow_unused=True)
        n = x.shape[0]
        norm2 = torch.zeros(n, dtype=loss.dtype, device=x.device)
        parts: dict[nn.Parameter, Callable[[torch.Tensor], torch.Tensor]] = {}
        for (layer, a, _, _), g in zip(records, backprops, strict=True):
            self._layer(layer, a, g, n, norm2, parts)
        factor = (max_grad_norm / (norm2.sqrt() + 1e-6)).clamp(max=1.0)
        sums = []
        for p in self.params:
            make = parts.get(p)
            sums.append(torch.zeros_like(p) if make is None else make(factor).view_as(p))
        return sums, float(loss.detach())

    @staticmethod
    def _layer(
        layer: nn.Module,
        a: torch.Tensor,
        g: torch.Tensor | None,
        n: int,
        norm2: torch.Tensor,
        parts: dict[nn.Parameter, Callable[[torch.Tensor], torch.Tensor]],
    ) -> None:
        if g is None:  # the layer's output did not reach the loss: zero gradients
            return
        g = g * n  # the loss is a mean over the batch; per-sample gradients are of each term
        w = layer.weight
        b = layer.bias
        if isinstance(layer, nn.Linear):
            if a.dim() == 2:
                g2 = g.pow(2).sum(1)
                if w.requires_grad:
                    norm2 += g2 * a.pow(2).sum(1)
                    parts[w] = lambda f, g=g, a=a: (g * f[:, None]).T @ a
                if b is not None and b.requires_grad:
                    norm2 += g2
                    parts[b] = lambda f, g=g: f @ g
                return
            a3 = a.reshape(n, -1, a.shape[-1])
            g3 = g.reshape(n, -1, g.shape[-1])
            if w.requires_grad:
                gs = torch.bmm(g3.transpose(1, 2), a3)
                norm2 += gs.pow(2).sum((1, 2))
                parts[w] = lambda f, gs=gs: torch.einsum("n,nij->ij", f, gs)
            if b is not None and b.requires_grad:
                bs = g3.sum(1)
                norm2 += bs.pow(2).sum(1)
                parts[b] = lambda f, bs=bs: f @ bs
        elif isinstance(layer, nn.Conv2d):
            cols = F.unfold(
                a,
                kernel_size=layer.kernel_size,
                dilation=layer.dilation,
                padding=layer.padding,
                stride=layer.stride,
            )
            g3 = g.reshape(n, g.shape[1], -1)
            if w.requires_grad:
                gs = torch.bmm(g3, cols.transpose(1, 2))
                norm2 += gs.pow(2).sum((1, 2))
                parts[w] = lambda f, gs=gs: torch.einsum("n,nij->ij", f, gs)
            if b is not None and b.requires_grad:
                bs = g3.sum(2)
                norm2 += bs.pow(2).sum(1)
                parts[b] = lambda f, bs=bs: f @ bs
        elif isinstance(layer, nn.GroupNorm):
            if w is not None and w.requires_grad:
                normed = F.group_norm(a, layer.num_groups, eps=layer.eps)
                ws = (normed * g).reshape(n, g.shape[1], -1).sum(2)
                norm2 += ws.pow(2).sum(1)
                parts[w] = lambda f, ws=ws: f @ ws
            if b is not None and b.requires_grad:
                bs = g.reshape(n, g.shape[1], -1).sum(2)
                norm2 += bs.pow(2).sum(1)
                parts[b] = lambda f, bs=bs: f @ bs
        else:  # pragma: no cover - guarded by supports()
            raise Unsupported(type(layer).__name__)


class OpacusPerSample:
    """Clipped per-sample gradient sums from Opacus's ``GradSampleModule`` (any Opacus layer).

    Parameters
    ----------
    model : nn.Module
        The raw model; it is wrapped for the duration and unwrapped by ``close``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = _trainable(model)
        self._wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")

    def close(self) -> None:
        """Remove Opacus's hooks and per-sample buffers from the model."""
        self._wrapped.to_standard_module()

    def clipped_sum(
        self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, max_grad_norm: float
    ) -> tuple[list[torch.Tensor], float]:
        """Sum over the batch of per-sample gradients clipped to ``max_grad_norm``, and the loss."""
        for p in self.params:
            p.grad, p.grad_sample = None, None
        loss = loss_fn(self._wrapped(x), y)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        samples = [p.grad_sample.reshape(x.shape[0], -1) for p in self.params]
        norms = torch.stack([s.norm(2, dim=-1) for s in samples], dim=1).norm(2, dim=1)
        factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        sums = [(factor @ s).view_as(p) for s, p in zip(samples, self.params, strict=True)]
        for p in self.params:
            p.grad, p.grad_sample = None, None
        return sums, float(loss.detach())


def per_sample_engine(model: nn.Module, fast: bool = True) -> FastPerSample | OpacusPerSample:
    """The fast engine when it supports the model (and ``fast``), else Opacus's."""
    if fast and FastPerSample.supports(model):
        return FastPerSample(model)
    return OpacusPerSample(model)


def generators(seed: int | None, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """Sampling (CPU) and noise (on ``device``) generators: OS randomness unless ``seed``."""
    seeds = (secrets.randbits(63), secrets.randbits(63)) if seed is None else (seed, seed + 7919)
    sampler = torch.Generator().manual_seed(seeds[0])
    noise = torch.Generator(device=device).manual_seed(seeds[1])
    return sampler, noise


def noisy_step_grads(
    sums: Sequence[torch.Tensor],
    *,
    std: float,
    expected_batch_size: int,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Add ``N(0, std^2)`` noise to each clipped sum (in order) and divide by the batch size."""
    out = []
    for s in sums:
        if std > 0:
            noise = torch.normal(
                mean=0,
                std=std,
                size=s.shape,
                device=s.device,
                generator=generator,
                dtype=s.dtype,
            )
            s = s + noise
        out.append(s / expected_batch_size)
    return out
