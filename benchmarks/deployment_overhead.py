"""Per-round time of the deployment path on the four-hospital heart-disease federation, and where it goes.

A real coordinator (TLS, node authentication) and four ``flowerbed node start`` processes on
127.0.0.1 run the bundled heart experiment without central evaluation or local baselines; the same
experiment also runs in one process (the ``inline`` simulation backend, no messages at all) as the
baseline. Set-ups, run interleaved (A B C A B C ...):

- ``inline``: the simulation baseline;
- ``before``: with ``--before-src DIR`` only: the flowerbed source tree at ``DIR`` (for instance
  ``git archive REV | tar -x -C DIR``), imported through ``PYTHONPATH`` by every process, with its
  own default node flags;
- ``flower-waits``: this flowerbed with Flower's fixed waits back (``--poll-interval 0``: Flower's
  plain ``flower-supernode`` with its 3 s idle poll, 0.5 s reply check and 1 s retry of an object
  that is not there yet; the executor asks the node for work every 50 ms);
- ``after``: this flowerbed's defaults;
- ``flower-executor`` (``--flower-executor``): a new process per message (``--executor flower``).

The round time is the ServerApp's own clock (``timings.jsonl``), differenced per round; round 1
(discovery, first imports) is left out. For the breakdown every process of a deployed run records a
few timestamps (a ``sitecustomize`` on ``PYTHONPATH``, written by this benchmark and used by nothing
else): when the ServerApp pushes an exchange's messages, when the SuperLink hands a message to its
node, when the node has pulled the message's objects, when the ClientApp starts and ends, when the
ServerApp has pulled the reply. Per exchange the message whose reply came last is followed:

- ``delivery``: the push until the node has the message (the coordinator's push, the node's poll);
- ``download``: the node pulling the message's objects from the SuperLink;
- ``start``: the node's executor starting the ClientApp and the ClientApp pulling its input;
- ``work``: the ClientApp's handler (training or evaluation);
- ``reply``: the reply to the node and from the node to the SuperLink;
- ``collect``: the reply's objects to the SuperLink and the ServerApp pulling the reply (the
  exchange returns with the last one);

plus ``outside`` (the round's time outside its two exchanges: aggregation, checkpoint). The CPU
seconds each kind of process used per round are sampled from ``/proc``, and the SuperLink's
requests per round are counted by Flower handler (fleet and runtime API), each with the handler's
own CPU time. Nothing is asserted::

    python -m flowerbed.benchmarks.deployment_overhead --rounds 5 --repeats 2 [--before-src DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from flowerbed.benchmarks.deployment_harness import (
    HEART_TOML,
    SITES,
    Deployment,
    free_port,
    wait_for,
    write_federation,
)
from flowerbed.benchmarks.source_tree import source_tree_path
from flowerbed.server.run_folder import read_timings

QUICK = ["--set", "evaluate.local_baselines=false", "--set", "evaluate.central=false"]
TRACE_ENV = "FLOWERBED_BENCH_TRACE"
SEGMENTS = ("delivery", "download", "start", "work", "reply", "collect")

NODE_OPTIONS = {
    "before": [],
    "flower-waits": ["--poll-interval", "0"],
    "after": [],
    "flower-executor": ["--executor", "flower"],
}

# Loaded by every Python process of a traced deployment (PYTHONPATH): it wraps a few functions of
# Flower and flowerbed right after their module is imported and appends one JSON line per event.
TRACER = r"""
import functools, importlib.abc, importlib.util, json, os, sys, time

_FILE = os.environ.get("FLOWERBED_BENCH_TRACE")


def _emit(event, **fields):
    line = json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n"
    fd = os.open(_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _after(owner, name, record):
    original = getattr(owner, name, None)
    if original is None:
        return

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        t0 = time.time()
        out = original(*args, **kwargs)
        try:
            record(t0, time.time(), args, kwargs, out)
        except Exception:
            pass
        return out

    setattr(owner, name, wrapper)


def _exchange(module):
    original = module.send_and_receive

    @functools.wraps(original)
    def send_and_receive(grid, messages, timeout):
        messages = list(messages)
        t0 = time.time()
        out = original(grid, messages, timeout)
        kind = messages[0].metadata.message_type if messages else ""
        _emit("exchange", t0=t0, t1=time.time(), kind=kind, n=len(messages))
        return out

    module.send_and_receive = send_and_receive


def _grid(module):
    def collected(t0, t1, args, kwargs, out):
        for message in out:
            _emit("collected", t=t1, id=message.metadata.reply_to_message_id)

    _after(module.HttpGrid, "pull_messages", collected)


def _fleet(module):
    def delivered(t0, t1, args, kwargs, out):
        for message in out.messages_list:
            _emit("delivered", t=t1, id=message.metadata.message_id)

    def confirmed(t0, t1, args, kwargs, out):
        request = kwargs.get("request", args[0] if args else None)
        _emit("confirmed", t=t1, id=request.message_object_id)

    def replied(t0, t1, args, kwargs, out):
        request = kwargs.get("request", args[0] if args else None)
        for message in request.messages_list:
            _emit("replied", t=t1, id=message.metadata.reply_to_message_id)

    _after(module, "pull_messages", delivered)
    _after(module, "confirm_message_received", confirmed)
    _after(module, "push_messages", replied)


def _handlers(module):
    def work(t0, t1, args, kwargs, out):
        _emit("work", t0=t0, t1=t1, id=args[0].metadata.message_id)

    _after(module, "train", work)
    _after(module, "evaluate", work)


def _requests(api):
    def hook(module):
        for name, value in list(vars(module).items()):
            if callable(value) and not name.startswith("_") and getattr(value, "__module__", "") == module.__name__:
                _count(module, name, api)

    return hook


def _count(module, name, api):
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        c0 = time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            _emit("request", t=time.time(), api=api, name=name, cpu=time.thread_time() - c0)

    setattr(module, name, wrapper)


def _fleet_all(module):
    _fleet(module)
    _requests("fleet")(module)


HOOKS = {
    "flowerbed.server.exchange": _exchange,
    "flwr.superlink.grid.http_grid": _grid,
    "flwr.superlink.servicer.fleet.fleet_handlers": _fleet_all,
    "flwr.superlink.servicer.runtime.runtime_handlers": _requests("runtime"),
    "flowerbed.client.handlers": _handlers,
}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in HOOKS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            HOOKS[fullname](module)

        spec.loader.exec_module = exec_module
        return spec


if _FILE:
    sys.meta_path.insert(0, _Finder())
"""


def _round_times(run_dir: Path) -> list[float]:
    """Seconds per round, from the run's cumulative clock (``timings.jsonl``)."""
    cumulative = [float(t["time"]) for t in read_timings(run_dir)]
    return [b - a for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)]


def inline_round_times(rounds: int, folder: Path) -> list[float]:
    """Round times of the same experiment in one process (no deployment at all)."""
    out = folder / "inline"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowerbed.cli",
            "simulate",
            str(HEART_TOML),
            "-q",
            "-o",
            str(out),
            "--set",
            "backend.name='inline'",
            "--set",
            f"rounds={rounds}",
            *QUICK,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return _round_times(Path(result.stdout.strip().splitlines()[-1]))


class CpuSampler:
    """CPU seconds of a deployment's processes by kind, sampled from ``/proc`` every half second."""

    KINDS = (  # each names the other in its options (--superlink, --enable-supernode-auth)
        ("supernode_launcher", "supernode"),
        ("flower-supernode", "supernode"),
        ("superlink_launcher", "superlink"),
        ("flower-superlink", "superlink"),
        ("serverapp_executor --task", "serverapp"),
        ("warm_executor --task", ""),  # counted in its executor's, once reaped
        ("warm_executor", "node executor"),
    )

    def __init__(self, markers: set[str]) -> None:
        self.markers = markers
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __enter__(self) -> CpuSampler:
        if Path("/proc/self/stat").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _kind(self, command: str) -> str | None:
        if not any(marker in command for marker in self.markers):
            return None
        return next((kind for key, kind in self.KINDS if key in command), None) or None

    def _run(self) -> None:
        while not self._stop.is_set():
            now: dict[int, tuple[str, float]] = {}
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                with contextlib.suppress(OSError, IndexError, ValueError):
                    command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    kind = self._kind(command)
                    if kind is None:
                        continue
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    ticks = int(fields[11]) + int(fields[12])
                    if kind == "node executor":  # its message processes, once reaped
                        ticks += int(fields[13]) + int(fields[14])
                    now[int(entry.name)] = (kind, ticks / self._tick)
            self.samples.append((time.time(), now))
            self._stop.wait(0.5)

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds by kind used between two wall-clock times (processes alive at both)."""

        def at(when: float) -> dict[int, tuple[str, float]]:
            return next((s for t, s in reversed(self.samples) if t <= when), {})

        first, last = at(start), at(end)
        used: dict[str, float] = defaultdict(float)
        for pid, (kind, seconds) in last.items():
            if pid in first:
                used[kind] += seconds - first[pid][1]
        return dict(used)


def read_trace(path: Path) -> list[dict[str, Any]]:
    """The events of a traced run."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def exchange_breakdown(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per exchange: its kind, duration and the segments of the message whose reply came last."""
    by_id: dict[str, dict[str, float]] = defaultdict(dict)
    for event in events:
        if event["event"] in ("delivered", "confirmed", "replied", "collected"):
            by_id[event["id"]].setdefault(event["event"], event["t"])
        elif event["event"] == "work":
            by_id[event["id"]].update(work0=event["t0"], work1=event["t1"])
    out = []
    for exchange in sorted((e for e in events if e["event"] == "exchange"), key=lambda e: e["t0"]):
        t0, t1 = exchange["t0"], exchange["t1"]
        inside = [m for m in by_id.values() if t0 <= m.get("delivered", -1) <= t1 and "collected" in m]
        row: dict[str, Any] = {"kind": exchange["kind"], "t0": t0, "t1": t1, "seconds": t1 - t0}
        complete = [m for m in inside if {"confirmed", "work0", "work1", "replied"} <= m.keys()]
        if complete:
            last = max(complete, key=lambda m: m["collected"])
            row.update(
                delivery=last["delivered"] - t0,
                download=last["confirmed"] - last["delivered"],
                start=last["work0"] - last["confirmed"],
                work=last["work1"] - last["work0"],
                reply=last["replied"] - last["work1"],
                collect=t1 - last["replied"],
            )
        out.append(row)
    return out


def round_breakdown(exchanges: list[dict[str, Any]], round_times: list[float]) -> list[dict[str, float]]:
    """Per round from round 2: the segments summed over its train and evaluate exchanges, and ``outside``."""
    trains = [i for i, e in enumerate(exchanges) if e["kind"] == "train"]
    rows = []
    for number, index in enumerate(trains[1:], start=2):
        pair = [exchanges[index]]
        if index + 1 < len(exchanges) and exchanges[index + 1]["kind"] == "evaluate":
            pair.append(exchanges[index + 1])
        if number > len(round_times) or not all("work" in e for e in pair):
            continue
        row = {segment: sum(e[segment] for e in pair) for segment in SEGMENTS}
        row["outside"] = round_times[number - 1] - sum(e["seconds"] for e in pair)
        row["round"] = round_times[number - 1]
        row["t0"], row["t1"] = pair[0]["t0"], pair[-1]["t1"]
        rows.append(row)
    return rows


def request_counts(events: list[dict[str, Any]], start: float, end: float, rounds: int) -> dict[str, list[float]]:
    """Per SuperLink request kind between two times: requests per round and handler CPU ms per request."""
    seen: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event["event"] == "request" and start <= event["t"] <= end:
            seen[f"{event['api']}.{event['name']}"].append(event["cpu"])
    return {
        name: [len(cpus) / rounds, 1000 * statistics.median(cpus)]
        for name, cpus in sorted(seen.items(), key=lambda kv: -len(kv[1]))
    }


def deployed_run(kind: str, rounds: int, folder: Path, before_src: Path | None = None) -> dict[str, Any]:
    """A traced run on a TLS coordinator and four nodes set up as ``NODE_OPTIONS[kind]``.

    Returns the round times, the per-round breakdown (from round 2) and the CPU seconds by process
    kind per round.
    """
    folder.mkdir(parents=True)
    (folder / "trace").mkdir()
    (folder / "trace" / "sitecustomize.py").write_text(TRACER)
    trace = folder / "trace.jsonl"
    port = free_port()
    federation = write_federation(folder, list(SITES), port)
    with Deployment(folder) as d:
        paths = [str(folder / "trace")]
        if before_src is not None:
            paths.append(str(source_tree_path(before_src, folder)))
        d.env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [d.env.get("PYTHONPATH")])])
        d.env[TRACE_ENV] = str(trace)
        assert d.run(["provision", str(federation)]).returncode == 0
        d.start_coordinator(federation, timeout=300)
        with CpuSampler(set(d.markers)) as cpu:
            for site in SITES:
                d.start_node(
                    site,
                    "--kit",
                    str(folder / "provision" / "kits" / site),
                    "--runtime-port",
                    str(free_port()),
                    *NODE_OPTIONS[kind],
                )
            start = d.run(
                ["run", "start", str(HEART_TOML), "-f", str(federation), "--set", f"rounds={rounds}", *QUICK],
                timeout=300,
            )
            assert start.returncode == 0, start.stderr
            runs = json.loads((folder / "coordinator-state" / "runs.json").read_text())
            run_dir = Path(runs[-1]["run_dir"])
            wait_for(lambda: (run_dir / "summary.json").is_file(), 1800, f"{kind} run\n{d.tail()}", poll=1)
        times = _round_times(run_dir)
        events = read_trace(trace)
        breakdown = round_breakdown(exchange_breakdown(events), times)
        cpu_per_round: dict[str, float] = {}
        requests: dict[str, list[float]] = {}
        if breakdown:
            start, end = breakdown[0]["t0"], breakdown[-1]["t1"]
            used = cpu.between(start, end)
            cpu_per_round = {k: v / len(breakdown) for k, v in used.items()}
            requests = request_counts(events, start, end, len(breakdown))
        return {"rounds": times, "breakdown": breakdown, "cpu": cpu_per_round, "requests": requests}


def _median(rows: list[dict[str, float]], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--before-src", type=Path, default=None, help="a flowerbed source tree to run as 'before'")
    parser.add_argument("--flower-executor", action="store_true", help="also run '--executor flower' (slow)")
    parser.add_argument("--only", default=None, help="comma-separated set-ups to run (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop every process on the way out
    kinds = ["inline", *(["before"] if args.before_src else []), "flower-waits", "after"]
    kinds += ["flower-executor"] if args.flower_executor else []
    if args.only:
        kinds = [kind for kind in kinds if kind in args.only.split(",")]
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    breakdown: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds if kind != "inline"}
    cpu: dict[str, list[dict[str, float]]] = {kind: [] for kind in breakdown}
    requests: dict[str, list[dict[str, list[float]]]] = {kind: [] for kind in breakdown}
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="deployment-overhead-") as tmp:
        root = Path(tmp)
        for repeat in range(args.repeats):
            for kind in kinds:
                started = time.monotonic()
                folder = root / f"{kind}-{repeat}"
                if kind == "inline":
                    folder.mkdir()
                    rounds = inline_round_times(args.rounds, folder)
                else:
                    run = deployed_run(kind, args.rounds, folder, args.before_src if kind == "before" else None)
                    rounds = run["rounds"]
                    breakdown[kind] += run["breakdown"]
                    cpu[kind].append(run["cpu"])
                    requests[kind].append(run["requests"])
                times[kind] += rounds[1:]  # round 1 includes discovery and first imports
                print(
                    f"{kind:15s} repeat {repeat}: rounds {[f'{t:.2f}' for t in rounds]} "
                    f"({time.monotonic() - started:.0f} s wall, load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(f"\nmedian seconds per round (rounds 2..{args.rounds}, {args.repeats} repeats):")
    for kind, value in med.items():
        extra = "" if kind == "inline" or "inline" not in med else f"  overhead {value - med['inline']:.2f} s"
        print(f"  {kind:15s} {value:6.2f}{extra}")
    print("\nwhere a round's time goes (median s per round; the last reply of each exchange, train + evaluate):")
    columns = [*SEGMENTS, "outside"]
    print(f"  {'':15s} " + " ".join(f"{c:>8s}" for c in columns))
    for kind, rows in breakdown.items():
        if rows:
            print(f"  {kind:15s} " + " ".join(f"{_median(rows, c):8.2f}" for c in columns))
    print("\nCPU seconds per round by process (median over repeats):")
    for kind, runs in cpu.items():
        names = sorted({name for run in runs for name in run})
        parts = [f"{name} {statistics.median(run.get(name, 0.0) for run in runs):.2f}" for name in names]
        print(f"  {kind:15s} " + ", ".join(parts))
    print("\nSuperLink requests per round by handler (median over repeats: count, handler CPU ms per request):")
    for kind, runs in requests.items():
        names = sorted({name for run in runs for name in run}, key=lambda n: -max(r.get(n, [0])[0] for r in runs))
        for name in names:
            count = statistics.median(run.get(name, [0.0, 0.0])[0] for run in runs)
            ms = statistics.median(run[name][1] for run in runs if name in run)
            print(f"  {kind:15s} {name:40s} {count:6.1f}  {ms:6.1f} ms")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rounds": args.rounds,
                    "times": times,
                    "median": med,
                    "breakdown": breakdown,
                    "cpu": cpu,
                    "requests": requests,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
