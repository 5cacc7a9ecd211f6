"""The ``flowerbed`` command: one typer app, one module of commands per user role.

- researchers: ``simulate``, ``report``, ``sweep`` (flowerbed.simulations.commands)
- the coordinator's operator: ``provision``, ``coordinator``, ``run`` (flowerbed.server.commands)
- hospital IT: ``node`` (flowerbed.client.commands)
- everyone who watches runs: ``dashboard`` (flowerbed.server.dashboard)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import typer
from rich.console import Console

from flowerbed.exception import FlowerbedError

app = typer.Typer(
    name="flowerbed",
    help="Federated learning for hospitals on Flower: simulate, provision, coordinate, join.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _write_report(run_dirs: Sequence[Path]) -> list[Path]:
    """``flowerbed report``'s writer, for ``flowerbed run collect`` (the server package cannot import it)."""
    from flowerbed.simulations.research.report import write_report

    return write_report(run_dirs)


def _register() -> None:
    from flowerbed.client import commands as node_commands
    from flowerbed.server import commands as server_commands
    from flowerbed.server import dashboard
    from flowerbed.simulations import commands as sim_commands

    sim_commands.register(app)
    server_commands.register(app, report=_write_report)
    for module in (node_commands, dashboard):
        module.register(app)


def main() -> None:
    """Entry point: user errors print one clear message and exit 2, never a traceback."""
    _register()
    try:
        code = app(standalone_mode=False)  # without standalone mode, click returns typer.Exit's code
    except FlowerbedError as exc:
        from rich.markup import escape

        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
