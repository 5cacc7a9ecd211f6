"""The coordinator's SuperExec: every run's ServerApp is the coordinator's installed flowerbed.

Flower's SuperLink (``--isolation process``) leaves ServerApp tasks for a SuperExec to take. This
module is Flower's own SuperExec loop (``run_superexec``) with flowerbed's executor:

- it takes only ServerApp tasks; a task of another type is refused, never started;
- each run gets a process of its own (``--task``), Flower's ``flwr-serverapp`` except that the
  run's bundle is checked before Flower unpacks it (``flowerbed.app_bundle``: a bundle that names
  other code or carries any is refused, the run fails with the reason and this log line names it)
  and the app is always the coordinator's installed ``flowerbed.server.app:app``;
- it signs its requests with the SuperExec secret (``--superexec-auth-secret-file``, made by
  ``flowerbed coordinator start``), so nobody else who reaches the coordinator's port can take a
  run's task.

Started by ``flowerbed coordinator start``::

    python -m flowerbed.server.serverapp_executor --runtime-api-address 127.0.0.1:9093 \\
        --root-certificates CA --superexec-auth-secret-file SECRET --parent-pid SUPERLINK_PID
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flowerbed import flower_internals
from flowerbed.app_bundle import AppBundleRefused, check_app_bundle
from flowerbed.process_control import popen_ignoring_interrupt, quiet_main, stop_processes

TOKEN_ENV = "FLOWERBED_TASK_TOKEN"
POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
DEFAULT_POLL_INTERVAL = "0.25"
BUSY_POLL_INTERVAL = 2.0  # seconds between task polls while a ServerApp runs (each poll costs the SuperLink CPU)


class ServerAppExecutor:
    """A Flower SuperExec executor that starts flowerbed's guarded ServerApp process per run."""

    def __init__(self) -> None:
        self._owner = os.getpid()
        self._children: dict[int, subprocess.Popen] = {}

    def get_eligible_capacity(
        self,
        supported_task_types: set[Any],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[Any], set[str]]:
        """Only ServerApp tasks are ever taken."""
        return {t for t in supported_task_types if t == flower_internals.serverapp_task_type()}, set()

    def wait_for_capacity(self, task_type: Any = None, **_: object) -> None:
        """Nothing to wait for."""

    def launch(self, spec: Any) -> Any:
        """Start the guarded ServerApp process for one run (the task's token goes in its environment)."""
        if spec.task_type != flower_internals.serverapp_task_type():
            reason = f"task {spec.task_id} is a {spec.task_type} task; this coordinator runs only flowerbed's ServerApp"
            print(f"flowerbed coordinator: refused {reason}", file=sys.stderr, flush=True)
            return flower_internals.launch_refused(reason)
        command = [
            sys.executable,
            "-P",  # the working folder is not on sys.path
            "-m",
            "flowerbed.server.serverapp_executor",
            "--task",
            "--runtime-api-address",
            spec.runtime_api_address,
            "--parent-pid",
            str(os.getpid()),
        ]
        if spec.insecure:
            command.append("--insecure")
        elif spec.root_certificates_path:
            command += ["--root-certificates", spec.root_certificates_path]
        process = popen_ignoring_interrupt(command, env={**os.environ, TOKEN_ENV: spec.token})
        self._children[process.pid] = process
        return flower_internals.launch_accepted()

    def wait(self, interval: float) -> None:
        """The loop's wait between two task polls: ``interval``, or ``BUSY_POLL_INTERVAL`` while a run goes on.

        A poll costs the SuperLink about as much CPU as a message object; a round's messages need it more
        than a second run's start needs its first second.
        """
        self.reconcile()
        time.sleep(max(interval, BUSY_POLL_INTERVAL) if self._children else interval)

    def reconcile(self) -> None:
        """Forget ServerApp processes that finished."""
        for pid, process in list(self._children.items()):
            if process.poll() is not None:
                del self._children[pid]

    def close(self) -> None:
        """Stop running ServerApp processes when the executor shuts down."""
        if os.getpid() == self._owner:
            stop_processes(self._children.values(), grace=3.0)


def refuse_foreign_bundle(content: bytes, run_id: int | None) -> None:
    """The coordinator's check of a run's bundle: log the refusal, then raise it."""
    try:
        check_app_bundle(content, run_id)
    except AppBundleRefused as exc:
        print(f"flowerbed coordinator: {exc}", file=sys.stderr, flush=True)
        raise


def load_server_app() -> Any:
    """The coordinator's installed ServerApp (imported only once the run's bundle passed the check)."""
    from flowerbed.server.app import app

    return app


def run_task(args: argparse.Namespace) -> None:
    """Body of a ServerApp process: Flower's ``flwr-serverapp`` for one run, guarded."""
    token = os.environ.pop(TOKEN_ENV, "")
    if not token:
        raise SystemExit(f"flowerbed coordinator: no task token in ${TOKEN_ENV}")
    flower_internals.run_guarded_serverapp(
        refuse_foreign_bundle,
        load_server_app,
        AppBundleRefused,
        runtime_api_address=args.runtime_api_address,
        token=token,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
    )


def main(argv: list[str] | None = None) -> None:
    """Run Flower's SuperExec loop with the ServerApp executor (or, with ``--task``, one ServerApp)."""
    parser = argparse.ArgumentParser(description="flowerbed's coordinator SuperExec")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--superexec-auth-secret-file", type=Path, default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--task", action="store_true", help="run one ServerApp (token in $FLOWERBED_TASK_TOKEN)")
    args = parser.parse_args(argv)
    if args.task:
        run_task(args)
        return
    os.environ.setdefault(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL)
    secret = args.superexec_auth_secret_file.read_bytes() if args.superexec_auth_secret_file else None
    executor = ServerAppExecutor()
    flower_internals.superexec_wait(executor.wait)
    flower_internals.run_superexec_with(
        executor,
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        superexec_auth_secret=secret,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    quiet_main(main)
