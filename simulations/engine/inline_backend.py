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

YOUNG_THRESHOLD = 20_000  # allocations between collections of the youngest generation (Python's default: 700)


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
    grid = InlineGrid(client_app, num_nodes, batch_handler=handler, freeze_after_first=True)
    context = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    # Everything made so far (modules, the nodes) lives for the whole run, and so does what the
    # first exchange makes (the federation's data, each node's config): the garbage collector need
    # not scan it again at every full collection of a round's objects (the grid freezes that too).
    gc.collect()
    gc.freeze()
    # A round of many nodes makes hundreds of thousands of short-lived objects: collect the young
    # generation less often, so fewer of them are promoted and scanned again by full collections.
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], YOUNG_THRESHOLD), *thresholds[1:])
    try:
        server_app(grid, context)
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        close = getattr(handler, "close", None)
        if close is not None:
            close()
    return grid
