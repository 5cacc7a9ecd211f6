"""The node's ClientApp executor: only the hospital's installed flowerbed runs, each message warm.

Flower 1.42's SuperExec starts a fresh ``flwr-clientapp`` process for every message a node
receives; that process imports Python, Flower, torch and the app before it does any work (seconds
per message on a busy machine), and it runs whatever ClientApp the run's app bundle names. This
executor is Flower's own SuperExec loop (``run_superexec``) with flowerbed's executor:

- it takes only ClientApp tasks; a task of another type is refused, never started;
- each message runs Flower's own ``run_clientapp`` in a process of its own, guarded: the run's
  bundle is checked before anything of it is unpacked (``flowerbed.app_bundle``: a bundle that
  names other code or carries any is refused with an error reply and a log line naming the run),
  it is never installed, and the ClientApp is always the hospital's installed
  ``flowerbed.client.app:app``;
- by default that process is **forked** from an interpreter that already imported torch (with
  ``torch._dynamo``, which torch otherwise imports at a model's first optimizer step) and
  flowerbed: no start-up cost, nothing shared between messages; with ``--spawn`` it is a new
  interpreter per message, as with Flower's own executor (``flowerbed node start --executor
  flower``, for comparison);
- with ``--wake-file``, it asks the SuperNode for a task when the SuperNode has pulled a message
  (``WakeOnMessage``) instead of every 50 ms.

Started by ``flowerbed node start`` next to ``flower-supernode --isolation process``::

    python -m flowerbed.client.warm_executor --runtime-api-address 127.0.0.1:9094 --parent-pid PID \\
        --wake-file STATE/executor.wake
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flowerbed import flower_internals
from flowerbed.app_bundle import AppBundleRefused, check_app_bundle
from flowerbed.process_control import popen_ignoring_interrupt, quiet_main, watch_parent

POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
DEFAULT_POLL_INTERVAL = "0.05"
TOKEN_ENV = "FLOWERBED_TASK_TOKEN"
WAKE_FALLBACK = 3.0  # with a wake file: a task poll at least this often (a missed wake costs at most this)
WAKE_CHECK = 0.02
# torch imports torch._dynamo at a model's first optimizer step: 2 s and more in every message's process
PRELOAD = ("torch", "torch._dynamo", "flowerbed.client.app")


def preload(modules: Iterable[str]) -> list[str]:
    """Import ``modules`` now; return those that could not be imported (with the reason)."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken module is reported by the child that needs it
            failed.append(f"{name}: {exc}")
    return failed


def remember_architecture() -> None:
    """Replace ``platform.architecture`` in this process by a cached one, and ask it once, here.

    The forked children reuse the answer. Flower's ClientApp runner builds a telemetry event for
    every message (even with telemetry off), and the event reads ``platform.architecture()``,
    which runs ``file`` on the interpreter: a fork of a process that imported torch, about 20 ms
    of CPU per message.
    """
    platform.architecture = functools.cache(platform.architecture)
    platform.architecture()


def refuse_foreign_bundle(content: bytes, run_id: int | None) -> None:
    """The node's check of a run's bundle: log the refusal, then raise it (the node replies with an error)."""
    try:
        check_app_bundle(content, run_id)
    except AppBundleRefused as exc:
        print(f"flowerbed node: {exc}", file=sys.stderr, flush=True)
        raise


def load_client_app() -> Any:
    """The hospital's installed ClientApp (imported only once the run's bundle passed the check)."""
    from flowerbed.client.app import app

    return app


def guard() -> None:
    """Make Flower's ClientApp runner in this process check every bundle and run only the installed app.

    It also asks its node again for a message's objects 50 ms after finding them missing (Flower
    waits 1 s, then 2 s, ...): the node hands out the task while it still pulls the objects.
    """
    flower_internals.guard_clientapp_runtime(refuse_foreign_bundle, load_client_app, AppBundleRefused)
    flower_internals.quicken_object_pulls("flwr.supernode.runtime.run_clientapp")


class WakeOnMessage:
    """The SuperExec loop's wait between two task polls: until the SuperNode has a message, at most ``fallback`` s.

    The SuperNode (``flowerbed.client.supernode_launcher --wake-file``) appends a byte to ``path``
    for every message it has pulled; this checks the file's size every ``check`` seconds (a
    ``stat``, nothing sent) and returns as soon as it grew. Without it Flower's loop asks the node's
    Runtime API for a task every 50 ms: about 80 requests a second for four nodes, which took more
    CPU than the rounds' own work on a small machine.
    """

    def __init__(self, path: Path, fallback: float = WAKE_FALLBACK, check: float = WAKE_CHECK) -> None:
        self.path = path
        self.fallback = fallback
        self.check = check
        self._seen = self._size()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return -1

    def sleep(self, _interval: float = 0.0) -> None:
        """Return when a message is ready, or after ``fallback`` seconds (a task poll then catches anything missed)."""
        deadline = time.monotonic() + self.fallback
        while (size := self._size()) == self._seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(self.check, remaining))
        self._seen = size


class GuardedExecutor:
    """A Flower SuperExec executor that runs each ClientApp message through the guard.

    Parameters
    ----------
    spawn : bool (default: False)
        Start a new interpreter per message instead of forking a warm one.
    """

    def __init__(self, spawn: bool = False) -> None:
        self.spawn = spawn
        self._owner = os.getpid()
        self._children: set[int] = set()
        self._spawned: dict[int, subprocess.Popen] = {}

    def get_eligible_capacity(
        self,
        supported_task_types: set[Any],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[Any], set[str]]:
        """Only ClientApp tasks are ever taken."""
        return {t for t in supported_task_types if t == flower_internals.clientapp_task_type()}, set()

    def wait_for_capacity(self, task_type: Any = None, **_: object) -> None:
        """Nothing to wait for."""

    def launch(self, spec: Any) -> Any:
        """Run one ClientApp message in a forked (or, with ``spawn``, a new) guarded process."""
        if spec.task_type != flower_internals.clientapp_task_type():
            reason = f"task {spec.task_id} is a {spec.task_type} task; this node runs only flowerbed's ClientApp"
            print(f"flowerbed node: refused {reason}", file=sys.stderr, flush=True)
            return flower_internals.launch_refused(reason)
        if self.spawn:
            command = [
                sys.executable,
                "-P",  # the working folder is not on sys.path
                "-m",
                "flowerbed.client.warm_executor",
                "--task",
                "--parent-pid",
                str(os.getpid()),
            ]
            command += ["--runtime-api-address", spec.runtime_api_address]
            if not spec.insecure and spec.root_certificates_path:
                command += ["--root-certificates", spec.root_certificates_path]
            process = popen_ignoring_interrupt(command, env={**os.environ, TOKEN_ENV: spec.token})
            self._spawned[process.pid] = process
            return flower_internals.launch_accepted()
        pid = os.fork()
        if pid == 0:  # child
            os._exit(_run_one(spec.runtime_api_address, spec.token, spec.insecure, spec.root_certificates_path))
        self._children.add(pid)
        return flower_internals.launch_accepted()

    def reconcile(self) -> None:
        """Reap children that finished."""
        for pid in list(self._children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._children.discard(pid)
        for pid, process in list(self._spawned.items()):
            if process.poll() is not None:
                del self._spawned[pid]

    def close(self) -> None:
        """Stop running children when the executor shuts down (parent only)."""
        if os.getpid() != self._owner:
            return
        for pid in [*self._children, *self._spawned]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _run_one(runtime_api_address: str, token: str, insecure: bool, root_certificates_path: str | None) -> int:
    """Body of a message's process: run Flower's (guarded) ``run_clientapp`` once; the exit code."""
    run_clientapp, validate_and_resolve_root_certificates = flower_internals.clientapp_runner()

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        run_clientapp(
            runtime_api_address=runtime_api_address,
            token=token,
            insecure=insecure,
            certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
            parent_pid=None,
            runtime_dependency_install=False,
        )
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


def main(argv: list[str] | None = None) -> None:
    """Run Flower's SuperExec loop with the guarded executor against a SuperNode's Runtime API."""
    parser = argparse.ArgumentParser(description="flowerbed's guarded ClientApp executor")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--superexec-auth-secret-file", type=Path, default=None)
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--preload", action="append", default=None, help="module to import up front")
    parser.add_argument("--spawn", action="store_true", help="a new interpreter per message (no fork)")
    parser.add_argument("--task", action="store_true", help="run one message (token in $FLOWERBED_TASK_TOKEN)")
    parser.add_argument("--wake-file", type=Path, default=None, help="poll for a task when the SuperNode appends here")
    args = parser.parse_args(argv)

    if args.task:
        token = os.environ.pop(TOKEN_ENV, "")
        if not token:
            raise SystemExit(f"flowerbed node: no task token in ${TOKEN_ENV}")
        guard()
        if args.parent_pid is not None:
            watch_parent(args.parent_pid, lambda: os.kill(os.getpid(), signal.SIGTERM))
        insecure = args.root_certificates is None
        raise SystemExit(_run_one(args.runtime_api_address, token, insecure, args.root_certificates))

    if args.wake_file is not None:
        flower_internals.superexec_wait(WakeOnMessage(args.wake_file).sleep)
    elif not args.spawn:
        os.environ.setdefault(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL)
    if not args.spawn:
        for problem in preload(args.preload or PRELOAD):
            print(f"flowerbed warm executor: could not preload {problem}", file=sys.stderr, flush=True)
        remember_architecture()
        guard()  # the forked children inherit it
    secret = args.superexec_auth_secret_file.read_bytes() if args.superexec_auth_secret_file else None
    flower_internals.run_superexec_with(  # Flower's loop, our executor
        GuardedExecutor(spawn=args.spawn),
        runtime_api_address=args.runtime_api_address,
        insecure=True,
        superexec_auth_secret=secret,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    quiet_main(main)
