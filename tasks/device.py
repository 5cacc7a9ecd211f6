"""Device choice: CUDA when available, else CPU, overridable by the experiment or node."""

from __future__ import annotations

import torch

from flowerbed.exception import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks ``cuda`` when a GPU is visible, else ``cpu``; ``cuda:1`` etc. are honoured."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("task.device", [f"task.device = {name!r}: not a torch device (auto, cpu, cuda)"]) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "task.device",
            [f"task.device = {name!r}: no CUDA device is visible here; use 'auto' or 'cpu'"],
        )
    return device
