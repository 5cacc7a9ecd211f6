"""The ``inline`` backend: the ServerApp and every virtual node in this one process.

Train and evaluate messages of built-in tasks are answered as vectorized cohorts
(``flowerbed.simulations.engine.cohort_handler``); everything else goes to the ClientApp, one message at
a time. With ``backend.workers > 1`` the cohorts are shared among that many Ray actors
(``flowerbed.simulations.engine.inline_workers``).
"""

from __future__ import annotations

import gc

from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from flowerbed.client.app import app as flowerbed_client_app
from flowerbed.experiment import Experiment
from flowerbed.simulations.engine.cohort_handler import CohortHandler
from flowerbed.simulations.engine.inline_grid import InlineGrid


def run_inline(
    experiment: Experiment,
    server_app: ServerApp,
    client_app: ClientApp,
    num_nodes: int,
) -> InlineGrid:
    """Run ``server_app`` against ``num_nodes`` in-process nodes; return the grid (for its stats).

    ``backend.vectorize = false``, or any ClientApp other than flowerbed's own, answers every
    message with the ClientApp, one at a time (the reference path).
    """
    # Cohorts reproduce flowerbed's own ClientApp: any other app answers every message itself.
    vectorize = experiment.backend.vectorize and client_app is flowerbed_client_app
    workers = experiment.backend.workers
    if vectorize and workers > 1:
        from flowerbed.simulations.engine.inline_workers import WorkerPool

        handler = WorkerPool(workers, experiment.backend)
    else:
        handler = CohortHandler(client_app, vectorize=vectorize)
    grid = InlineGrid(client_app, num_nodes, batch_handler=handler)
    context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    # Everything made so far (modules, the federation's data, the nodes) lives for the whole run:
    # the garbage collector need not scan it again at every full collection of a round's objects.
    gc.collect()
    gc.freeze()
    try:
        server_app(grid, context)
    finally:
        gc.unfreeze()
        close = getattr(handler, "close", None)
        if close is not None:
            close()
    return grid
