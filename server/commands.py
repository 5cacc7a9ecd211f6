"""Commands of this role, registered on the root ``flowerbed`` app."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    from flowerbed.server.deploy_commands import register_deploy

    register_deploy(app)
