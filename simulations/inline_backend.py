"""The ``inline`` backend: the ServerApp and every virtual node in this one process."""

from __future__ import annotations

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from flowerbed.experiment import Experiment
from flowerbed.simulations.inline_grid import InlineGrid


def run_inline(experiment: Experiment, server_app: ServerApp, client_app: ClientApp, num_nodes: int) -> None:
    """Run ``server_app`` against ``num_nodes`` in-process nodes."""
    grid = InlineGrid(client_app, num_nodes)
    context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    server_app(grid, context)
