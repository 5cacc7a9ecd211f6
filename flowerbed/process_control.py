"""Stopping flowerbed's long-running commands and the processes they start.

``flowerbed coordinator start`` and ``flowerbed node start`` each run a few Flower processes (the
SuperLink or SuperNode, an executor, one process per task). On SIGTERM or Ctrl-C they stop all of
them within seconds and print no traceback:

- a signal handler only records the request (``StopSignal``); the command's main loop notices it;
- ``stop_processes`` sends SIGTERM to the direct children, a second SIGTERM halfway through the
  grace period (Flower's processes and uvicorn stop at once on a second signal instead of
  waiting for open connections), SIGKILL to whatever is left at its end, and then to every
  descendant they left behind (found before the first signal, so a process that lost its parent
  is still found).

Ctrl-C in a terminal reaches every process of the foreground group at once. The children are
therefore started with SIGINT ignored (``popen_ignoring_interrupt``; Flower's processes install
their own handlers once they are up), so that they stop in order, through their parent, and none
dies mid-import with a traceback; their entry points also end quietly on a ``KeyboardInterrupt``
(``quiet_main``).

``flowerbed run ...`` commands turn SIGTERM into the same path as Ctrl-C (``sigterm_as_interrupt``):
the ``flwr`` process they wait on is stopped and they exit with code 130.

Every Flower process a command starts finds Flower's console scripts (``flower-superlink``,
``flower-supernode``, ``flower-superexec``, ``flwr``) beside the command's own interpreter, as a
service manager runs ``/opt/venv/bin/flowerbed`` without activating the environment:
``flower_executable`` names them by full path and ``child_env`` puts that folder first on the
children's ``PATH``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import FrameType

DEFAULT_GRACE = 5.0


class StopSignal:
    """Records SIGTERM and SIGINT instead of acting on them inside the handler."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> StopSignal:
        """Handle SIGTERM and SIGINT from now on (main thread only)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._record)
        return self

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking early on a stop; return whether a stop was asked for."""
        deadline = time.monotonic() + seconds
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.requested


def sigterm_as_interrupt() -> None:
    """Make SIGTERM behave like Ctrl-C: a ``KeyboardInterrupt`` in the main thread."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def popen_ignoring_interrupt(command: list[str], **kwargs: object) -> subprocess.Popen:
    """``subprocess.Popen`` for a child that starts with SIGINT ignored (its parent stops it with SIGTERM)."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        return subprocess.Popen(command, **kwargs)  # type: ignore[call-overload]
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def interpreter_folder() -> Path:
    """The folder of this interpreter (a virtual environment's ``bin``), where its console scripts are.

    ``sys.executable`` as started (not resolved): a virtual environment's ``python`` is often a link
    to the base interpreter, whose folder lacks the environment's scripts.
    """
    return Path(sys.executable).parent


def flower_executable(name: str) -> str:
    """A console script (``flower-supernode``, ``flwr``, ...) beside this interpreter, else from ``PATH``."""
    candidate = interpreter_folder() / name
    return str(candidate) if candidate.exists() else shutil.which(name) or name


def child_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with this interpreter's folder first on ``PATH``.

    Flower's processes start others by name (``flower-superexec``, ``flwr-serverapp``); they find
    this environment's, activated or not.
    """
    env = dict(os.environ if base is None else base)
    folder = str(interpreter_folder())
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != folder]
    env["PATH"] = os.pathsep.join([folder, *parts])
    return env


def flower_logs_once() -> None:
    """Let each line of Flower's log reach the console once.

    Opacus gives the root logger a handler when it is imported (``logging.basicConfig``); Flower's
    logger has its own console handler and also passes every line on to the root's, so without
    this each line shows twice (and twice in ``flwr log``, which mirrors stdout and stderr).
    """
    logging.getLogger("flwr").propagate = False


def quiet_main(main: Callable[[], object]) -> None:
    """Run a child process's ``main``; a ``KeyboardInterrupt`` ends it with code 130 and no traceback."""
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a process from a later one with the same id)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else None


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` with its start time (Linux; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if fields and fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: dict[int, str] = {}
    stack = list(parents.get(pid, []))
    while stack:
        child = stack.pop()
        start = _start_time(child)
        if start is not None and child not in found:
            found[child] = start
            stack.extend(parents.get(child, []))
    return found


def alive(pid: int, start: str) -> bool:
    """Whether the process ``pid`` that started at ``start`` still runs (not a zombie)."""
    return _start_time(pid) == start


def stop_processes(processes: Iterable[subprocess.Popen | None], grace: float = DEFAULT_GRACE) -> None:
    """Stop ``processes`` and everything they started: SIGTERM, again after ``grace / 2``, SIGKILL after ``grace``.

    Every direct child is reaped (no zombie is left behind).
    """
    running = [p for p in processes if p is not None and p.poll() is None]
    tree: dict[int, str] = {}
    for process in running:
        tree.update(descendants(process.pid))
    started = time.monotonic()
    repeated = False
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
    while time.monotonic() < started + grace and (
        any(p.poll() is None for p in running) or any(alive(pid, start) for pid, start in tree.items())
    ):
        if not repeated and time.monotonic() >= started + grace / 2:
            repeated = True
            for process in running:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.terminate()
        time.sleep(0.05)
    for process in running:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=2)
    for pid, start in tree.items():
        if alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def watch_parent(parent_pid: int, on_exit: Callable[[], None], interval: float = 0.2) -> threading.Thread:
    """Call ``on_exit`` once ``parent_pid`` is gone (a daemon thread polls every ``interval`` s)."""

    def watch() -> None:
        while True:
            time.sleep(interval)
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                on_exit()
                return
            except PermissionError:
                continue

    thread = threading.Thread(target=watch, name="flowerbed-parent-watch", daemon=True)
    thread.start()
    return thread
