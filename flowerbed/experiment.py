"""The experiment file: one validated TOML document that describes a federated run.

Every section is a pydantic model that forbids unknown keys, so a typo is an error that names the
key, never a silently ignored setting. ``load_experiment`` gathers every problem into one
``ConfigError`` before anything runs.
"""

from __future__ import annotations

import itertools
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


class SubgroupConfig(_Section):
    """One subgroup column the nodes evaluate by: its raw values, or bands of them."""

    column: str = Field(min_length=1)  # a column of the site's raw data (the data contract's name)
    name: str | None = None  # how reports call it (default: the column, "<column> band" with cuts)
    cuts: list[float] | None = None  # increasing cut points: bands <c1, c1 to <c2, ..., >=cN
    levels: dict[str, str] | None = None  # code -> name (default: the data contract's levels)

    @field_validator("cuts")
    @classmethod
    def _increasing(cls, cuts: list[float] | None) -> list[float] | None:
        if cuts is not None and (not cuts or any(b <= a for a, b in itertools.pairwise(cuts))):
            raise ValueError("cuts must be a non-empty list of increasing numbers, e.g. [45, 55, 65]")
        return cuts

    @property
    def label(self) -> str:
        """The subgroup's name in replies and reports."""
        return self.name or (f"{self.column} band" if self.cuts else self.column)


class ClinicalConfig(_Section):
    """Clinical metrics at the nodes on the final evaluation, per subgroup (docs/evaluation.md)."""

    enabled: bool = True
    threshold: float = Field(default=0.5, gt=0, lt=1)  # predicted positive when P(class 1) >= threshold
    bins: int = Field(default=20, ge=2, le=100)  # equal-width score bins of the histograms
    min_count: int = Field(default=10, ge=1)  # cells of fewer patients are suppressed at the node
    subgroups: list[SubgroupConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _distinct_names(self) -> ClinicalConfig:
        labels = [s.label for s in self.subgroups]
        if len(set(labels)) != len(labels) or "all" in labels:
            raise ValueError("evaluate.clinical.subgroups need distinct names other than 'all' (set name = ...)")
        return self


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
    clinical: ClinicalConfig = Field(default_factory=ClinicalConfig)


class PersonalizationConfig(_Section):
    """Personalized federated learning: what each site keeps at its node and evaluates as its own model."""

    # finetune: the global model fine-tuned on the site's rows before each evaluation; fedper: the
    # personal layers stay at the node; fedrep: the same, the head trained first with the body fixed;
    # fedbn: the normalization layers stay at the node; ditto: a whole personal model pulled towards
    # the global one.
    method: Literal["none", "finetune", "fedper", "fedrep", "fedbn", "ditto"] = "none"
    # fedper/fedrep: parameter name prefixes kept at the node (default: the model's last layer)
    personal_layers: list[str] = Field(default_factory=list)
    finetune_steps: int = Field(default=100, gt=0)  # finetune: SGD steps; fedrep: the head's steps
    ditto_lambda: float = Field(default=0.1, ge=0)  # ditto: the pull towards the global model


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
    """How a simulation executes its virtual nodes: in this process (``inline``) unless it asks for Flower's engine."""

    name: Literal["flower", "inline"] = "inline"
    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    ray_address: str | None = None
    vectorize: bool = True  # inline: train built-in models as vectorized cohorts
    workers: int = Field(default=1, ge=1)  # inline: Ray actors sharing each round's clients


class TrackingConfig(_Section):
    """Experiment tracking at the coordinator (the optional extra ``flowerbed[tracking]``)."""

    mlflow: bool = False
    # A tracking server or database; none: a file store in the run folder (mlflow/).
    mlflow_uri: str | None = None
    mlflow_experiment: str | None = None  # none: the experiment's name
    tensorboard: bool = False  # event files in the run folder (tensorboard/)

    @field_validator("mlflow_uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        if uri and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@]*@", uri):
            raise ValueError(
                "the experiment travels to every node: keep credentials out of tracking.mlflow_uri and give "
                "them to MLflow in its environment (MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN)"
            )
        return uri


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
    personalization: PersonalizationConfig = Field(default_factory=PersonalizationConfig)
    secagg: SecAggConfig = Field(default_factory=SecAggConfig)
    scenario: ScenarioConfig = Field(default_factory=ScenarioConfig)
    backend: BackendConfig = Field(default_factory=BackendConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

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
    def _personalization_fits(self) -> Experiment:
        method = self.personalization.method
        if method == "none":
            return self
        if self.strategy.name == "SCAFFOLD":
            raise ValueError(
                f"personalization.method = {method!r} with strategy.name = 'SCAFFOLD': SCAFFOLD's control variates "
                "assume one shared model; use FedAvg, FedProx or an adaptive strategy"
            )
        if method == "fedrep" and self.privacy.enabled:
            raise ValueError(
                "personalization.method = 'fedrep' trains the head without DP-SGD before the body's DP round, which "
                "would let the released body depend on an unprotected head: use 'fedper' (one DP-SGD round over "
                "both) or 'ditto' under privacy.enabled = true"
            )
        return self

    @model_validator(mode="after")
    def _scaffold_needs_plain_sgd(self) -> Experiment:
        if self.strategy.name != "SCAFFOLD":
            return self
        if self.train.optimizer != "sgd" or self.train.momentum:
            raise ValueError(
                "strategy.name = 'SCAFFOLD' updates each node's control variate from its SGD steps: set "
                "train.optimizer = 'sgd' and train.momentum = 0"
            )
        if self.secagg.enabled:
            raise ValueError(
                "strategy.name = 'SCAFFOLD' needs each node's control-variate change beside its update, which "
                "secure aggregation does not carry: set secagg.enabled = false or use FedAvg/FedProx"
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
