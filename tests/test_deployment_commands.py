"""The command lines flowerbed gives Flower, the node's error explanations, and run bookkeeping."""

from __future__ import annotations

import json
import tarfile
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import parse_config_args

from flowerbed.benchmarks.deployment_harness import HEART_TOML, write_federation
from flowerbed.client.node import NodeSettings, executor_command, explain_exit, supernode_command, write_node_config
from flowerbed.exception import ConfigError, NodeError, RunError
from flowerbed.kit import load_kit
from flowerbed.server.coordinator import executor_command as coordinator_executor_command
from flowerbed.server.coordinator import superlink_command, write_cli_connection
from flowerbed.server.federation_config import load_federation
from flowerbed.server.provisioning import provision
from flowerbed.server.run_control import RunRecord, _write_runs, collect_run, find_run, resolve_experiment_text


@pytest.fixture
def federation(tmp_path: Path):
    return load_federation(write_federation(tmp_path, ["cleveland", "hungary"], 19093))


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_superlink_command_uses_tls_auth_and_a_database(federation) -> None:
    with pytest.raises(ConfigError, match="run `flowerbed provision"):
        superlink_command(federation)
    provision(federation)
    command = superlink_command(federation)
    assert command[1:3] == ["-m", "flowerbed.server.superlink_launcher"]
    assert _flag(command, "--operator-token-file").endswith("provision/coordinator/operator.token")
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    assert "--disable-runtime-dependency-installation" in command
    assert _flag(command, "--isolation") == "process"  # the SuperLink starts no ServerApp itself
    assert _flag(command, "--superexec-auth-secret-file").endswith("coordinator-state/superexec.secret")
    assert _flag(command, "--database").endswith("coordinator-state/superlink.db")
    assert Path(_flag(command, "--ssl-certfile")).name == "server.pem"
    assert _flag(command, "--port") == "19093"
    insecure = superlink_command(federation, insecure=True)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    assert _flag(insecure, "--operator-token-file").endswith("coordinator-state/operator.token")
    executor = coordinator_executor_command(federation, insecure=False, superlink_pid=123)
    assert executor[1:3] == ["-m", "flowerbed.server.serverapp_executor"] and _flag(executor, "--parent-pid") == "123"
    assert _flag(executor, "--superexec-auth-secret-file") == _flag(command, "--superexec-auth-secret-file")


def test_cli_connection_for_flwr_commands(federation) -> None:
    provision(federation)
    config = tomllib.loads(write_cli_connection(federation, insecure=False).read_text())
    connection = config["superlink"]["flowerbed"]
    assert config["superlink"]["default"] == "flowerbed"
    assert connection["address"] == "127.0.0.1:19093"
    assert Path(connection["root-certificates"]).is_absolute()
    assert tomllib.loads(write_cli_connection(federation, insecure=True).read_text())["superlink"]["flowerbed"][
        "insecure"
    ]


def test_supernode_command_and_node_config(federation, tmp_path: Path) -> None:
    provision(federation)
    kit = load_kit(federation.output_dir / "kits" / "hungary")
    data = tmp_path / "my data" / 'h"ungary.csv'
    settings = NodeSettings(
        site=kit.site,
        coordinator=kit.coordinator,
        data_path=data,
        state_dir=tmp_path / "state",
        kit=kit,
        runtime_port=9200,
        poll_interval=0.25,
        extra={"ledger": "/var/lib/ledger.db", "budget-epsilon": 8.0, "budget-delta": None},
    )
    command = supernode_command(settings)
    assert _flag(command, "--root-certificates") == str(kit.ca_cert)
    assert _flag(command, "--auth-supernode-private-key") == str(kit.node_key)
    assert _flag(command, "--isolation") == "process"
    assert command[1:3] == ["-m", "flowerbed.client.supernode_launcher"]
    assert _flag(command, "--poll-interval") == "0.25"
    assert _flag(command, "--superlink") == "127.0.0.1:19093"
    # Flower reads the node config file exactly as the ClientApp will see it
    path = write_node_config(settings)
    assert _flag(command, "--node-config") == str(path)
    assert parse_config_args([str(path)]) == {
        "data-path": str(data),
        "site": "hungary",
        "state": str(tmp_path / "state"),
        "identity-key": str(kit.node_key),
        "identity-cert": str(kit.node_cert),
        "ca-cert": str(kit.ca_cert),
        "ledger": "/var/lib/ledger.db",
        "budget-epsilon": 8.0,
    }
    assert _flag(command, "--superexec-auth-secret-file") == _flag(
        executor_command(settings, 1), "--superexec-auth-secret-file"
    )
    assert "--spawn" not in executor_command(settings, 1)
    flower_like = NodeSettings(**{**settings.__dict__, "executor": "flower", "poll_interval": None})
    # a new process per message, as Flower does, but still flowerbed's guarded executor
    assert _flag(supernode_command(flower_like), "--isolation") == "process"
    assert Path(supernode_command(flower_like)[0]).name == "flower-supernode"
    assert "--spawn" in executor_command(flower_like, 1)
    with pytest.raises(NodeError, match="kit is required"):
        supernode_command(NodeSettings(**{**settings.__dict__, "kit": None}))


def test_node_errors_are_explained(federation, tmp_path: Path) -> None:
    provision(federation)
    kit = load_kit(federation.output_dir / "kits" / "cleveland")
    settings = NodeSettings("cleveland", kit.coordinator, tmp_path / "d.csv", tmp_path, kit=kit)
    unregistered = "Failed to initialize the connection to the SuperLink.\n[code: 2004] Failed to activate SuperNode."
    assert "site cleveland's key is not registered" in explain_exit(unregistered, settings)
    wrong_ca = "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate"
    assert str(kit.ca_cert) in explain_exit(wrong_ca, settings)
    assert explain_exit("something else entirely", settings) is None


def test_experiment_is_validated_before_submission(tmp_path: Path) -> None:
    text, name, clients = resolve_experiment_text(HEART_TOML, ["rounds=3"], tmp_path / "runs" / "x")
    data = tomllib.loads(text)
    assert (name, data["rounds"], data["output"]) == ("heart", 3, str(tmp_path / "runs"))
    assert clients >= 1
    with pytest.raises(ConfigError, match="rounds = 0"):
        resolve_experiment_text(HEART_TOML, ["rounds=0"], tmp_path / "runs" / "x")


def test_runs_are_found_and_collected(federation, tmp_path: Path) -> None:
    with pytest.raises(RunError, match="no runs were started"):
        find_run(federation)
    run_dir = federation.state_dir / "runs" / "heart-1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    federation.state_dir.mkdir(exist_ok=True)
    _write_runs(federation, [RunRecord(11, "heart-1", str(run_dir), "t", "c", resumes=[12])])
    assert find_run(federation).name == "heart-1"
    assert find_run(federation, "12").name == "heart-1"
    with pytest.raises(RunError, match="recent runs: heart-1"):
        find_run(federation, "13")
    copy = collect_run(federation, None, tmp_path / "copy")
    assert (copy / "metrics.jsonl").is_file()
    with pytest.raises(RunError, match="already exists"):
        collect_run(federation, None, tmp_path / "copy")
    archive = collect_run(federation, "heart-1", tmp_path / "out" / "heart.tar.gz")
    with tarfile.open(archive) as tar:
        assert "heart-1/metrics.jsonl" in tar.getnames()


def test_supernode_idle_poll_is_capped() -> None:
    import time

    from flowerbed.client.supernode_launcher import capped_time

    fast = capped_time(0.05)
    started = time.monotonic()
    fast.sleep(3)  # Flower's idle wait
    assert time.monotonic() - started < 1.0
    assert fast.time is time.time and fast.monotonic is time.monotonic
