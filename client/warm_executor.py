"""A warm executor for the node's ClientApp: import once, fork one child per message.

Flower 1.42's SuperExec starts a fresh ``flwr-clientapp`` process for every message a node
receives; that process imports Python, Flower, torch and the app before it does any work (seconds
per message on a busy machine). This executor is Flower's own SuperExec loop
(``run_superexec``) with one part swapped: instead of spawning ``flwr-clientapp``, it forks a child
of an interpreter that already imported everything, and the child runs Flower's own
``run_clientapp`` for that one message. Each message still runs in its own process (memory and
state do not leak from one message to the next), without paying the start-up cost.

The parent imports the hospital's installed ``flowerbed.client.app`` before any message arrives,
so Flower finds it in ``sys.modules`` and never imports code the coordinator ships.

Started by ``flowerbed node start`` next to ``flower-supernode --isolation process``::

    python -m flowerbed.client.warm_executor --runtime-api-address 127.0.0.1:9094 --parent-pid PID
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import traceback
from collections.abc import Iterable
from typing import Any

from flowerbed import flower_internals

POLL_INTERVAL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
DEFAULT_POLL_INTERVAL = "0.05"
PRELOAD = ("torch", "flowerbed.client.app")


def preload(modules: Iterable[str]) -> list[str]:
    """Import ``modules`` now; return those that could not be imported (with the reason)."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a broken module is reported by the child that needs it
            failed.append(f"{name}: {exc}")
    return failed


class ForkExecutor:
    """A Flower SuperExec executor that forks a warm child per ClientApp message.

    Implements the executor protocol of Flower's SuperExec. Task types other
    than ClientApp (none reach a SuperNode today) are launched the standard way.
    """

    def __init__(self) -> None:
        self._owner = os.getpid()
        self._children: set[int] = set()
        self._fallback = flower_internals.subprocess_executor()

    def get_eligible_capacity(
        self,
        supported_task_types: set[Any],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[Any], set[str]]:
        """Every task type can start without waiting."""
        return set(supported_task_types), set()

    def wait_for_capacity(self, task_type: Any = None, **_: object) -> None:
        """Nothing to wait for."""

    def launch(self, spec: Any) -> Any:
        """Fork a child that runs Flower's ``run_clientapp`` for this one message."""
        if spec.task_type != flower_internals.clientapp_task_type():
            return self._fallback.launch(spec)
        pid = os.fork()
        if pid == 0:  # child
            os._exit(_run_one(spec))
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

    def close(self) -> None:
        """Stop running children when the executor shuts down (parent only)."""
        if os.getpid() != self._owner:
            return
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _run_one(spec: Any) -> int:
    """Body of a forked child: run one ClientApp message and return the exit code."""
    run_clientapp, validate_and_resolve_root_certificates = flower_internals.clientapp_runner()

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
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
    """Run Flower's SuperExec loop with the fork executor against a SuperNode's Runtime API."""
    parser = argparse.ArgumentParser(description="flowerbed's warm ClientApp executor")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--preload", action="append", default=None, help="module to import up front")
    args = parser.parse_args(argv)

    os.environ.setdefault(POLL_INTERVAL_ENV, DEFAULT_POLL_INTERVAL)
    for problem in preload(args.preload or PRELOAD):
        print(f"flowerbed warm executor: could not preload {problem}", file=sys.stderr, flush=True)

    flower_internals.run_superexec_with(  # Flower's loop, our executor
        ForkExecutor(),
        runtime_api_address=args.runtime_api_address,
        insecure=True,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


if __name__ == "__main__":
    main()
