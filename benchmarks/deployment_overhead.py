"""Per-round overhead of the deployment path on the four-hospital heart-disease federation.

A real coordinator (TLS, node authentication) and four nodes on 127.0.0.1 run the bundled heart
experiment; the same experiment also runs in one process (the ``inline`` simulation backend, no
messages at all) as the baseline. Node set-ups compared, interleaved A B C A B C:

- ``poll-0.25``: flowerbed's warm executor (a pre-imported child forked per message) and the
  SuperNode's idle poll capped at 0.25 s (``--poll-interval 0.25``);
- ``flowerbed``: ``flowerbed node start`` as shipped: the warm executor, Flower's 3 s idle poll;
- ``flower``: Flower 1.42's defaults (``--executor flower``): a new ``flwr-clientapp`` process per
  message, 3 s idle poll.

The round time is the ServerApp's own clock (``timings.jsonl``: seconds since the run started,
after each round's train, evaluate and checkpoint), differenced per round. Nothing is asserted;
medians and ratios are printed::

    python -m flowerbed.benchmarks.deployment_overhead --rounds 5 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowerbed.benchmarks.deployment_harness import (
    HEART_TOML,
    SITES,
    Deployment,
    free_port,
    wait_for,
    write_federation,
)
from flowerbed.server.run_folder import read_timings

QUICK = ["--set", "evaluate.local_baselines=false", "--set", "evaluate.central=false"]


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


NODE_OPTIONS = {
    "poll-0.25": ["--poll-interval", "0.25"],
    "flowerbed": [],
    "flower": ["--executor", "flower"],
}


def deployed_round_times(kind: str, rounds: int, folder: Path) -> list[float]:
    """Round times with a TLS coordinator and four nodes set up as ``NODE_OPTIONS[kind]``."""
    folder.mkdir(parents=True)
    port = free_port()
    federation = write_federation(folder, list(SITES), port)
    with Deployment(folder) as d:
        assert d.run(["provision", str(federation)]).returncode == 0
        d.start_coordinator(federation, timeout=300)
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
            ["run", "start", str(HEART_TOML), "-f", str(federation), "--set", f"rounds={rounds}", *QUICK], timeout=300
        )
        assert start.returncode == 0, start.stderr
        runs = json.loads((folder / "coordinator-state" / "runs.json").read_text())
        run_dir = Path(runs[-1]["run_dir"])
        wait_for(lambda: (run_dir / "summary.json").is_file(), 1800, f"{kind} run\n{d.tail()}", poll=1)
        return _round_times(run_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop every process on the way out
    times: dict[str, list[float]] = {"inline": [], **{kind: [] for kind in NODE_OPTIONS}}
    with tempfile.TemporaryDirectory(prefix="deployment-overhead-") as tmp:
        root = Path(tmp)
        for repeat in range(args.repeats):
            for kind in times:
                started = time.monotonic()
                folder = root / f"{kind}-{repeat}"
                if kind == "inline":
                    folder.mkdir()
                    rounds = inline_round_times(args.rounds, folder)
                else:
                    rounds = deployed_round_times(kind, args.rounds, folder)
                times[kind] += rounds[1:]  # round 1 includes discovery and first imports
                print(
                    f"{kind:7s} repeat {repeat}: rounds {[f'{t:.2f}' for t in rounds]} "
                    f"({time.monotonic() - started:.0f} s wall)",
                    flush=True,
                )
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(f"\nmedian seconds per round (rounds 2..{args.rounds}, {args.repeats} repeats):")
    for kind, value in med.items():
        extra = (
            "" if kind == "inline" else f"  overhead {value - med['inline']:.2f} s, {value / med['inline']:.1f}x inline"
        )
        print(f"  {kind:7s} {value:6.2f}{extra}")
    if "flowerbed" in med and "flower" in med:
        print(f"  flower / flowerbed: {med['flower'] / med['flowerbed']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "times": times, "median": med}, indent=2))


if __name__ == "__main__":
    main()
