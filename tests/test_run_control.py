"""Operator run commands against a real SuperLink on 127.0.0.1: start, status, logs, stop.

The coordinator and every ``flwr`` command run with a ``PATH`` that lacks this environment's
folder, as a service manager runs ``/opt/venv/bin/flowerbed`` without activating it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from flowerbed.benchmarks.deployment_harness import HEART_TOML, free_port, wait_for, write_federation
from flowerbed.exception import RunError
from flowerbed.server import run_control
from flowerbed.server.coordinator import Coordinator
from flowerbed.server.federation_config import load_federation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_start_status_logs_stop_and_no_resume_without_checkpoint(
    tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no virtual environment, no pyenv shims
    federation = load_federation(write_federation(tmp_path, ["a", "b"], free_port()))
    with pytest.raises(RunError, match="start the coordinator first"):
        run_control.start_run(federation, HEART_TOML)
    coordinator = Coordinator(federation, insecure=True)
    try:
        coordinator.start(timeout=120, log=lambda _: None)
        assert "WARNING: the coordinator runs with --insecure" in capfd.readouterr().err
        record = run_control.start_run(federation, HEART_TOML, overrides=["rounds=2"])
        assert "WARNING: the coordinator runs with --insecure" in capfd.readouterr().err  # on every command
        submitted = tomllib.loads(Path(record.run_config).read_text())
        assert submitted["run-dir"] == record.run_dir and submitted["expected-nodes"] == 2
        assert tomllib.loads(submitted["experiment"])["rounds"] == 2
        # no node ever connects: the run waits in discovery, and says so in its log, until it is stopped
        wait_for(lambda: run_control.run_status(federation)["status"] == "running", 120, "the run to start")

        def log_text() -> str:
            run_control.stream_logs(federation, record.name)
            return capfd.readouterr().out

        logs: list[str] = []
        wait_for(lambda: "waiting for nodes: 0 of 2 connected" in (logs.append(log_text()) or logs[-1]), 90, "the log")
        ours = [line[line.index("flowerbed ") :] for line in logs[-1].splitlines() if "flowerbed " in line]
        assert len(ours) == len(set(ours)) >= 2, f"each line once: {ours}"
        assert run_control.run_status(federation)["reason"] == "running: waiting for the nodes and the first round"

        run_control.stop_run(federation, str(record.flower_run_id), log=lambda _: None)
        status = run_control.run_status(federation, record.name)
        assert status["status"].startswith("finished:stopped"), status
        assert status["rounds_done"] == 0 and not status["finished"]
        assert status["reason"].startswith("ended without a summary after round 0"), status["reason"]
        with pytest.raises(RunError, match="no checkpoint to resume from"):
            run_control.resume_run(federation, record.name)
    finally:
        coordinator.stop()
