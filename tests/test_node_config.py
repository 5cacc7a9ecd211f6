"""The node-config schema: valid configs, every problem in one error, coercion, round trip, cache."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flowerbed.client import node_config as node_config_module
from flowerbed.client.node_config import VALID_KEYS, NodeConfig, parse_node_config, to_node_config
from flowerbed.exception import ConfigError

DEPLOYED = {
    "site": "geneva",
    "data-path": "/data/geneva.csv",
    "ledger": "/var/lib/flowerbed/ledger.sqlite",
    "budget-epsilon": 8.0,
    "budget-delta": 1e-6,
    "budget-accountant": "rdp",
    "dataset-id": "heart-2024",
    "approvals": "/etc/flowerbed/approved-tasks.json",
    "require-secure-aggregation": True,
    "min-secagg-peers": 3,
    "evaluation": "dp",
    "test-fraction": 0.2,
    "split-seed": 42,
    "min-test-rows": 20,
}


def problems(raw: dict, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_node_config(raw, **kwargs)
    return info.value.problems


def test_valid_keys_cover_every_field() -> None:
    assert len(VALID_KEYS) == len(set(VALID_KEYS)) == len(NodeConfig.model_fields)
    assert "budget-epsilon" in VALID_KEYS and "require-secure-aggregation" in VALID_KEYS
    documented = {line.split("``")[1] for line in node_config_module.__doc__.splitlines() if line.startswith("| ``")}
    assert documented == set(VALID_KEYS), "every key is in the module's table, and only those"


def test_deployment_config() -> None:
    config = parse_node_config(DEPLOYED)
    assert config.site == "geneva" and config.data_path == "/data/geneva.csv"
    assert config.budget_epsilon == 8.0 and config.budget_delta == 1e-6 and config.budget_accountant == "rdp"
    assert config.require_secure_aggregation is True and config.min_secagg_peers == 3
    assert config.evaluation == "dp" and config.test_fraction == 0.2
    assert config.split_seed == 42 and config.min_test_rows == 20
    assert not config.simulated
    with pytest.raises(ValueError):
        config.site = "zurich"  # type: ignore[misc]


def test_defaults_and_site_name() -> None:
    config = parse_node_config({"data-path": "/data/bern.csv"})
    assert config.site is None and config.site_name == "bern"
    assert config.budget_epsilon is None and config.budget_delta == 1e-5 and config.budget_accountant == "prv"
    assert config.require_secure_aggregation is False and config.evaluation_policy == "allow"
    assert parse_node_config({"data-path": "x.csv", "budget-epsilon": 3}).evaluation_policy == "dp"
    assert parse_node_config({}) == NodeConfig()


def test_simulation_config() -> None:
    config = parse_node_config({"partition-id": 3, "num-partitions": 4})
    assert config.simulated and config.partition_id == 3 and config.num_partitions == 4
    assert config.site_name is None


def test_string_values_are_coerced() -> None:
    config = parse_node_config(
        {
            "partition-id": "3",
            "num-partitions": "4",
            "budget-epsilon": "8",
            "budget-delta": "1e-5",
            "require-secure-aggregation": "true",
            "min-secagg-peers": "2",
            "dp-test-seed": "0",
        }
    )
    assert config.partition_id == 3 and config.num_partitions == 4
    assert config.budget_epsilon == 8.0 and config.budget_delta == 1e-5
    assert config.require_secure_aggregation is True and config.min_secagg_peers == 2 and config.dp_test_seed == 0
    assert parse_node_config({"require-secure-aggregation": "False"}).require_secure_aggregation is False
    assert parse_node_config({"site": 3}).site == "3"


def test_booleans_are_not_numbers() -> None:
    (problem,) = problems({"budget-epsilon": True})
    assert problem.startswith("budget-epsilon = True:")
    (problem,) = problems({"require-secure-aggregation": "sure"})
    assert problem == "require-secure-aggregation = 'sure': must be true or false"


def test_underscore_key_refused_naming_hyphenated_key() -> None:
    (problem,) = problems({"budget_epsilon": 8})
    assert "budget_epsilon" in problem and "did you mean 'budget-epsilon'?" in problem
    with pytest.raises(ValidationError):  # snake_case names are not accepted as keys
        NodeConfig(budget_epsilon=8)  # type: ignore[call-arg]


def test_misspelled_key_gets_nearest_suggestion() -> None:
    (problem,) = problems({"evalaution": "allow"})
    assert "did you mean 'evaluation'?" in problem
    (problem,) = problems({"colour": "blue"})
    assert "unknown key" in problem and "budget-epsilon" in problem  # lists the valid keys


def test_every_problem_reported_together() -> None:
    raw = {
        "data-path": "/data/geneva.csv",
        "budget_epsilon": 8,
        "budget-delta": 2,
        "budget-accountant": "gdp",
        "evaluation": "maybe",
        "test-fraction": 1.5,
        "min-secagg-peers": 1,
        "dp-test-seed": 0,
    }
    with pytest.raises(ConfigError) as info:
        parse_node_config(raw, source="node-config.toml")
    found = info.value.problems
    assert len(found) == 7, found
    assert info.value.source == "node-config.toml" and str(info.value).startswith("node-config.toml:")
    text = "\n".join(found)
    for key in (
        "budget_epsilon",
        "budget-delta = 2",
        "budget-accountant = 'gdp'",
        "evaluation",
        "test-fraction = 1.5",
        "min-secagg-peers = 1",
        "dp-test-seed",
    ):
        assert key in text


def test_bad_value_names_key_value_and_allowed() -> None:
    assert problems({"budget-epsilon": -1}) == ["budget-epsilon = -1: must be > 0 (e.g. 8.0)"]
    assert problems({"budget-epsilon": float("inf")}) == ["budget-epsilon = inf: must be > 0 (e.g. 8.0)"]
    assert problems({"partition-id": 2.5})[0].startswith("partition-id = 2.5: must be an integer")
    assert problems({"ledger": " "}) == [
        "ledger = ' ': must be a non-empty path (e.g. '/var/lib/flowerbed/ledger.sqlite')"
    ]


def test_bad_evaluation_policy_named() -> None:
    (problem,) = problems({"evaluation": "sometimes"})
    assert problem == "evaluation = 'sometimes': must be one of 'allow', 'dp', 'refuse'"


def test_partition_id_below_num_partitions() -> None:
    assert problems({"partition-id": 4, "num-partitions": 4}) == ["partition-id = 4: must be < num-partitions (4)"]


def test_dp_test_seed_refused_when_deployed() -> None:
    (problem,) = problems({"data-path": "/data/geneva.csv", "dp-test-seed": 0})
    assert "dp-test-seed makes DP noise deterministic: tests only, never on a hospital node" in problem
    found = problems({"partition-id": 1, "num-partitions": 2, "dp-test-seed": 0}, deployed=True)
    assert [p.split()[0] for p in found] == ["dp-test-seed", "partition-id", "num-partitions"]


def test_dp_test_seed_accepted_when_simulated() -> None:
    config = parse_node_config({"partition-id": 0, "num-partitions": 2, "dp-test-seed": 7})
    assert config.simulated and config.dp_test_seed == 7
    config = parse_node_config({"data-path": "/tmp/site.csv", "dp-test-seed": 7}, deployed=False)
    assert config.dp_test_seed == 7


@pytest.mark.parametrize(
    "raw",
    [DEPLOYED, {"partition-id": 2, "num-partitions": 3, "dp-test-seed": 1, "budget-epsilon": 2}, {}],
)
def test_round_trip(raw: dict) -> None:
    config = parse_node_config(raw, deployed=False)
    flat = to_node_config(config)
    assert set(flat) == set(raw) and set(flat) <= set(VALID_KEYS)
    assert parse_node_config(flat, deployed=False) == config
    assert to_node_config(parse_node_config({"partition-id": "3"})) == {"partition-id": 3}


def test_cache_returns_equal_objects() -> None:
    raw = {"partition-id": 5, "num-partitions": 8, "budget-epsilon": 4.0}
    first = parse_node_config(raw)
    again = parse_node_config(dict(reversed(raw.items())))
    assert again == first and again is first
    # Equal values of different types are different cache entries: True is refused where 1 is not.
    assert parse_node_config({"dp-test-seed": 1}).dp_test_seed == 1
    assert problems({"dp-test-seed": True})
    # Bad configs are reported every time, not cached as valid.
    assert problems({"evaluation": "maybe"}) == problems({"evaluation": "maybe"})


def test_unhashable_value_is_validated_without_cache() -> None:
    (problem,) = problems({"site": ["a", "b"]})
    assert problem.startswith("site = ['a', 'b']:")


def test_node_start_refuses_a_mistyped_key_before_starting_anything(tmp_path) -> None:
    import subprocess
    import sys

    data = tmp_path / "site.csv"
    data.write_text("1,2,3\n")
    cmd = [sys.executable, "-m", "flowerbed.cli", "node", "start", "--insecure", "--coordinator", "127.0.0.1:9"]
    cmd += ["--site", "bern", "--data", str(data), "--state", str(tmp_path / "state")]
    cmd += ["--config", "budget_epsilon=8", "--config", "evaluation=maybe"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "did you mean 'budget-epsilon'" in result.stderr and "evaluation" in result.stderr
    assert not (tmp_path / "state" / "supernode.log").exists()
