"""Personalized federated learning at the node: what a site keeps, trains and scores as its own model.

``personalization.method`` (the experiment):

- ``fedper`` (Arivazhagan et al. 2019): the personal layers (``personal_layers``, default the
  model's own ``personal_layers`` attribute, else its last layer) stay at the node; every round
  trains the whole model from the global shared layers and the site's own personal layers.
- ``fedrep`` (Collins et al. 2021): the same split; the head is trained first
  (``finetune_steps``) with the body fixed, then the body with the head fixed.
- ``fedbn`` (Li et al. 2021): the normalization layers (parameters and running statistics) stay
  at the node.
- ``ditto`` (Li et al. 2021): the shared model trains as FedAvg's; besides it, each site trains a
  whole personal model with a proximal pull ``ditto_lambda`` towards the global one.
- FENDA-FL (Tyrrell et al. 2023) is ``fedper`` on the ``fenda-mlp`` task: its local feature
  extractor and head stay at the node, its global extractor is shared.
- ``finetune``: nothing personal during training; each evaluation also scores the global model
  fine-tuned on the site's training rows (``finetune_steps`` SGD steps).

What is personal never leaves the node: the reply carries, for every personal parameter, the
value the coordinator sent (so aggregation leaves it unchanged) and the node keeps its own in its
state (``kind = "personal"``, per round, like SCAFFOLD's control variates). Evaluation replies add
the personal model's metrics as ``personal-<metric>``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from flowerbed.exception import NodeError
from flowerbed.experiment import PersonalizationConfig

KIND = "personal"
#: Methods whose shared model keeps some layers at the node.
SPLIT = ("fedper", "fedrep", "fedbn")
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def personal_names(model: nn.Module, config: PersonalizationConfig) -> set[str]:
    """The state-dict names a site keeps at its node under ``config`` (empty unless fedper, fedrep or fedbn).

    Raises
    ------
    NodeError
        When ``personal_layers`` names nothing in the model, or everything.
    """
    state = model.state_dict()
    if config.method == "fedbn":
        names = {
            f"{module_name}.{key}" if module_name else key
            for module_name, module in model.named_modules()
            if isinstance(module, _NORMS)
            for key in module.state_dict()
        }
        if not names:
            raise NodeError("personalization.method = 'fedbn' keeps normalization layers, and this model has none")
        return names
    if config.method not in ("fedper", "fedrep"):
        return set()
    prefixes = config.personal_layers or list(getattr(model, "personal_layers", ())) or [_last_layer(model)]
    names = {k for k in state if any(k == p or k.startswith(p.rstrip(".") + ".") for p in prefixes)}
    unmatched = [p for p in prefixes if not any(k == p or k.startswith(p.rstrip(".") + ".") for k in state)]
    if unmatched or not names or names == set(state):
        raise NodeError(
            f"personalization.personal_layers = {prefixes!r} must name some but not all of the model's layers "
            f"(its parameters: {', '.join(list(state)[:8])}{', ...' if len(state) > 8 else ''})"
        )
    return names


def _last_layer(model: nn.Module) -> str:
    """The name of the last module that holds parameters of its own (a model's head)."""
    owners = [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    if not owners or owners[-1] == "":
        raise NodeError("personalization needs personal_layers for a model without sub-layers")
    return owners[-1]


def overlay(model: nn.Module, kept: Mapping[str, np.ndarray] | None, names: set[str]) -> None:
    """Load the site's own values of its personal ``names`` into ``model`` (none kept yet: the global ones)."""
    if not kept or not names:
        return
    state = model.state_dict()
    update = {k: torch.as_tensor(np.array(kept[k]), dtype=state[k].dtype) for k in names if k in kept}
    model.load_state_dict({**state, **update})


def take_personal(model: nn.Module, received: Mapping[str, np.ndarray], names: set[str]) -> dict[str, np.ndarray]:
    """The trained personal values, then the model reset to the received ones there (what the node sends)."""
    state = model.state_dict()
    personal = {k: state[k].detach().cpu().numpy().copy() for k in names}
    reset = {k: torch.as_tensor(np.array(received[k]), dtype=state[k].dtype) for k in names}
    model.load_state_dict({**state, **reset})
    return personal


def freeze(model: nn.Module, trainable: set[str]) -> None:
    """Let only the parameters named in ``trainable`` learn (FedRep's two phases)."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def unfreeze(model: nn.Module) -> None:
    """Every parameter learns again."""
    for param in model.parameters():
        param.requires_grad_(True)
