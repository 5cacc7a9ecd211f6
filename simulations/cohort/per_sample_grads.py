"""Clipped per-sample gradient sums of ``K`` clients from one traced forward pass (no ``vmap``).

The per-sample gradient of a parameterized layer is a product of what the layer received and the
gradient of that sample's loss at the layer's output, as Opacus's grad samplers compute it:

- ``Linear`` (one input vector per sample): ``g_i a_i^T`` for the weight, ``g_i`` for the bias.
  Its squared norm is ``|g_i|^2 |a_i|^2``, so the weight's per-sample gradients are never formed;
  the clipped sum is one ``einsum`` over the rows.
- ``Conv2d``: ``g_i`` (``[O, L]``, ``L`` output positions) times the unfolded input patches
  ``U_i`` (``[C kh kw, L]``), ``g_i U_i^T``; the bias gets ``g_i`` summed over positions.

One backward pass of the summed per-row losses gives every ``g_i`` at once: rows are independent,
so the gradient of the sum at row ``i``'s output is the gradient of row ``i``'s own loss. For an
MLP that pass is written out by hand (``mlp_backprops``, no autograd graph), and each clipped
weight sum is one batched product with the clipping factors folded into its smaller operand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowerbed.simulations.cohort.stacked_net import (
    LayerRecord,
    Params,
    StackedNet,
    Trace,
    mlp_backprops,
    per_row_cross_entropy,
)

CLIP_EPS = 1e-6  # Opacus's ``clip_per_sample``: C / (norm + 1e-6)


def _conv_sample_grads(record: LayerRecord, g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weight ``[K, m, O, C kh kw]`` and bias ``[K, m, O]`` gradients of a stacked conv."""
    module = record.module
    m = g.shape[0]
    patches = F.unfold(record.input.detach(), module.kernel_size, module.dilation, module.padding, module.stride)
    patches = patches.reshape(m, k, -1, patches.shape[-1])  # [m, K, C kh kw, L]
    g = g.reshape(m, k, module.out_channels, -1)  # [m, K, O, L]
    weight = torch.einsum("bkol,bkcl->kboc", g, patches)
    return weight, g.sum(-1).transpose(0, 1)


def clipped_sample_sums(
    net: StackedNet,
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    valid: torch.Tensor,
    max_grad_norm: float,
    *,
    hand_written: bool = True,
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """Sums over rows of the per-sample cross-entropy gradients clipped to ``max_grad_norm``.

    Parameters
    ----------
    net : StackedNet
        The clients' architecture.
    params : dict[str, torch.Tensor]
        Stacked weights ``[K, *shape]``.
    x, y : torch.Tensor
        Rows ``[K, m, *input_shape]`` and labels ``[K, m]`` (padded).
    valid : torch.Tensor
        ``[K, m]`` booleans: which rows are real members of the batch (padding adds nothing).
    hand_written : bool (default: True)
        An MLP takes ``mlp_clipped_sums``; ``False`` runs autograd for every model.

    Returns
    -------
    tuple
        The clipped sums ``[K, *shape]`` per parameter, the clipping factors ``[K, m]`` (zero on
        padding) and the per-row losses ``[K, m]``.
    """
    if net.is_mlp and hand_written:
        return mlp_clipped_sums(net, params, x, y, valid, max_grad_norm)
    k, m = valid.shape
    leaves = {name: p.detach().requires_grad_() for name, p in params.items()}
    trace = Trace()
    loss = per_row_cross_entropy(net.forward(leaves, x, trace), y)
    outputs = [record.output for record in trace.layers]
    backprops = torch.autograd.grad((loss * valid).sum(), outputs)
    norm2 = torch.zeros((k, m), dtype=loss.dtype, device=loss.device)
    parts: list[tuple[LayerRecord, torch.Tensor, torch.Tensor | None]] = []
    for record, g in zip(trace.layers, backprops, strict=True):
        if isinstance(record.module, nn.Linear):
            a = record.input.detach()
            g2 = g.pow(2).sum(-1)
            norm2 += g2 * a.pow(2).sum(-1)
            if record.bias is not None:
                norm2 += g2
            parts.append((record, g, None))
        else:
            weight, bias = _conv_sample_grads(record, g, k)
            norm2 += weight.pow(2).sum((2, 3))
            if record.bias is not None:
                norm2 += bias.pow(2).sum(-1)
            parts.append((record, weight, bias))
    factor = (max_grad_norm / (norm2.sqrt() + CLIP_EPS)).clamp(max=1.0) * valid
    sums: Params = {}
    for record, first, second in parts:
        shape = params[record.weight].shape
        if second is None:  # linear: ``first`` is the output gradient
            scaled = first * factor.unsqueeze(-1)
            sums[record.weight] = torch.bmm(scaled.transpose(1, 2), record.input.detach())
            if record.bias is not None:
                sums[record.bias] = scaled.sum(1)
        else:
            sums[record.weight] = torch.einsum("kb,kboc->koc", factor, first).reshape(shape)
            if record.bias is not None:
                sums[record.bias] = torch.einsum("kb,kbo->ko", factor, second)
    return {name: sums[name] for name in params}, factor, loss.detach()


def mlp_clipped_sums(
    net: StackedNet, params: Params, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, max_grad_norm: float
) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """``clipped_sample_sums`` for an MLP (``net.is_mlp``), with no autograd graph.

    Row ``i``'s squared gradient norm is ``sum over layers of |g_i|^2 (|a_i|^2 + 1)`` (``+ 1`` for a
    bias). The clipped sum of a weight, ``sum_i f_i g_i a_i^T``, is one batched product with the
    factors ``f`` multiplying whichever of ``g`` and ``a`` is narrower; a bias's is ``f^T g``.
    """
    layers, loss = mlp_backprops(net, params, x, y, None)
    norm2: torch.Tensor | None = None
    for layer in layers:
        term = layer.grad.pow(2).sum(-1)
        scale = layer.input.pow(2).sum(-1)
        term = term.mul_(scale.add_(1.0) if layer.module.bias is not None else scale)
        norm2 = term if norm2 is None else norm2.add_(term)
    assert norm2 is not None
    factor = (max_grad_norm / (norm2.sqrt_() + CLIP_EPS)).clamp_(max=1.0).mul_(valid)
    column = factor.unsqueeze(-1)
    sums: Params = {}
    for layer in layers:
        g, a = layer.grad, layer.input
        scaled = g.shape[-1] <= a.shape[-1]
        if scaled:
            g = g * column
        else:
            a = a * column
        sums[f"{layer.name}.weight"] = torch.bmm(g.transpose(1, 2), a)
        if layer.module.bias is not None:
            sums[f"{layer.name}.bias"] = g.sum(1) if scaled else torch.bmm(factor.unsqueeze(1), g).squeeze(1)
    return {name: sums[name] for name in params}, factor, loss
