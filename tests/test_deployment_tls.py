"""End to end with real processes on 127.0.0.1: provision, TLS, node authentication, refusals,
the coordinator killed mid-run and restarted, and a task the nodes did not all approve.

One federation of three heart-disease hospitals serves every check, so the slow parts (starting
the SuperLink, registering keys, importing torch in each node) are paid once.
"""

from __future__ import annotations

import json
import shutil
import signal
import textwrap
from pathlib import Path

import pytest

from flowerbed.benchmarks.deployment_harness import (
    HEART_DATA,
    HEART_TOML,
    Deployment,
    free_port,
    wait_for,
    write_federation,
)
from flowerbed.client.approval import approve_task
from flowerbed.server.federation_config import load_federation
from flowerbed.server.provisioning import generate_node_key_pair, provision, write_private, write_public
from flowerbed.server.run_control import run_status, start_run

SITES = ["cleveland", "hungary", "switzerland"]
USER_TASK = "heart_user_task:task"
QUICK = ["evaluate.local_baselines=false", "evaluate.central=false"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _run_dir(folder: Path, index: int = -1) -> Path:
    runs = json.loads((folder / "coordinator-state" / "runs.json").read_text())
    return Path(runs[index]["run_dir"])


def _rounds(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()]


def _intruder_kit(kits: Path, target: Path) -> Path:
    """A kit with the right CA and address but a key the coordinator never registered."""
    shutil.copytree(kits / "cleveland", target)
    private, public = generate_node_key_pair("intruder")
    write_private(target / "node.key", private)
    write_public(target / "node.pub", public)
    text = (target / "kit.toml").read_text().replace('site = "cleveland"', 'site = "intruder"')
    (target / "kit.toml").write_text(text)
    shutil.rmtree(target / "state", ignore_errors=True)
    return target


def _refusal_options() -> list[str]:
    return ["--runtime-port", str(free_port()), "--connect-timeout", "30"]


def _wait_exit(deployment: Deployment, name: str, timeout: float) -> str:
    process = deployment.processes[name]
    wait_for(lambda: process.poll() is not None, timeout, f"{name} to give up")
    assert process.returncode != 0
    return deployment.log(name).read_text()


def test_tls_federation_refusals_and_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    federation = write_federation(tmp_path, SITES, port)
    user_tasks = tmp_path / "user-tasks"
    user_tasks.mkdir()
    (user_tasks / "heart_user_task.py").write_text(
        textwrap.dedent(
            """
            from flowerbed.tasks.registry import resolve_task

            task = resolve_task("tabular-logreg")
            """
        )
    )
    monkeypatch.syspath_prepend(str(user_tasks))
    # operator and IT steps that need no server run in this process (the CLI is a thin layer,
    # tested elsewhere); the coordinator and the nodes are real `flowerbed` processes
    fed = load_federation(federation)
    provision(fed)
    kits = tmp_path / "provision" / "kits"
    other = tmp_path / "other"  # a second federation: its kit trusts another CA
    other.mkdir()
    provision(load_federation(write_federation(other, ["cleveland"], port)))
    intruder = _intruder_kit(kits, tmp_path / "intruder-kit")
    for site in SITES[:2]:  # the hospitals approve the user task on two nodes out of three
        approve_task(USER_TASK, tmp_path / f"approved-{site}.json")

    with Deployment(tmp_path) as d:
        d.env["PYTHONPATH"] = str(user_tasks)

        d.start_coordinator(federation)
        coordinator_log = d.log("coordinator").read_text()
        assert all(f"site {s}: key registered" in coordinator_log for s in SITES), coordinator_log

        for site in SITES:
            d.start_node(
                site,
                "--kit",
                str(kits / site),
                "--runtime-port",
                str(free_port()),
                "--approvals",
                str(tmp_path / f"approved-{site}.json"),
            )
        data = str(HEART_DATA / "processed.cleveland.data")
        for name, kit in (("intruder", intruder), ("other-ca", other / "provision" / "kits" / "cleveland")):
            d.spawn(
                f"node-{name}",
                ["node", "start", "--data", data, "--kit", str(kit), *_refusal_options()],
            )

        # refusal 1: a key the coordinator never registered
        log = _wait_exit(d, "node-intruder", 120)
        assert "refused this node: site intruder's key is not registered" in log, log
        # refusal 2: a kit whose CA did not sign the coordinator's certificate
        log = _wait_exit(d, "node-other-ca", 120)
        assert "does not vouch for" in log, log

        # three rounds with TLS and authentication; the coordinator is killed after round 1
        run_dir = Path(start_run(fed, HEART_TOML, overrides=["rounds=3", *QUICK]).run_dir)
        wait_for(lambda: len(_rounds(run_dir)) >= 1, 400, f"round 1 in {run_dir}\n{d.tail()}", poll=0.2)
        d.kill("coordinator", signal.SIGKILL)
        done_before = _rounds(run_dir)
        assert done_before and done_before[-1] < 3, "the run finished before the coordinator could be killed"
        assert (run_dir / "checkpoints" / "LATEST").is_file()

        d.start_coordinator(federation)
        resumed = d.run(["run", "resume", run_dir.name, "--federation", str(federation)])
        assert resumed.returncode == 0, resumed.stderr + resumed.stdout  # the CLI, once
        wait_for(lambda: (run_dir / "summary.json").is_file(), 500, f"the resumed run\n{d.tail()}", poll=1)
        assert _rounds(run_dir) == [1, 2, 3]
        assert (run_dir / "checkpoints" / "round-0003").is_dir()
        assert (run_dir / "checkpoints" / "LATEST").read_text().strip().endswith("3")
        status = run_status(fed, run_dir.name)
        assert status["finished"] and status["rounds_done"] == 3
        assert sorted(status["participants"]) == SITES
        assert (
            status["flower_run_id"]
            != json.loads((tmp_path / "coordinator-state" / "runs.json").read_text())[0]["flower_run_id"]
        )

        # refusal 3: a user task that switzerland did not approve
        overrides = ["rounds=1", *QUICK, f"task.name='{USER_TASK}'", "task.args={}"]
        user_run = Path(start_run(fed, HEART_TOML, overrides=overrides).run_dir)
        wait_for(lambda: (user_run / "summary.json").is_file(), 400, f"the user-task run\n{d.tail()}", poll=1)
        summary = json.loads((user_run / "summary.json").read_text())
        reasons = " ".join(summary["excluded"].values())
        assert "node switzerland" in reasons and f"task {USER_TASK!r} is not approved" in reasons, summary
        assert "flowerbed node approve" in reasons
        assert sorted(json.loads((user_run / "metrics.jsonl").read_text().splitlines()[0])["participants"]) == SITES[:2]
