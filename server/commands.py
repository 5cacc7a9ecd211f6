"""Commands of this role, registered on the root ``flowerbed`` app."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import typer


def register(app: typer.Typer, *, report: Callable[[Sequence[Path]], list[Path]] | None = None) -> None:
    """Add this module's commands to ``app``; ``report`` (``flowerbed report``'s writer) serves ``run collect``."""
    from flowerbed.server.deploy_commands import register_deploy

    register_deploy(app, report)
