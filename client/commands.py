"""Commands of this role, registered on the root ``flowerbed`` app."""

from __future__ import annotations

import typer

from flowerbed.client.budget import budget_command

node_app = typer.Typer(help="Hospital IT: check data, join a federation, see the privacy budget.")
node_app.command("budget")(budget_command)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    from flowerbed.client.node_commands import register_node_commands

    register_node_commands(node_app)
    app.add_typer(node_app, name="node")
