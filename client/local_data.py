"""Which data a node trains on: always what the node's own configuration names.

- Deployment: ``data-path`` (the hospital's file) and optionally ``site`` (its name; default: the
  file's stem), split by the node's own ``test-fraction`` (default 0.25) and ``split-seed``
  (default 0): the coordinator never chooses which of a hospital's rows are test rows.
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

DEFAULT_TEST_FRACTION = 0.25
DEFAULT_SPLIT_SEED = 0


@functools.lru_cache(maxsize=4)
def _node_file(data_json: str, path: str, site: str) -> SiteData:
    return load_node_data(DataConfig.model_validate(json.loads(data_json)), path, site)


@functools.lru_cache(maxsize=16)
def _data_json(data: DataConfig) -> str:
    return json.dumps(data.model_dump(mode="json"), sort_keys=True)


def node_split(data: DataConfig, config: NodeConfig) -> DataConfig:
    """The experiment's data section with the node's own split (its ``test-fraction`` and ``split-seed``)."""
    fraction = DEFAULT_TEST_FRACTION if config.test_fraction is None else config.test_fraction
    seed = DEFAULT_SPLIT_SEED if config.split_seed is None else config.split_seed
    return data.model_copy(update={"test_fraction": fraction, "split_seed": seed})


def resolve_site(config: NodeConfig, experiment: Experiment) -> SiteData:
    """Load (once per process) the data this node is configured to use.

    Raises
    ------
    NodeError
        When the config names no data, or a partition the experiment does not have.
    """
    if config.data_path is not None:
        data = node_split(experiment.data, config)
        return _node_file(_data_json(data), config.data_path, config.site_name or "site")
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
