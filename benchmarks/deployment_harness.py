"""Real coordinator and node processes on 127.0.0.1 for the deployment tests.

Every process is started through the ``flowerbed`` command (as an operator would), in its own
process group, with its output in a log file; ``Deployment.close`` stops every group it started.
Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from flowerbed.process_control import alive, descendants

ROOT = Path(__file__).resolve().parents[1]
HEART_TOML = ROOT / "simulations" / "experiments" / "heart.toml"
HEART_DATA = ROOT / "tasks" / "data" / "heart_disease"
SITES = {
    "cleveland": "processed.cleveland.data",
    "hungary": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
FLOWERBED = [sys.executable, "-m", "flowerbed.cli"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_federation(folder: Path, sites: list[str], port: int) -> Path:
    """A federation file for ``sites`` with the coordinator on 127.0.0.1:``port``."""
    lines = [
        'name = "test-federation"',
        "",
        "[coordinator]",
        f'address = "127.0.0.1:{port}"',
        'bind_host = "127.0.0.1"',
    ]
    for site in sites:
        lines += ["", "[[sites]]", f'name = "{site}"']
    path = folder / "federation.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.5) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class Deployment:
    """Processes of one test federation; a context manager that always stops them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.processes: dict[str, subprocess.Popen] = {}
        self.markers: set[str] = {str(folder)}
        self.env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLOWERBED_HOME=str(folder / "home"))

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start ``flowerbed ARGS`` in its own process group, output to ``<name>.log``."""
        return self.spawn_command(name, [*FLOWERBED, *args])

    def spawn_command(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start any command in its own process group, output to ``<name>.log``."""
        handle = self.log(name).open("a")
        process = subprocess.Popen(
            command,
            cwd=self.folder,
            env=env or self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        self.processes[name] = process
        return process

    def sigterm(self, name: str, timeout: float = 10.0) -> tuple[float, list[int]]:
        """Send SIGTERM to the process ``name`` alone (not its group), as a service manager or ``kill`` does.

        Returns the seconds until it exited (``inf`` if it did not within ``timeout``) and the
        processes it had started that are still alive then.
        """
        process = self.processes[name]
        before = descendants(process.pid)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
            elapsed = time.monotonic() - started
        except subprocess.TimeoutExpired:
            elapsed = float("inf")
        return elapsed, [pid for pid, start in before.items() if alive(pid, start)]

    def run(self, args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run ``flowerbed ARGS`` to completion."""
        return subprocess.run(
            [*FLOWERBED, *args], cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process group and wait for its leader."""
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)

    def close(self) -> None:
        """Stop every process group (SIGTERM to all at once, SIGKILL after 5 s), then leftovers."""
        running = [p for p in self.processes.values() if p.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            time.sleep(0.1)
        for name in self.processes:
            self.kill(name, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.5)  # Flower's SuperExec and ServerApp follow their parent within ~1 s
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def leftovers(self) -> list[int]:
        """Processes started for this deployment that are still alive.

        Flower starts its SuperExec in a session of its own, so a killed coordinator's ServerApp
        is found by what only this deployment's processes carry on their command line: its
        folder and its coordinator's address.
        """
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(marker in cmdline for marker in self.markers):
                found.append(int(entry.name))
        return found

    def start_coordinator(self, federation: Path, *extra: str, timeout: float = 90.0) -> None:
        """``flowerbed coordinator start`` and wait until it reports that it listens."""
        address = tomllib.loads(federation.read_text())["coordinator"]["address"]
        self.markers.add(f"--runtime-api-address {address}")
        log = self.log("coordinator")
        before = log.stat().st_size if log.exists() else 0  # a restart appends: only its own lines count
        process = self.spawn("coordinator", ["coordinator", "start", str(federation), *extra])

        def since_start() -> str:
            with log.open("rb") as handle:
                handle.seek(before)
                return handle.read().decode(errors="replace")

        wait_for(
            lambda: "coordinator listening" in since_start() or process.poll() is not None,
            timeout,
            "the coordinator",
        )
        assert process.poll() is None, log.read_text()

    def start_node(self, site: str, *args: str) -> subprocess.Popen:
        """``flowerbed node start`` for ``site`` on its hospital's file."""
        data = HEART_DATA / SITES[site]
        return self.spawn(f"node-{site}", ["node", "start", "--data", str(data), *args])

    def status(self, federation: Path, run: str | None = None) -> dict:
        """``flowerbed run status --format json``."""
        args = ["run", "status", *([run] if run else []), "--federation", str(federation), "--format", "json"]
        result = self.run(args, timeout=60)
        assert result.returncode == 0, result.stderr + result.stdout
        return json.loads(result.stdout)

    def tail(self, chars: int = 3000) -> str:
        """The end of every log, for assertion messages."""
        parts = []
        for log in sorted(self.folder.glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text()[-chars:]}")
        return "\n".join(parts)
