"""The ``flower`` backend: Flower's simulation engine (Ray), the same ServerApp and ClientApp."""

from __future__ import annotations

import logging
import os
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from flowerbed.experiment import BackendConfig


def backend_config(config: BackendConfig) -> dict[str, Any]:
    """Flower's ``backend_config``: resources per virtual node and Ray's start-up arguments."""
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR}
    if config.ray_address:
        init_args["address"] = config.ray_address
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus},
        "init_args": init_args,
    }


def run_on_flower(server_app: ServerApp, client_app: ClientApp, num_nodes: int, config: BackendConfig) -> None:
    """Run the apps on Flower's simulation engine with one virtual SuperNode per site."""
    import warnings

    environment = dict(os.environ)  # before Ray is imported: importing it edits the environment
    try:
        from flwr.simulation import run_simulation

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_nodes,
                backend_config=backend_config(config),
            )
    finally:
        # Ray leaves PYTHONPATH (and more) set in this process; later subprocesses must not inherit it.
        os.environ.clear()
        os.environ.update(environment)
