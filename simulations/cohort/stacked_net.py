"""The built-in models run for ``K`` clients at once, each with its own weights, on batched kernels.

A ``StackedNet`` takes an ``nn.Sequential`` of ``Flatten``, ``Linear``, ``ReLU``, ``Conv2d`` and
``MaxPool2d`` (every built-in task's model) and computes the logits of ``K`` clients on ``[K, B,
*input_shape]`` rows with stacked weights ``[K, *shape]``: a linear layer is one batched matrix
product, a convolution one grouped convolution (client ``k``'s channels form group ``k``). Image
activations are kept as ``[B, K * C, H, W]`` in channels-last memory, where pooling runs many times
faster than in the contiguous layout on a CPU. Each client's logits are those of the model with
its own weights, up to floating-point rounding.

``forward(..., trace=...)`` also records every parameterized layer's input and output: the
per-sample gradients of DP-SGD are computed from them (``flowerbed.simulations.cohort.per_sample_grads``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Params = dict[str, torch.Tensor]


@dataclass
class LayerRecord:
    """One parameterized layer of a traced forward pass."""

    module: nn.Linear | nn.Conv2d
    weight: str
    bias: str | None
    input: torch.Tensor  # Linear: [K, B, in]; Conv2d: [B, K * C, H, W]
    output: torch.Tensor  # Linear: [K, B, out]; Conv2d: [B, K * O, H', W']


@dataclass
class Trace:
    """The parameterized layers of one forward pass, in order."""

    layers: list[LayerRecord] = field(default_factory=list)


class StackedNet:
    """A supported ``nn.Sequential`` evaluated for ``K`` clients with stacked weights.

    Parameters
    ----------
    model : nn.Module
        The task's model; only its architecture is used.

    Raises
    ------
    ValueError
        When a layer is not one of the supported kinds (use ``supports`` to ask first).
    """

    def __init__(self, model: nn.Module) -> None:
        if not self.supports(model):
            raise ValueError("the model is not a Sequential of Flatten, Linear, ReLU, Conv2d and MaxPool2d")
        self.layers = [(name, module) for name, module in model.named_children()]

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """Whether ``model`` is made only of layers this class can stack."""
        if not isinstance(model, nn.Sequential) or not len(model):
            return False
        for module in model:
            if isinstance(module, nn.Conv2d):
                if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
                    return False
            elif isinstance(module, nn.Flatten):
                if module.start_dim != 1 or module.end_dim != -1:
                    return False
            elif isinstance(module, nn.MaxPool2d):
                if module.return_indices:
                    return False
            elif not isinstance(module, nn.Linear | nn.ReLU):
                return False
        return True

    @property
    def is_mlp(self) -> bool:
        """Whether every layer is ``Linear``, ``ReLU`` or ``Flatten`` (``mlp_grads`` applies)."""
        return all(isinstance(m, nn.Linear | nn.ReLU | nn.Flatten) for _, m in self.layers)

    def forward(self, params: Params, x: torch.Tensor, trace: Trace | None = None) -> torch.Tensor:
        """Logits ``[K, B, classes]`` of every client on its rows ``x`` (``[K, B, *input_shape]``)."""
        k, b = x.shape[:2]
        h = x
        image = x.dim() == 5
        if image:  # [K, B, C, H, W] -> [B, K * C, H, W], channels last
            h = x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])
            h = h.contiguous(memory_format=torch.channels_last)
        for name, module in self.layers:
            if isinstance(module, nn.Flatten):
                h = h.reshape(b, k, -1).transpose(0, 1) if image else h.reshape(k, b, -1)
                image = False
            elif isinstance(module, nn.ReLU):
                h = torch.relu(h)
            elif isinstance(module, nn.MaxPool2d):
                h = F.max_pool2d(
                    h, module.kernel_size, module.stride, module.padding, module.dilation, ceil_mode=module.ceil_mode
                )
            elif isinstance(module, nn.Linear):
                h = self._linear(name, module, params, h, trace)
            else:
                h = self._conv(name, module, params, h, k, trace)
        return h

    @staticmethod
    def _linear(name: str, module: nn.Linear, params: Params, h: torch.Tensor, trace: Trace | None) -> torch.Tensor:
        weight, bias = f"{name}.weight", f"{name}.bias" if module.bias is not None else None
        w = params[weight]
        if bias is None:
            out = torch.bmm(h, w.transpose(1, 2))
        else:
            out = torch.baddbmm(params[bias].unsqueeze(1), h, w.transpose(1, 2))
        if trace is not None:
            trace.layers.append(LayerRecord(module, weight, bias, h, out))
        return out

    @staticmethod
    def _conv(
        name: str, module: nn.Conv2d, params: Params, h: torch.Tensor, k: int, trace: Trace | None
    ) -> torch.Tensor:
        weight, bias = f"{name}.weight", f"{name}.bias" if module.bias is not None else None
        w = params[weight]
        b = None if bias is None else params[bias].reshape(-1)
        out = F.conv2d(h, w.reshape(-1, *w.shape[2:]), b, module.stride, module.padding, module.dilation, groups=k)
        if trace is not None:
            trace.layers.append(LayerRecord(module, weight, bias, h, out))
        return out


@dataclass
class LinearBackprop:
    """One linear layer of a hand-written backward pass: its input and the gradient at its output."""

    name: str
    module: nn.Linear
    input: torch.Tensor  # [K, B, in]
    grad: torch.Tensor  # [K, B, out]: row b's share of the loss, differentiated at the layer's output


def mlp_backprops(
    net: StackedNet, params: Params, x: torch.Tensor, y: torch.Tensor, row_weight: torch.Tensor | None
) -> tuple[list[LinearBackprop], torch.Tensor]:
    """Every linear layer's input and output gradient for ``sum_b row_weight[k, b] * cross_entropy(row b)``.

    For a stack of ``Linear``, ``ReLU`` and ``Flatten`` only (``is_mlp``): the forward pass keeps
    each layer's input, the loss's gradient with respect to the logits is ``softmax - onehot``
    times each row's weight (``None``: every row's own loss, unweighted), and the backward pass is
    batched products with no autograd graph. Rows stay apart: row ``b``'s gradients are those of its
    own loss. Returns the layers (first to last) and each row's cross-entropy ``[K, B]``.
    """
    k, b = x.shape[:2]
    h = x.reshape(k, b, -1)
    saved: list[tuple[str, nn.Module, torch.Tensor]] = []
    for name, module in net.layers:
        if isinstance(module, nn.Linear):
            saved.append((name, module, h))
            h = net._linear(name, module, params, h, None)
        elif isinstance(module, nn.ReLU):
            h = torch.relu(h)
            saved.append((name, module, h))
    rows, grad = _cross_entropy_and_grad(h, y)
    if row_weight is not None:
        grad.mul_(row_weight.unsqueeze(-1))
    layers: list[LinearBackprop] = []
    for i in range(len(saved) - 1, -1, -1):
        name, module, kept = saved[i]
        if isinstance(module, nn.ReLU):
            grad = torch.ops.aten.threshold_backward(grad, kept, 0.0)
            continue
        layers.append(LinearBackprop(name, module, kept, grad))  # type: ignore[arg-type]
        if i:
            grad = torch.bmm(grad, params[f"{name}.weight"])
    return layers[::-1], rows


def _cross_entropy_and_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's cross-entropy ``[K, B]`` and its gradient at the logits, ``softmax - onehot``.

    With two classes both come from the logit difference ``d``: the loss is ``softplus(+-d)`` and
    the gradient ``(-g, g)`` with ``g = sigmoid(d) - label`` (a softmax over a last dimension of two
    is several times slower on a CPU). That shortcut does not check its labels: the caller keeps
    them in ``0 .. classes - 1`` (the cohort handler checks a cohort's once a round).
    """
    if logits.shape[-1] == 2:
        d = logits[..., 1] - logits[..., 0]
        label = labels.to(logits.dtype)
        rows = F.softplus(d * label.mul(-2.0).add_(1.0))
        g = torch.sigmoid(d).sub_(label)
        return rows, torch.stack((-g, g), dim=-1)
    log_p = torch.log_softmax(logits, dim=-1)
    rows = -log_p.gather(2, labels.unsqueeze(-1)).squeeze(-1)
    grad = log_p.exp_()
    grad.scatter_add_(2, labels.unsqueeze(-1), torch.full_like(grad[..., :1], -1.0))
    return rows, grad


def mlp_grads(
    net: StackedNet, params: Params, x: torch.Tensor, y: torch.Tensor, row_weight: torch.Tensor
) -> tuple[Params, torch.Tensor]:
    """Every client's gradient of ``sum_b row_weight[k, b] * cross_entropy(row b)``, written out by hand.

    ``mlp_backprops``, then each linear layer's gradients as two batched products. Returns the
    gradients and each row's cross-entropy ``[K, B]``.
    """
    layers, rows = mlp_backprops(net, params, x, y, row_weight)
    grads: Params = {}
    for layer in layers:
        grads[f"{layer.name}.weight"] = torch.bmm(layer.grad.transpose(1, 2), layer.input)
        if layer.module.bias is not None:
            grads[f"{layer.name}.bias"] = layer.grad.sum(1)
    return {key: grads[key] for key in params}, rows


def mlp_sgd_step(
    net: StackedNet, params: Params, x: torch.Tensor, y: torch.Tensor, row_weight: torch.Tensor | None, lr: float
) -> torch.Tensor:
    """One plain SGD step of every client in place, ``w -= lr * grad``: ``mlp_grads`` without the gradients.

    Each weight's step is one fused batched product (``baddbmm_``) into the weight, written for the
    layout it is kept in (``flowerbed.simulations.cohort.vectorized.stacked`` keeps some transposed).
    ``row_weight`` as ``mlp_backprops``, except ``None``: here the mean over the ``B`` rows (``1 / B``
    goes into the step size), not their sum. Returns each row's cross-entropy ``[K, B]``.
    """
    layers, rows = mlp_backprops(net, params, x, y, row_weight)  # every layer's, before any weight moves
    alpha = -lr / x.shape[1] if row_weight is None else -lr
    for layer in layers:
        weight = params[f"{layer.name}.weight"]
        if weight.transpose(1, 2).is_contiguous():  # [K, in, out] in memory
            weight.transpose(1, 2).baddbmm_(layer.input.transpose(1, 2), layer.grad, alpha=alpha)
        else:
            weight.baddbmm_(layer.grad.transpose(1, 2), layer.input, alpha=alpha)
        if layer.module.bias is not None:
            params[f"{layer.name}.bias"].add_(layer.grad.sum(1), alpha=alpha)
    return rows


def per_row_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[K, B]`` cross-entropy of every row: the task's loss on a batch of that row alone."""
    k, b, classes = logits.shape
    return F.cross_entropy(logits.reshape(k * b, classes), labels.reshape(k * b), reduction="none").reshape(k, b)
