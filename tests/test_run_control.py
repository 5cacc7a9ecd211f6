"""Operator run commands against a real SuperLink on 127.0.0.1: start, status, stop."""

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


def test_start_status_stop_and_no_resume_without_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    federation = load_federation(write_federation(tmp_path, ["a", "b"], free_port()))
    with pytest.raises(RunError, match="start the coordinator first"):
        run_control.start_run(federation, HEART_TOML)
    coordinator = Coordinator(federation, insecure=True)
    try:
        coordinator.start(timeout=120, log=lambda _: None)
        assert "WARNING: the coordinator runs with --insecure" in capsys.readouterr().err
        record = run_control.start_run(federation, HEART_TOML, overrides=["rounds=2"])
        assert "WARNING: the coordinator runs with --insecure" in capsys.readouterr().err  # on every command
        submitted = tomllib.loads(Path(record.run_config).read_text())
        assert submitted["run-dir"] == record.run_dir and submitted["expected-nodes"] == 2
        assert tomllib.loads(submitted["experiment"])["rounds"] == 2
        # no node ever connects: the run waits in discovery until it is stopped
        wait_for(lambda: run_control.run_status(federation)["status"] == "running", 120, "the run to start")
        run_control.stop_run(federation, str(record.flower_run_id))
        status = run_control.run_status(federation, record.name)
        assert status["status"].startswith("finished:stopped"), status
        assert status["rounds_done"] == 0 and not status["finished"]
        with pytest.raises(RunError, match="no checkpoint to resume from"):
            run_control.resume_run(federation, record.name)
    finally:
        coordinator.stop()
