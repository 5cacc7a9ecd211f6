"""Which data a node trains on: always what the node's own configuration names.

- Deployment: ``data-path`` (the hospital's file) and optionally ``site`` (its name; default: the
  file's stem).
- Simulation: ``partition-id``, set by Flower's simulation engine; the partition is rebuilt
  locally from the experiment's data section and seed.
"""

from __future__ import annotations

import functools
import json

from flowerbed.client.node_config import NodeConfig
from flowerbed.exception import NodeError
from flowerbed.experiment import DataConfig, Experiment
from flowerbed.tasks.data.catalog import load_federation, load_node_data
from flowerbed.tasks.task import SiteData


@functools.lru_cache(maxsize=4)
def _node_file(data_json: str, path: str, site: str) -> SiteData:
    return load_node_data(DataConfig.model_validate(json.loads(data_json)), path, site)


@functools.lru_cache(maxsize=16)
def _data_json(data: DataConfig) -> str:
    return json.dumps(data.model_dump(mode="json"), sort_keys=True)


def resolve_site(config: NodeConfig, experiment: Experiment) -> SiteData:
    """Load (once per process) the data this node is configured to use.

    Raises
    ------
    NodeError
        When the config names no data, or a partition the experiment does not have.
    """
    if config.data_path is not None:
        return _node_file(_data_json(experiment.data), config.data_path, config.site_name or "site")
    if config.partition_id is not None:
        sites = load_federation(experiment.data, experiment.seed)
        pid = config.partition_id
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
