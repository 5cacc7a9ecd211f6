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
    assert command[1:4] == ["-P", "-m", "flowerbed.server.superlink_launcher"]
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
    assert (
        executor[1:4] == ["-P", "-m", "flowerbed.server.serverapp_executor"]
        and _flag(executor, "--parent-pid") == "123"
    )
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
    assert command[1:4] == ["-P", "-m", "flowerbed.client.supernode_launcher"]
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
    # the executor asks for work when the SuperNode says it has a message
    assert _flag(command, "--wake-file") == _flag(executor_command(settings, 1), "--wake-file")
    assert Path(_flag(command, "--wake-file")).parent == tmp_path / "state"
    assert command.index("--wake-file") < command.index("--") < command.index("--superlink")
    assert NodeSettings("s", "c:1", data, tmp_path).poll_interval == 0.2  # the launcher is the default
    flower_like = NodeSettings(**{**settings.__dict__, "executor": "flower", "poll_interval": None})
    # a new process per message, as Flower does, but still flowerbed's guarded executor
    assert _flag(supernode_command(flower_like), "--isolation") == "process"
    assert Path(supernode_command(flower_like)[0]).name == "flower-supernode"
    assert "--spawn" in executor_command(flower_like, 1)
    assert "--wake-file" not in executor_command(flower_like, 1)  # Flower's SuperNode says nothing: it polls
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


ROUND = {
    "round": 1,
    "sampled": ["cleveland", "hungary"],
    "participants": ["cleveland", "hungary"],
    "refused": {},
    "train": {"train-loss": 0.6},
    "evaluate": {"accuracy": 0.7, "loss": 0.55},
    "central": {},
    "sites": {"cleveland": {"train-loss": 0.6}, "hungary": {"train-loss": 0.5}},
    "epsilon_max": None,
}


def test_runs_are_found_and_collected_with_their_report(federation, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flowerbed.cli import _register, app

    with pytest.raises(RunError, match="no runs were started"):
        find_run(federation)
    run_dir = federation.state_dir / "runs" / "heart-1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps(ROUND) + "\n")
    federation.state_dir.mkdir(exist_ok=True)
    _write_runs(federation, [RunRecord(11, "heart-1", str(run_dir), "t", "c", resumes=[12])])
    assert find_run(federation).name == "heart-1"
    assert find_run(federation, "12").name == "heart-1"
    with pytest.raises(RunError, match="recent runs: heart-1"):
        find_run(federation, "13")

    def report(run_dirs):  # stands in for `flowerbed report`'s writer
        (run_dirs[0] / "plots").mkdir(exist_ok=True)
        (run_dirs[0] / "plots" / "global.png").write_bytes(b"png")
        return [run_dirs[0] / "plots" / "global.png"]

    copy, written = collect_run(federation, None, tmp_path / "copy", report=report)
    assert (copy / "metrics.jsonl").is_file() and (copy / "plots" / "global.png").is_file()
    assert written == [run_dir / "plots" / "global.png"]
    with pytest.raises(RunError, match="already exists"):
        collect_run(federation, None, tmp_path / "copy")
    archive, _ = collect_run(federation, "heart-1", tmp_path / "out" / "heart.tar.gz", report=report)
    with tarfile.open(archive) as tar:
        assert {"heart-1/metrics.jsonl", "heart-1/plots/global.png"} <= set(tar.getnames())

    # the command draws the report with `flowerbed report`'s own writer before it copies
    (run_dir / "plots" / "global.png").unlink()
    _register()
    federation_file = federation.base_dir / "federation.toml"
    result = CliRunner().invoke(app, ["run", "collect", str(tmp_path / "cli"), "-f", str(federation_file)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "plots" / "global.png").read_bytes()[:4] == b"\x89PNG"
    assert "report: " in result.output and "global.png" in result.output


def test_flower_processes_are_found_beside_the_interpreter(federation, tmp_path: Path, monkeypatch) -> None:
    """A service manager runs /opt/venv/bin/flowerbed without activating the environment."""
    import sys

    from flowerbed.client.node import node_env
    from flowerbed.process_control import interpreter_folder
    from flowerbed.server.coordinator import flower_env
    from flowerbed.server.run_control import flwr_command, operator_env

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no virtual environment, no pyenv shims
    folder = str(interpreter_folder())
    assert folder == str(Path(sys.executable).parent)
    provision(federation)
    kit = load_kit(federation.output_dir / "kits" / "hungary")
    settings = NodeSettings("hungary", kit.coordinator, tmp_path / "d.csv", tmp_path / "state", kit=kit)
    for env in (flower_env(federation), operator_env(federation), node_env(settings)):
        assert env["PATH"].split(":") == [folder, "/usr/bin", "/bin"]
    plain = NodeSettings(**{**settings.__dict__, "poll_interval": None})  # Flower's flower-supernode as it is
    assert supernode_command(plain)[0] == str(Path(folder) / "flower-supernode")
    assert Path(supernode_command(plain)[0]).is_file()
    for command in (
        supernode_command(settings),  # through flowerbed's launcher
        superlink_command(federation),
        coordinator_executor_command(federation, insecure=False, superlink_pid=1),
        executor_command(settings, 1),
        flwr_command("ls"),
    ):
        assert command[0] == sys.executable


def test_supernode_waits_are_capped_and_its_options_parsed(monkeypatch) -> None:
    import time
    from types import SimpleNamespace

    from flowerbed.client import supernode_launcher
    from flowerbed.client.supernode_launcher import LOCAL_WAIT, capped_time, parse_args

    fast = capped_time(0.05)
    started = time.monotonic()
    fast.sleep(3)  # Flower's idle wait
    assert time.monotonic() - started < 1.0
    assert fast.time is time.time and fast.monotonic is time.monotonic
    slow, tight = capped_time(0.5), capped_time(0.01)
    slept: list[float] = []
    monkeypatch.setattr(supernode_launcher, "time", SimpleNamespace(sleep=slept.append))
    slow.sleep(3)  # idle poll: at most the poll interval
    slow.sleep(0.5)  # the node's check for its ClientApp's reply: at most LOCAL_WAIT
    tight.sleep(0.5)
    assert slept == [0.5, LOCAL_WAIT, 0.01]
    assert parse_args(["--poll-interval", "0.3", "--wake-file", "/w", "--", "--superlink", "x:1"]) == (
        0.3,
        Path("/w"),
        ["--superlink", "x:1"],
    )
    assert parse_args(["--superlink", "x:1"])[0] == 0.2
    for bad in (["--poll-interval", "0", "--"], ["--poll-interval", "9", "--"], ["--fast", "--"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_the_executor_wakes_when_the_supernode_has_a_message(tmp_path: Path) -> None:
    import threading
    import time

    from flowerbed.client.supernode_launcher import wake_file_writer
    from flowerbed.client.warm_executor import WakeOnMessage

    path = tmp_path / "executor.wake"
    path.write_bytes(b"")
    wait = WakeOnMessage(path, fallback=0.3, check=0.01)
    started = time.monotonic()
    wait.sleep(0.05)  # nothing: Flower's loop polls after the fallback
    assert 0.3 <= time.monotonic() - started < 2.0
    threading.Timer(0.05, wake_file_writer(path)).start()
    started = time.monotonic()
    WakeOnMessage(path, fallback=10.0, check=0.01).sleep(0.05)
    assert time.monotonic() - started < 5.0
    wake_file_writer(tmp_path / "gone" / "executor.wake")()  # a missing folder is no error: the executor polls


def test_a_messages_process_reads_the_interpreters_architecture_from_its_parent(monkeypatch) -> None:
    """Flower's telemetry event asks ``platform.architecture()`` per message; the warm parent answers it once."""
    import platform

    from flowerbed.client.warm_executor import remember_architecture

    original = getattr(platform.architecture, "__wrapped__", platform.architecture)  # not an earlier cache
    monkeypatch.setattr(platform, "architecture", original)  # restored after the test
    calls = []
    real = platform._syscmd_file
    monkeypatch.setattr(platform, "_syscmd_file", lambda *a: calls.append(a) or real(*a))
    remember_architecture()
    first = len(calls)
    assert platform.architecture() == platform.architecture()
    assert first == 1 and len(calls) == first  # asked once, in the parent; never again


def test_flowers_fixed_waits_can_be_shortened(monkeypatch) -> None:
    """The patches of ``flower_internals`` that shorten Flower's waits take hold, and refuse a changed Flower."""
    import functools
    import importlib
    import time

    from flowerbed import flower_internals as fi

    node = importlib.import_module("flwr.supernode.start_client_internal")
    superexec = importlib.import_module("flwr.supercore.superexec.run_superexec")
    for module, name in [*((importlib.import_module(m), n) for m, n in fi.OBJECT_PULLERS), (node, "time")]:
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    monkeypatch.setattr(node, "_pull_and_store_message", node._pull_and_store_message)
    monkeypatch.setattr(superexec, "time", superexec.time)

    fi.quicken_object_pulls()
    fi.quicken_object_pulls("flwr.supernode.start_client_internal")  # again: replaced, not stacked
    for module_name, name in fi.OBJECT_PULLERS:
        puller = getattr(importlib.import_module(module_name), name)
        assert isinstance(puller, functools.partial) and not isinstance(puller.func, functools.partial)
        assert puller.keywords == {"initial_backoff": 0.05, "backoff_cap": 1.0, "max_tries_per_object": None}

    stored = []
    monkeypatch.setattr(node, "_pull_and_store_message", lambda **kw: kw.get("run_id"))
    fi.on_message_stored(lambda: stored.append(1))
    assert node._pull_and_store_message(run_id=None) is None and stored == []
    assert node._pull_and_store_message(run_id=7) == 7 and stored == [1]

    waits: list[float] = []
    fi.superexec_wait(waits.append)
    superexec.time.sleep(0.05)
    assert waits == [0.05] and superexec.time.monotonic is time.monotonic
    with pytest.raises(RuntimeError, match="superexec_wait"):
        fi.superexec_wait(waits.append)  # the loop's time is no longer Flower's: refused, not stacked

    fi.cap_supernode_idle_sleep(time)
    monkeypatch.setattr(node, "time", None)  # as if Flower slept some other way
    with pytest.raises(RuntimeError, match="cap_supernode_idle_sleep"):
        fi.cap_supernode_idle_sleep(time)
    monkeypatch.setattr(
        importlib.import_module("flwr.superlink.grid.http_grid"), "pull_objects", lambda object_ids, fn: {}
    )
    with pytest.raises(RuntimeError, match="quicken_object_pulls"):
        fi.quicken_object_pulls("flwr.superlink.grid.http_grid")


def test_the_coordinator_polls_briskly_for_replies(monkeypatch) -> None:
    from types import SimpleNamespace

    from flowerbed.server import exchange

    waits: list[float] = []
    monkeypatch.setattr(exchange.time, "sleep", waits.append)

    def reply(i: int) -> SimpleNamespace:
        return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=str(i)))

    arrivals = iter([[], [], [], [], [reply(0)], [], [reply(1), reply(2)]])

    class Grid:
        def push_messages(self, messages):
            return [str(i) for i in range(len(messages))]

        def pull_messages(self, ids):
            return next(arrivals)

    replies = exchange.send_and_receive(Grid(), [object()] * 3, timeout=60)
    assert [r.metadata.reply_to_message_id for r in replies] == ["0", "1", "2"]
    assert waits == [0.05, 0.1, 0.2, 0.25, 0.05, 0.1]  # doubling to 0.25 s; back to 50 ms after a reply


def test_node_processes_do_not_spin_waiting_threads(federation, tmp_path: Path, monkeypatch) -> None:
    from flowerbed.client.node import node_env

    settings = NodeSettings("hungary", "127.0.0.1:1", tmp_path / "d.csv", tmp_path / "state", insecure=True)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert node_env(settings)["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a hospital's own choice is kept
    assert node_env(settings)["OMP_WAIT_POLICY"] == "ACTIVE"


def _fake_flower(monkeypatch, calls: list[tuple[str, ...]], status: str = "running") -> None:
    """``flwr`` as the operator, without a coordinator: record each call and answer as Flower does."""
    import subprocess

    from flowerbed.server import run_control

    def flwr(federation, *args, timeout=120.0):
        calls.append(args)
        reply = {"success": True, "runs": [{"status": status}], "run-id": 99}
        return subprocess.CompletedProcess(args, 0, json.dumps(reply), "")

    monkeypatch.setattr(run_control, "_flwr", flwr)
    monkeypatch.setattr(run_control, "_check_coordinator", lambda federation: None)


def test_a_stop_waits_for_the_round_in_progress_and_resume_withdraws_it(federation, monkeypatch) -> None:
    """A round cut short after its training went out would be trained (and charged) twice on resume."""
    import threading

    from flowerbed.server import run_control
    from flowerbed.server.federation import STOP_FILE
    from flowerbed.server.run_folder import ROUND_SENT

    assert (run_control.STOP_FILE, run_control.ROUND_SENT) == (STOP_FILE, ROUND_SENT)
    calls: list[tuple[str, ...]] = []
    _fake_flower(monkeypatch, calls)
    run_dir = federation.state_dir / "runs" / "heart-1"
    run_dir.mkdir(parents=True)
    _write_checkpoints(run_dir, rounds=3)
    (run_dir / "checkpoints" / "LATEST").write_text("round-0002")
    (run_dir / ROUND_SENT).write_text(json.dumps({"round": 3, "sites": ["cleveland", "hungary"]}))
    config = federation.state_dir / "heart-1.toml"
    config.write_text('experiment = ""\nresume = false\n')
    _write_runs(federation, [RunRecord(11, "heart-1", str(run_dir), "t", str(config))])
    assert run_control.round_in_progress(run_dir) == 3

    def checkpoint() -> None:  # the round loop writes round 3's checkpoint a little later
        (run_dir / "checkpoints" / "LATEST").write_text("round-0003")

    threading.Timer(0.6, checkpoint).start()
    said: list[str] = []
    run_control.stop_run(federation, timeout=30, log=said.append)
    assert (run_dir / STOP_FILE).is_file(), "the round loop is asked to stop before its next round"
    assert run_control.round_in_progress(run_dir) is None
    assert [c[0] for c in calls] == ["stop"] and "round 3 is in progress" in said[0]
    assert not any("trained again" in line for line in said)

    (run_dir / ROUND_SENT).write_text(json.dumps({"round": 4, "sites": ["cleveland"]}))
    said.clear()
    run_control.stop_run(federation, now=True, log=said.append)
    assert "trains round 4 again" in said[-1] and "charged for it twice" in said[-1]

    calls.clear()
    run_control.resume_run(federation)
    assert not (run_dir / STOP_FILE).exists(), "a resume withdraws the stop request"
    assert calls[-1][0] == "run" and find_run(federation).resumes == [99]

    calls.clear()
    (run_dir / "metrics.jsonl").write_text("")  # the checkpoint counts on its first two records there
    with pytest.raises(RunError, match="metrics.jsonl: checkpoint round-0003 counts 2 records there"):
        run_control.resume_run(federation)
    assert not calls, "nothing is submitted for a run folder that cannot resume"


def _write_checkpoints(run_dir: Path, rounds: int) -> None:
    """Real checkpoints of rounds 1 to ``rounds`` (the history in ``metrics.jsonl``), as the round loop writes them."""
    import numpy as np

    from flowerbed.experiment import StrategyConfig
    from flowerbed.server.checkpoint import Checkpoint, CheckpointWriter
    from flowerbed.strategies.registry import build_strategy

    history: list[dict] = []
    with CheckpointWriter() as writer:
        for server_round in range(1, rounds + 1):
            history.append({"round": server_round})
            state = {"history": history, "pinned_examples": {}}
            weights = {"w": np.zeros(3, dtype=np.float32)}
            writer.submit(run_dir, Checkpoint(server_round, weights, build_strategy(StrategyConfig()), state))


def test_run_status_says_why_a_run_made_no_progress(federation, monkeypatch) -> None:
    from typer.testing import CliRunner

    from flowerbed.cli import _register, app
    from flowerbed.protocol import EPSILON_SCOPE
    from flowerbed.server.run_control import run_status

    calls: list[tuple[str, ...]] = []
    _fake_flower(monkeypatch, calls, status="finished:completed")
    refusal = "privacy budget exhausted: spent 8 of 8 on dataset 0db62496a1b2 (site cleveland, delta 1e-05)"
    runs = federation.state_dir / "runs"
    spent, resumed = runs / "heart-1", runs / "heart-2"
    spent.mkdir(parents=True)
    (spent / "summary.json").write_text(
        json.dumps(
            {
                "rounds_planned": 2,
                "rounds_completed": 0,
                "stopped": "round 1: 0 usable replies, fewer than the minimum 1 (train.min_nodes)",
                "refused": {"cleveland": f"round 1: {refusal}", "hungary": f"round 1: {refusal}"},
                "budget_exhausted": {"cleveland": f"round 1: {refusal}", "hungary": f"round 1: {refusal}"},
                "left_out": {},
                "excluded": {},
            }
        )
    )
    resumed.mkdir()
    records = [
        {**ROUND, "sites": {"cleveland": {"epsilon": 1.5}, "hungary": {"epsilon": 1.2}}},
        {**ROUND, "round": 2, "retrained": ["hungary"], "sites": {"cleveland": {"epsilon": 2.5}}},
    ]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _write_runs(
        federation, [RunRecord(11, "heart-1", str(spent), "t", "c"), RunRecord(12, "heart-2", str(resumed), "t", "c")]
    )

    status = run_status(federation, "heart-1")
    assert status["reason"] == "no progress: no round completed (privacy budget spent at cleveland, hungary)"
    assert status["budget_exhausted"]["hungary"].endswith(refusal) and status["finished"]
    status = run_status(federation, "heart-2")
    assert status["reason"].startswith("ended without a summary after round 2")
    assert status["retrained"] == {"2": ["hungary"]}
    assert status["epsilon"] == {"cleveland": 2.5, "hungary": 1.2} and status["epsilon_scope"] == EPSILON_SCOPE

    _register()
    federation_file = str(federation.base_dir / "federation.toml")
    shown = CliRunner().invoke(app, ["run", "status", "heart-1", "-f", federation_file])
    assert shown.exit_code == 0, shown.output
    text = " ".join(shown.output.split())  # the console wraps long lines
    assert "no progress: no round completed" in text and f"privacy budget spent cleveland: round 1: {refusal}" in text
    text = " ".join(CliRunner().invoke(app, ["run", "status", "heart-2", "-f", federation_file]).output.split())
    assert "round 2 trained twice at hungary" in text and "cumulative at each node's ledger" in text


def test_flwr_run_finds_the_packaged_experiment_and_may_override_every_key(tmp_path: Path, monkeypatch) -> None:
    """``flwr run .`` with the checkout's pyproject: the relative default resolves wherever the ServerApp runs."""
    from flwr.common.config import flatten_dict, fuse_dicts

    from flowerbed.server.app import RUN_CONFIG_KEYS, expected_nodes, experiment_from_run_config
    from flowerbed.server.run_control import APP_PYPROJECT

    from .conftest import ROOT

    default = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    bundle = flatten_dict(tomllib.loads(APP_PYPROJECT.format(version="0"))["tool"]["flwr"]["app"]["config"])
    assert set(default) == set(bundle) == set(RUN_CONFIG_KEYS)
    overrides = {"expected-nodes": 3, "resume": True, "run-dir": "/x", "site-max-examples": '{"a": 10}'}
    fuse_dicts(
        default, overrides
    )  # what the SuperLink does; an undeclared key is "[code: 15] Invalid run configuration"
    with pytest.raises(ValueError, match="not present"):
        fuse_dicts(default, {"expected_nodes": 3})

    monkeypatch.chdir(tmp_path)  # a ServerApp's working directory is not the checkout
    experiment = experiment_from_run_config(default)
    assert experiment.name == "heart"
    assert expected_nodes(default, experiment) == experiment.data.partition.num_clients == 4
    assert expected_nodes({**default, "expected-nodes": 3}, experiment) == 3
    with pytest.raises(ConfigError, match="expected-nodes = -1"):
        expected_nodes({"expected-nodes": -1}, experiment)
    with pytest.raises(ConfigError, match="'experiments/heart.toml': no such file in"):
        experiment_from_run_config({"experiment": "experiments/heart.toml"})


def test_run_start_sends_the_federation_files_caps(tmp_path: Path, monkeypatch) -> None:
    from flowerbed.server import run_control

    path = write_federation(tmp_path, ["cleveland", "hungary"], 19093)
    path.write_text(path.read_text().replace('name = "hungary"', 'name = "hungary"\nmax_examples = 250'))
    federation = load_federation(path)
    calls: list[tuple[str, ...]] = []
    _fake_flower(monkeypatch, calls)
    record = run_control.start_run(federation, HEART_TOML, overrides=["rounds=2"])
    submitted = tomllib.loads(Path(record.run_config).read_text())
    assert json.loads(submitted["site-max-examples"]) == {"hungary": 250}
    assert submitted["expected-nodes"] == 2 and calls[0][0] == "run"


def test_a_deployed_run_that_fails_before_its_first_round_leaves_no_folder(tmp_path: Path) -> None:
    from flwr.app import Context, RecordDict

    from flowerbed.server.app import main

    class NoNodes:  # a Grid to which no node ever connects
        def get_node_ids(self):
            return []

    text, _, _ = resolve_experiment_text(HEART_TOML, ["train.round_timeout=0.3"], tmp_path / "runs" / "x")
    run_dir = tmp_path / "runs" / "heart-1"
    config = {"experiment": text, "run-dir": str(run_dir), "resume": False, "expected-nodes": 0}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    with pytest.raises(RunError, match="no node connected within 0.3 s"):
        main(NoNodes(), context)  # the ServerApp's main, as Flower calls it
    assert not run_dir.exists()


def test_an_idle_node_polls_as_flower_does_and_a_node_in_a_run_briskly(monkeypatch) -> None:
    import time
    from types import SimpleNamespace

    from flowerbed.client import supernode_launcher
    from flowerbed.client.supernode_launcher import Activity, capped_time

    slept: list[float] = []
    monkeypatch.setattr(supernode_launcher, "time", SimpleNamespace(sleep=slept.append, monotonic=time.monotonic))
    activity = Activity()
    clock = capped_time(0.2, activity=activity, active_for=60)
    clock.sleep(3)  # no message yet: Flower's own idle wait
    activity.note()
    clock.sleep(3)  # a run is going on
    clock.sleep(0.5)  # the check for a ClientApp's reply
    activity.last -= 61  # the run ended a minute ago
    clock.sleep(3)
    assert slept == [3.0, 0.2, 0.05, 3.0]


def test_poll_intervals_outside_the_bounds_are_refused(tmp_path: Path) -> None:
    from flowerbed.client.supernode_launcher import parse_args, poll_interval_problem

    assert poll_interval_problem(0) is None and poll_interval_problem(0.05) is None and poll_interval_problem(3) is None
    for bad in (1e-6, -1, 3.5):
        assert "use 0 (Flower's own 3 s wait) or 0.05 to 3 seconds" in poll_interval_problem(bad)
    with pytest.raises(SystemExit, match="give a number"):
        parse_args(["--poll-interval", "abc", "--"])
    with pytest.raises(SystemExit, match="0.05 to 3"):
        parse_args(["--poll-interval", "0.001", "--"])
    settings = NodeSettings(
        "s", "127.0.0.1:1", tmp_path / "d.csv", tmp_path / "state", insecure=True, poll_interval=1e-6
    )
    with pytest.raises(NodeError, match="0.05 to 3 seconds"):
        supernode_command(settings)


def test_the_launcher_installs_every_shortened_wait(monkeypatch, tmp_path: Path) -> None:
    """``supernode_launcher.main`` wires the patches into Flower's SuperNode before it starts it."""
    import functools
    import importlib
    import time
    from types import SimpleNamespace

    from flowerbed.client import supernode_launcher

    node = importlib.import_module("flwr.supernode.start_client_internal")
    for name in ("time", "_pull_and_store_message", "pull_objects"):
        monkeypatch.setattr(node, name, getattr(node, name))  # restored after the test
    cli = importlib.import_module("flwr.supernode.cli.flower_supernode")
    seen: dict[str, object] = {}

    def flower_supernode() -> None:
        import sys

        seen["argv"] = list(sys.argv)
        seen["sleep"] = node.time.sleep
        seen["puller"] = node.pull_objects

    monkeypatch.setattr(cli, "flower_supernode", flower_supernode)
    monkeypatch.setattr("sys.argv", ["x"])
    monkeypatch.setattr(node, "_pull_and_store_message", lambda *a, **k: 7)  # as if a message of run 7 came
    wake = tmp_path / "executor.wake"
    wake.write_bytes(b"")
    supernode_launcher.main(["--poll-interval", "0.1", "--wake-file", str(wake), "--", "--superlink", "h:1"])
    assert seen["argv"] == ["flower-supernode", "--superlink", "h:1"]
    assert isinstance(seen["puller"], functools.partial)
    assert wake.read_bytes() == b""
    assert node._pull_and_store_message() == 7
    assert wake.read_bytes() == b"."  # the executor is told
    slept: list[float] = []
    monkeypatch.setattr(supernode_launcher, "time", SimpleNamespace(sleep=slept.append, monotonic=time.monotonic))
    seen["sleep"](3)  # a message just came: the run's brisk poll
    assert slept == [0.1]


def test_the_executor_waits_for_its_node_s_word(monkeypatch, tmp_path: Path) -> None:
    """``warm_executor.main --wake-file`` makes Flower's SuperExec loop wait on the wake file."""
    from flowerbed import flower_internals as fi
    from flowerbed.client import warm_executor

    waits: list[object] = []
    loops: list[dict] = []
    monkeypatch.setattr(fi, "superexec_wait", waits.append)
    steps: list[str] = []
    monkeypatch.setattr(warm_executor, "preload", lambda modules: steps.append("preload") or [])
    monkeypatch.setattr(warm_executor, "guard", lambda: steps.append("guard"))
    monkeypatch.setattr(warm_executor, "remember_architecture", lambda: steps.append("architecture"))
    monkeypatch.setattr(fi, "run_superexec_with", lambda executor, **kw: steps.append("loop") or loops.append(kw))
    warm_executor.main(["--runtime-api-address", "127.0.0.1:1", "--wake-file", str(tmp_path / "w")])
    assert len(waits) == 1 and isinstance(waits[0].__self__, warm_executor.WakeOnMessage)
    assert loops and loops[0]["runtime_api_address"] == "127.0.0.1:1"
    assert steps == ["preload", "architecture", "guard", "loop"]  # all before the loop forks a message's process
