"""The experiment file: one validated TOML document that describes a federated run.

Every section is a pydantic model that forbids unknown keys, so a typo is an error that names the
key, never a silently ignored setting. ``load_experiment`` gathers every problem into one
``ConfigError`` before anything runs.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flowerbed.config_utils import read_toml, validate
from flowerbed.exception import ConfigError

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class TaskConfig(_Section):
    """What model is trained: a built-in task name or a user task ``package.module:attr``."""

    name: str = "tabular-mlp"
    args: dict[str, Any] = Field(default_factory=dict)
    device: str = "auto"
    initial_weights: str | None = None  # a safetensors file of the global model before round 1


class PartitionConfig(_Section):
    """How a pooled dataset is split into virtual clients (ignored for natural federations)."""

    kind: Literal["natural", "iid", "dirichlet", "pathological", "quantity"] = "natural"
    num_clients: int = Field(default=4, gt=0)
    alpha: float = Field(default=0.5, gt=0)
    classes_per_client: int = Field(default=2, gt=0)
    power: float = Field(default=1.5, gt=0)
    column: str | None = None


class DataConfig(_Section):
    """Where the data comes from and how each site's train/test split is made."""

    dataset: str = "heart-disease"
    path: str | None = None
    label_column: str | None = None
    site_column: str | None = None
    # The federation's data contract: a built-in name ("heart-disease") or the contract as a table
    # (checked by flowerbed.tasks.data.contract); none: the dataset's own, if it has one.
    contract: str | dict[str, Any] | None = None
    num_classes: int = Field(default=2, ge=2)
    test_fraction: float = Field(default=0.25, gt=0, lt=1)
    # Each node holds out this share of its training rows as its validation split (0: none).
    validation_fraction: float = Field(default=0.0, ge=0, lt=1)
    split_seed: int = 0
    partition: PartitionConfig = Field(default_factory=PartitionConfig)


class SiteTrainConfig(_Section):
    """One site's own local work, where it differs from the federation's."""

    local_epochs: int | None = Field(default=None, gt=0)
    local_steps: int | None = Field(default=None, gt=0)
    batch_size: int | None = Field(default=None, gt=0)


class EarlyStoppingConfig(_Section):
    """Stop when the federated validation metric has not improved for ``patience`` validations."""

    metric: str | None = None  # a key of the validation replies; none: the task's primary metric
    mode: Literal["auto", "min", "max"] = "auto"  # auto: min for a loss, else the task's direction
    patience: int = Field(default=5, gt=0)
    min_delta: float = Field(default=0.0, ge=0)


class TrainConfig(_Section):
    """Local training at each node, and how many nodes take part in each round."""

    local_epochs: int = Field(default=1, gt=0)
    # N optimizer steps per round from a per-site iterator that keeps its place across rounds
    # (reshuffled every epoch, last partial batch kept); replaces local_epochs when set.
    local_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=32, gt=0)
    sites: dict[str, SiteTrainConfig] = Field(default_factory=dict)  # per-site batch size, steps or epochs
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    clients_per_round: int | None = Field(default=None, gt=0)
    min_nodes: int | None = Field(default=None, gt=0)
    round_timeout: float = Field(default=600.0, gt=0)
    # The weight each site reports as num-examples (what the strategy averages by).
    weighting: Literal["train-rows", "steps", "uniform", "task"] = "train-rows"
    # What one reply may claim: its weight (num-examples) and the norm of its update.
    max_examples: int = Field(default=10_000_000, gt=0)
    max_update_norm: float | None = Field(default=1000.0, gt=0)
    early_stopping: EarlyStoppingConfig | None = None


class StrategyConfig(_Section):
    """The Flower strategy by name (``FedAvg``, ``FedAdam``, ...) or ``package.module:attr``."""

    name: str = "FedAvg"
    args: dict[str, Any] = Field(default_factory=dict)


class EvaluateConfig(_Section):
    """Which evaluations run after each round."""

    federated: bool = True
    central: bool = True
    local_baselines: bool = False
    plots: bool = True
    validation_every: int = Field(default=1, gt=0)  # rounds between federated validations
    # Which global model the final figures are for: the last round's or the best on validation
    # (auto: best when data.validation_fraction > 0).
    report_model: Literal["auto", "last", "best"] = "auto"


class PrivacyConfig(_Section):
    """Sample-level DP-SGD at every node (Opacus)."""

    enabled: bool = False
    target_epsilon: float | None = Field(default=None, gt=0)
    noise_multiplier: float | None = Field(default=None, gt=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    delta: float | None = Field(default=None, gt=0, lt=1)
    accountant: Literal["prv", "rdp"] = "prv"

    @model_validator(mode="after")
    def _one_noise_source(self) -> PrivacyConfig:
        if self.enabled and (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "set exactly one of privacy.target_epsilon (e.g. 3.0) or "
                "privacy.noise_multiplier (e.g. 1.1) when privacy.enabled = true"
            )
        return self


class SecAggConfig(_Section):
    """Secure aggregation: the coordinator learns only the sum of the updates."""

    enabled: bool = False
    neighbours: int | None = Field(default=None, gt=0)
    threshold: int | None = Field(default=None, gt=0)
    clip_range: float = Field(default=8.0, gt=0)
    quantization_bits: int = Field(default=16, ge=2, le=30)
    max_weight: float | None = Field(default=None, gt=0)
    stochastic_rounding: bool = True


class ScenarioConfig(_Section):
    """Simulated failures: dropouts, stragglers and clients that join late."""

    dropout: float = Field(default=0.0, ge=0, lt=1)
    straggler_fraction: float = Field(default=0.0, ge=0, lt=1)
    straggler_delay: float = Field(default=0.0, ge=0)
    late_join_fraction: float = Field(default=0.0, ge=0, lt=1)
    late_join_round: int = Field(default=1, ge=1)


class BackendConfig(_Section):
    """How a simulation executes its virtual nodes."""

    name: Literal["flower", "inline"] = "flower"
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    ray_address: str | None = None
    vectorize: bool = True  # inline: train built-in models as vectorized cohorts
    workers: int = Field(default=1, ge=1)  # inline: Ray actors sharing each round's clients


class Experiment(_Section):
    """A whole experiment: see ``docs/experiments.md`` for every key."""

    name: str = "experiment"
    seed: int = 0
    rounds: int = Field(default=10, gt=0)
    output: str = "runs"
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = Field(default_factory=SecAggConfig)
    scenario: ScenarioConfig = Field(default_factory=ScenarioConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not RUN_NAME.fullmatch(name):
            raise ValueError(
                "the run's name becomes a folder name: use letters, digits, '.', '_' and '-' (at most 64, "
                "starting with a letter or digit), e.g. 'heart-dp'"
            )
        return name

    @model_validator(mode="after")
    def _secagg_needs_a_weighted_mean(self) -> Experiment:
        robust = ("FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan")
        if self.secagg.enabled and self.strategy.name in robust:
            raise ValueError(
                f"strategy.name = {self.strategy.name!r} needs every node's individual update, but with "
                "secagg.enabled = true the coordinator only learns their sum: use FedAvg, FedProx, FedAvgM, "
                "FedAdam, FedYogi or FedAdagrad, or set secagg.enabled = false"
            )
        return self

    @model_validator(mode="after")
    def _selection_needs_validation(self) -> Experiment:
        if self.data.validation_fraction > 0:
            return self
        if self.train.early_stopping is not None:
            raise ValueError(
                "train.early_stopping watches the federated validation metric: set data.validation_fraction "
                "(e.g. 0.2) so that every node holds out a validation split"
            )
        if self.evaluate.report_model == "best":
            raise ValueError(
                "evaluate.report_model = 'best' picks the model by its validation metric: set "
                "data.validation_fraction (e.g. 0.2)"
            )
        return self

    @property
    def reports_best_model(self) -> bool:
        """Whether the final figures are for the best model on validation (else the last round's)."""
        choice = self.evaluate.report_model
        return choice == "best" or (choice == "auto" and self.data.validation_fraction > 0)

    def train_for(self, site: str) -> TrainConfig:
        """The local work of one site: ``train`` with that site's own entries of ``train.sites`` applied."""
        own = self.train.sites.get(site)
        if own is None:
            return self.train
        update = {k: v for k, v in own.model_dump().items() if v is not None}
        if "local_epochs" in update and "local_steps" not in update:
            update["local_steps"] = None  # a site that sets epochs trains in epochs
        return self.train.model_copy(update=update)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able form (the resolved configuration)."""
        return self.model_dump(mode="json")


def parse_experiment(data: dict[str, Any], source: str = "<experiment>") -> Experiment:
    """Validate a dict (already parsed TOML) into an ``Experiment``; raise ``ConfigError``."""
    return validate(Experiment, data, source, "docs/experiments.md")


def experiment_data(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """An experiment file's contents with ``key.sub=value`` overrides applied (not yet validated)."""
    data = read_toml(path, "an experiment .toml")
    for item in overrides or []:
        apply_override(data, item, str(path))
    return data


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> Experiment:
    """Read, override (``key.sub=value``) and validate an experiment file.

    Raises
    ------
    ConfigError
        Naming the file and every bad key, before anything runs.
    """
    return parse_experiment(experiment_data(path, overrides), str(path))


def apply_override(data: dict[str, Any], item: str, source: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as TOML, else kept as text."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(source, [f"override {item!r} must look like key.sub=value"])
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(source, [f"override {item!r}: {part} is not a section"])
    node[parts[-1]] = value
