"""Which data a node trains on: always what the node's own configuration names.

- Deployment: ``data-path`` (the hospital's file) and optionally ``site`` (its name; default: the
  file's stem), split by the node's own ``test-fraction`` (default 0.25) and ``split-seed``
  (default 0): the coordinator never chooses which of a hospital's rows are test rows. The file is
  read against the run's data contract, in the dialect the node config sets (``csv-delimiter``,
  ``csv-decimal``, ``csv-header``) or the one detected; with ``data-contract`` (the kit's copy of
  the federation's contract) a run whose contract differs is refused.
- Simulation: ``partition-id``, set by Flower's simulation engine; the partition is rebuilt
  locally from the experiment's data section and seed.

A file that does not fit the contract is refused with a reason that names the contract and the
number of problems, never a row, a line or a value: the reason goes to the coordinator. The
problems themselves are logged at the node and listed by ``flowerbed node check``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from flowerbed.client.node_config import NodeConfig
from flowerbed.exception import DataError, NodeError
from flowerbed.experiment import DataConfig, Experiment
from flowerbed.tasks.data.catalog import load_federation, load_node_data, resolve_contract
from flowerbed.tasks.data.contract import DataContract, load_contract
from flowerbed.tasks.data.intake import DialectOptions, IntakeError
from flowerbed.tasks.data.validation import hold_out_validation
from flowerbed.tasks.task import SiteData

DEFAULT_TEST_FRACTION = 0.25
DEFAULT_SPLIT_SEED = 0
log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _node_file(
    data_json: str, path: str, site: str, options: DialectOptions, contract: DataContract | None
) -> SiteData:
    data = DataConfig.model_validate(json.loads(data_json))
    held = load_node_data(data, path, site, options, contract)
    return hold_out_validation(held, data.validation_fraction, data.split_seed)


def _data_json(data: DataConfig) -> str:
    try:
        return _data_json_cached(data)
    except TypeError:  # an inline data contract (a dict) cannot be hashed
        return json.dumps(data.model_dump(mode="json"), sort_keys=True)


@functools.lru_cache(maxsize=16)
def _data_json_cached(data: DataConfig) -> str:
    return json.dumps(data.model_dump(mode="json"), sort_keys=True)


@functools.lru_cache(maxsize=8)
def _contract_file(path: str, mtime_ns: int) -> DataContract:
    return load_contract(path)


T = TypeVar("T")
_PER_EXPERIMENT: dict[tuple[str, int], tuple[Experiment, object]] = {}


def per_experiment(what: str, experiment: Experiment, make: Callable[[Experiment], T]) -> T:
    """``make(experiment)``, made once per experiment object (every node of a cohort asks for the same)."""
    held = _PER_EXPERIMENT.get((what, id(experiment)))
    if held is None or held[0] is not experiment:
        if len(_PER_EXPERIMENT) > 64:
            _PER_EXPERIMENT.clear()
        held = _PER_EXPERIMENT[(what, id(experiment))] = (experiment, make(experiment))
    return held[1]  # type: ignore[return-value]


def _federation(experiment: Experiment) -> list[SiteData]:
    """The simulated federation's sites."""
    return per_experiment("sites", experiment, lambda e: validation_splits(load_federation(e.data, e.seed), e.data))


def validation_splits(sites: list[SiteData], data: DataConfig) -> list[SiteData]:
    """Every site with its validation rows held out of its training rows (``data.validation_fraction``)."""
    return [hold_out_validation(site, data.validation_fraction, data.split_seed) for site in sites]


def node_split(data: DataConfig, config: NodeConfig) -> DataConfig:
    """The experiment's data section with the node's own split: its test and validation shares and split seed."""
    fraction = DEFAULT_TEST_FRACTION if config.test_fraction is None else config.test_fraction
    seed = DEFAULT_SPLIT_SEED if config.split_seed is None else config.split_seed
    validation = data.validation_fraction if config.validation_fraction is None else config.validation_fraction
    return data.model_copy(update={"test_fraction": fraction, "split_seed": seed, "validation_fraction": validation})


def dialect_options(config: NodeConfig) -> DialectOptions:
    """The CSV dialect the node config sets (``None`` where it leaves detection on)."""
    return DialectOptions(delimiter=config.csv_delimiter, decimal=config.csv_decimal, header=config.csv_header)


def node_contract(config: NodeConfig) -> DataContract | None:
    """The federation's contract as the node holds it (``data-contract``), or ``None``.

    Raises
    ------
    ConfigError
        The file is missing or not a valid contract.
    """
    if config.data_contract is None:
        return None
    path = Path(config.data_contract).expanduser()
    mtime = path.stat().st_mtime_ns if path.is_file() else 0
    return _contract_file(str(path), mtime)


def check_run_contract(held: DataContract | None, run: DataContract | None, site: str) -> DataContract | None:
    """The contract to read the node's data with: the node's own, when the run's is the same.

    Raises
    ------
    DataError
        The run declares another contract than the one the node holds, or none.
    """
    if held is None:
        return run
    if run is None:
        raise DataError(
            f"site {site}: this node holds the data contract {held.ref}, but the run declares none; "
            "the coordinator's operator sets data.contract in the experiment"
        )
    if run.fingerprint != held.fingerprint:
        raise DataError(
            f"site {site}: the run's data contract is {run.ref}, but this node holds {held.ref} (its kit's); "
            "the node reads its data only as the federation agreed: ask the coordinator's operator which is current"
        )
    return held


def resolve_site(config: NodeConfig, experiment: Experiment) -> SiteData:
    """Load (once per process) the data this node is configured to use.

    Raises
    ------
    NodeError
        When the config names no data, or a partition the experiment does not have.
    DataError
        When the node's file is missing or does not fit the contract (the reason names no row).
    """
    if config.data_path is not None:
        data = node_split(experiment.data, config)
        site = config.site_name or "site"
        contract = check_run_contract(node_contract(config), resolve_contract(data), site)
        try:
            return _node_file(_data_json(data), config.data_path, site, dialect_options(config), contract)
        except IntakeError as exc:
            log.warning("%s", exc)  # at the node only: the problems, with lines and columns
            count = len(exc.problems)
            raise DataError(
                f"site {site}: its data file does not fit the data contract "
                f"{contract.ref if contract else 'of the run'} ({count} blocking problem{'s' if count != 1 else ''}); "
                "the node does not train on it. The hospital sees the problems with `flowerbed node check`"
            ) from None
    if config.partition_id is not None:
        sites = _federation(experiment)
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
