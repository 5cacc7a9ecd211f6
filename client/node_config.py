"""One typed schema for a hospital node's configuration (Flower's ``context.node_config``).

A node's configuration is a flat mapping of hyphenated keys to str, int, float or bool values,
given to a SuperNode with ``--node-config`` or set by Flower's simulation engine for virtual
nodes. :func:`parse_node_config` checks every key at once and reports every problem in one
:class:`~flowerbed.exception.ConfigError`.

| key | type | default | meaning |
|---|---|---|---|
| ``site`` | str | data file's stem | the site's name |
| ``data-path`` | str (path) | none | the hospital's data file (a deployed node) |
| ``partition-id`` | int >= 0 | none | virtual node's partition (set by Flower's simulation engine) |
| ``num-partitions`` | int >= 1 | none | number of virtual nodes (set by Flower's simulation engine) |
| ``ledger`` | str (path) | none | the node's SQLite privacy ledger |
| ``state`` | str (path) | none | the node's state folder (where its iterators resume; ``node start`` sets it) |
| ``budget-epsilon`` | float > 0 | none (no limit) | most epsilon a local dataset may ever spend |
| ``budget-delta`` | float in (0, 1) | 1e-5 | the delta epsilon is measured at |
| ``budget-accountant`` | ``prv`` or ``rdp`` | ``prv`` | accountant that composes releases |
| ``dataset-id`` | str | SHA-256 of the data | stable dataset name for the ledger |
| ``dp-test-seed`` | int >= 0 | none | deterministic DP noise: tests and simulations only |
| ``approvals`` | str (path) | ``~/.flowerbed/approved-tasks.json`` | the node's task-approvals JSON file |
| ``require-secure-aggregation`` | bool | false | only release updates through secure aggregation |
| ``min-secagg-peers`` | int >= 2 | none | fewest nodes a secure-aggregation round may have |
| ``identity-key`` | str (path) | none | the node key that signs its secure-aggregation keys (the kit's ``node.key``) |
| ``identity-cert`` | str (path) | none | the node key's certificate from the federation CA (the kit's ``node.crt``) |
| ``ca-cert`` | str (path) | none | the federation CA every node's certificate must chain to (the kit's ``ca.pem``) |
| ``evaluation`` | ``allow``/``dp``/``refuse`` | ``dp`` with a budget, else ``allow`` | how it answers evaluation |
| ``evaluation-noise`` | float > 0 | 5.0 | noise multiplier of a DP evaluation release |
| ``test-fraction`` | float in (0, 1) | none | share of local rows held out for testing |
| ``split-seed`` | int >= 0 | none | seed of the local train/test split |
| ``validation-fraction`` | float in [0, 1) | the experiment's | share of local training rows held out for validation |
| ``min-test-rows`` | int >= 1 | 10 deployed, 1 simulated | fewest local test rows the node reports metrics on |
| ``csv-delimiter`` | ``,``, ``;``, ``tab``, ``pipe`` | detected | the data file's column separator |
| ``csv-decimal`` | ``.`` or ``,`` | detected | the data file's decimal mark |
| ``csv-header`` | bool | detected | whether the data file's first row names its columns |
| ``data-contract`` | str (path) | the run's | the federation's data contract (a kit's ``contract.json``) |

Strings from TOML, the CLI or JSON are coerced where unambiguous (``"8"`` -> 8, ``"true"`` -> True);
booleans are never taken as numbers. On a deployed node (``data-path`` set, unless the caller
says otherwise) ``dp-test-seed``, ``partition-id`` and ``num-partitions`` are refused.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from flowerbed.exception import ConfigError

__all__ = ["VALID_KEYS", "NodeConfig", "parse_node_config", "to_node_config"]


def _not_bool(value: Any) -> Any:
    """Numbers: a bool is not a number (pydantic would read True as 1)."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def _text(value: Any) -> Any:
    """Strings: an int (``site = 3``) is read as its digits; empty strings are refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and not value.strip():
        raise ValueError("must not be empty")
    return value


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


def _flag(value: Any) -> Any:
    """Booleans: True/False, 1/0, or the strings true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ValueError("must be true or false")


Text = Annotated[str, BeforeValidator(_text)]
Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
Flag = Annotated[bool, BeforeValidator(_flag)]


def _separator(value: Any) -> Any:
    """Column separators: ``tab`` (or ``\\t``) is a tab, ``pipe`` is ``|``."""
    if isinstance(value, str) and value.strip().lower() in ("tab", "\\t"):
        return "\t"
    if isinstance(value, str) and value.strip().lower() == "pipe":
        return "|"
    return value


Separator = Annotated[Literal[",", ";", "\t", "|"], BeforeValidator(_separator)]


class NodeConfig(BaseModel):
    """A node's configuration, validated; built with the hyphenated keys (see the module's table)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False, allow_inf_nan=False)

    site: Text | None = Field(None, alias="site", description="The site's name (default: the data file's stem).")
    data_path: Text | None = Field(None, alias="data-path", description="The hospital's data file.")
    partition_id: Int | None = Field(None, alias="partition-id", ge=0, description="Virtual node's partition.")
    num_partitions: Int | None = Field(None, alias="num-partitions", ge=1, description="Number of virtual nodes.")
    state: Text | None = Field(None, alias="state", description="The node's state folder.")
    ledger: Text | None = Field(None, alias="ledger", description="The node's SQLite privacy ledger.")
    budget_epsilon: Float | None = Field(None, alias="budget-epsilon", gt=0, description="Epsilon budget per dataset.")
    budget_delta: Float = Field(1e-5, alias="budget-delta", gt=0, lt=1, description="Delta epsilon is measured at.")
    budget_accountant: Literal["prv", "rdp"] = Field("prv", alias="budget-accountant", description="DP accountant.")
    dataset_id: Text | None = Field(None, alias="dataset-id", description="Stable dataset name for the ledger.")
    dp_test_seed: Int | None = Field(None, alias="dp-test-seed", ge=0, description="Deterministic DP noise (tests).")
    approvals: Text | None = Field(None, alias="approvals", description="The node's task-approvals JSON file.")
    require_secure_aggregation: Flag = Field(
        False, alias="require-secure-aggregation", description="Release updates only through secure aggregation."
    )
    min_secagg_peers: Int | None = Field(
        None, alias="min-secagg-peers", ge=2, description="Fewest nodes in a secure-aggregation round."
    )
    identity_key: Text | None = Field(
        None, alias="identity-key", description="The node key that signs its secure-aggregation keys."
    )
    identity_cert: Text | None = Field(
        None, alias="identity-cert", description="The node key's certificate from the federation CA."
    )
    ca_cert: Text | None = Field(
        None, alias="ca-cert", description="The federation CA that every node's certificate must chain to."
    )
    evaluation: Literal["allow", "dp", "refuse"] | None = Field(
        None, alias="evaluation", description="Answer evaluation requests: allow, only with DP, or refuse."
    )
    evaluation_noise: Float = Field(
        5.0, alias="evaluation-noise", gt=0, description="Noise multiplier of a DP evaluation release."
    )
    test_fraction: Float | None = Field(
        None, alias="test-fraction", gt=0, lt=1, description="Share of local rows held out for testing."
    )
    split_seed: Int | None = Field(None, alias="split-seed", ge=0, description="Seed of the local train/test split.")
    validation_fraction: Float | None = Field(
        None,
        alias="validation-fraction",
        ge=0,
        lt=1,
        description="Share of local training rows held out for validation (default: the experiment's).",
    )
    min_test_rows: Int | None = Field(None, alias="min-test-rows", ge=1, description="Fewest local test rows.")
    csv_delimiter: Separator | None = Field(None, alias="csv-delimiter", description="The data file's separator.")
    csv_decimal: Literal[".", ","] | None = Field(None, alias="csv-decimal", description="The data's decimal mark.")
    csv_header: Flag | None = Field(None, alias="csv-header", description="The data file's first row names columns.")
    data_contract: Text | None = Field(None, alias="data-contract", description="The federation's data contract.")

    @model_validator(mode="after")
    def _partition_in_range(self) -> NodeConfig:
        if (
            self.partition_id is not None
            and self.num_partitions is not None
            and self.partition_id >= self.num_partitions
        ):
            raise ValueError(f"partition-id = {self.partition_id}: must be < num-partitions ({self.num_partitions})")
        return self

    @model_validator(mode="after")
    def _evaluation_under_a_budget(self) -> NodeConfig:
        if self.budget_epsilon is not None and self.evaluation == "allow":
            raise ValueError(
                "evaluation = 'allow' on a node with budget-epsilon: every evaluation it answers is a release; "
                "use evaluation = 'dp' (charged to the budget) or 'refuse'"
            )
        return self

    @property
    def evaluation_policy(self) -> str:
        """``evaluation``, else ``dp`` on a node with a budget and ``allow`` on one without."""
        if self.evaluation is not None:
            return self.evaluation
        return "dp" if self.budget_epsilon is not None else "allow"

    @property
    def test_rows_needed(self) -> int:
        """``min-test-rows``, else 10 on a hospital's node and 1 on a simulated one."""
        if self.min_test_rows is not None:
            return self.min_test_rows
        return 1 if self.simulated else 10

    @property
    def simulated(self) -> bool:
        """A virtual node of Flower's simulation engine: ``partition-id`` set, no ``data-path``."""
        return self.partition_id is not None and self.data_path is None

    @property
    def site_name(self) -> str | None:
        """``site``, else the data file's stem, else ``None``."""
        if self.site is not None:
            return self.site
        return None if self.data_path is None else Path(self.data_path).stem


VALID_KEYS: tuple[str, ...] = tuple(str(f.alias) for f in NodeConfig.model_fields.values())
_KEYS = frozenset(VALID_KEYS)

# What each key allows, for error messages: "<key> = <value>: <allowed>".
_ALLOWED: dict[str, str] = {
    "site": "must be a non-empty string (e.g. 'geneva')",
    "data-path": "must be a non-empty path (e.g. '/data/heart.csv')",
    "partition-id": "must be an integer >= 0 (e.g. 3)",
    "num-partitions": "must be an integer >= 1 (e.g. 4)",
    "ledger": "must be a non-empty path (e.g. '/var/lib/flowerbed/ledger.sqlite')",
    "state": "must be a non-empty path (e.g. '/var/lib/flowerbed/state')",
    "budget-epsilon": "must be > 0 (e.g. 8.0)",
    "budget-delta": "must be in (0, 1) (e.g. 1e-5)",
    "budget-accountant": "must be one of 'prv', 'rdp'",
    "dataset-id": "must be a non-empty string (e.g. 'heart-2024')",
    "dp-test-seed": "must be an integer >= 0 (e.g. 0)",
    "approvals": "must be a non-empty path (e.g. '/etc/flowerbed/approved-tasks.json')",
    "require-secure-aggregation": "must be true or false",
    "min-secagg-peers": "must be an integer >= 2 (e.g. 3)",
    "identity-key": "must be a non-empty path (e.g. '/opt/flowerbed/kit/node.key')",
    "identity-cert": "must be a non-empty path (e.g. '/opt/flowerbed/kit/node.crt')",
    "ca-cert": "must be a non-empty path (e.g. '/opt/flowerbed/kit/ca.pem')",
    "evaluation": "must be one of 'allow', 'dp', 'refuse'",
    "test-fraction": "must be in (0, 1) (e.g. 0.2)",
    "split-seed": "must be an integer >= 0 (e.g. 42)",
    "validation-fraction": "must be in [0, 1) (e.g. 0.2)",
    "min-test-rows": "must be an integer >= 1 (e.g. 20)",
    "csv-delimiter": "must be one of ',', ';', 'tab', 'pipe' ('|')",
    "csv-decimal": "must be '.' or ','",
    "csv-header": "must be true or false",
    "data-contract": "must be a non-empty path (e.g. '/opt/flowerbed/kit/contract.json')",
    "evaluation-noise": "must be > 0 (e.g. 5.0)",
}

# Keys for tests and simulations, refused on a deployed (hospital) node, and why.
_SIMULATION_ONLY: dict[str, str] = {
    "dp-test-seed": "dp-test-seed makes DP noise deterministic: tests only, never on a hospital node",
    "partition-id": (
        "partition-id is set by Flower's simulation engine for virtual nodes: a hospital node reads data-path"
    ),
    "num-partitions": (
        "num-partitions is set by Flower's simulation engine for virtual nodes: a hospital node reads data-path"
    ),
}


class _Problems(Exception):
    """Raised by the cached parser; :func:`parse_node_config` turns it into a ConfigError."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.problems = problems


def _unknown_key(key: Any, value: Any) -> str:
    text = str(key)
    normal = text.strip().lower().replace("_", "-")
    if normal in _KEYS:
        hint = f"did you mean {normal!r}? (node config keys use hyphens, not underscores)"
    else:
        close = difflib.get_close_matches(normal, VALID_KEYS, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(VALID_KEYS)}"
    return f"{text} = {value!r}: unknown key; {hint}"


def _value_problem(error: Any, raw: Mapping[str, Any]) -> str:
    loc = error["loc"]
    if loc and loc[0] in _ALLOWED:
        key = str(loc[0])
        return f"{key} = {raw.get(key)!r}: {_ALLOWED[key]}"
    return str(error["msg"]).removeprefix("Value error, ")


def _validate(raw: Mapping[str, Any], deployed: bool) -> NodeConfig:
    """Check every key; raise ``_Problems`` listing all of them."""
    problems: list[str] = []
    known: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _KEYS:
            known[key] = value
        else:
            problems.append(_unknown_key(key, value))
    config: NodeConfig | None = None
    try:
        config = NodeConfig.model_validate(known)
    except ValidationError as exc:
        problems.extend(_value_problem(e, known) for e in exc.errors())
    if deployed:
        problems.extend(
            f"{reason} (remove {key} = {known[key]!r} from --node-config)"
            for key, reason in _SIMULATION_ONLY.items()
            if known.get(key) is not None
        )
    if problems or config is None:
        raise _Problems(list(dict.fromkeys(problems)))
    return config


@functools.lru_cache(maxsize=16384)
def _validate_cached(items: tuple[tuple[str, type, Any], ...], deployed: bool) -> NodeConfig:
    # The value's type is part of the key: 1, 1.0 and True are equal and hash alike.
    return _validate({key: value for key, _, value in items}, deployed)


def parse_node_config(
    raw: Mapping[str, Any], *, source: str = "node config", deployed: bool | None = None
) -> NodeConfig:
    """Validate a node config; the result is cached per (mapping, deployed).

    Parameters
    ----------
    raw : Mapping[str, Any]
        The flat mapping of hyphenated keys (``context.node_config``).
    source : str
        Where it came from, named in the error.
    deployed : bool | None
        A real hospital node, which refuses ``dp-test-seed``, ``partition-id`` and ``num-partitions``;
        ``None``: deployed iff ``data-path`` is set.

    Raises
    ------
    ConfigError
        Listing every unknown key (with the nearest valid one) and every bad value.
    """
    if deployed is None:
        deployed = raw.get("data-path") is not None
    try:
        try:
            items = tuple(sorted((key, value.__class__, value) for key, value in raw.items()))
            hash(items)
        except TypeError:  # unhashable value or unsortable keys: validate without the cache
            return _validate(raw, deployed)
        return _validate_cached(items, deployed)
    except _Problems as exc:
        raise ConfigError(source, exc.problems) from None


def to_node_config(config: NodeConfig) -> dict[str, Any]:
    """The flat hyphenated mapping of the keys that were set (``parse_node_config`` inverts it)."""
    return config.model_dump(by_alias=True, exclude_unset=True, exclude_none=True)
