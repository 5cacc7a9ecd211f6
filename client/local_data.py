"""Which data a node trains on: always what the node's own configuration names.

- Deployment: ``data-path`` (the hospital's file) and optionally ``site`` (its name; default: the
  file's stem) in the SuperNode's ``--node-config``.
- Simulation: ``partition-id`` and ``num-partitions``, set by Flower's simulation engine; the
  partition is rebuilt locally from the experiment's data section and seed.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from flwr.app import Context

from flowerbed.exception import NodeError
from flowerbed.experiment import DataConfig, Experiment
from flowerbed.tasks.data.catalog import load_federation, load_node_data
from flowerbed.tasks.task import SiteData


@functools.lru_cache(maxsize=4)
def _node_file(data_json: str, path: str, site: str) -> SiteData:
    return load_node_data(DataConfig.model_validate(json.loads(data_json)), path, site)


def site_name(node_config: dict) -> str | None:
    """The site name a deployed node reports (``site``, else the data file's stem)."""
    if "site" in node_config:
        return str(node_config["site"])
    if "data-path" in node_config:
        return Path(str(node_config["data-path"])).stem
    return None


def resolve_site(context: Context, experiment: Experiment) -> SiteData:
    """Load (once per process) the data this node is configured to use."""
    node_config = context.node_config
    if "data-path" in node_config:
        data_json = json.dumps(experiment.data.model_dump(mode="json"), sort_keys=True)
        return _node_file(data_json, str(node_config["data-path"]), site_name(node_config) or "site")
    if "partition-id" in node_config:
        sites = load_federation(experiment.data, experiment.seed)
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(sites):
            raise NodeError(
                f"partition-id {pid} is out of range: the experiment has {len(sites)} sites; "
                f"start the simulation with {len(sites)} nodes"
            )
        return sites[pid]
    raise NodeError(
        "the node config names no data: start the SuperNode with "
        '--node-config \'data-path="/path/to/data.csv" site="name"\''
    )
