"""Simulation throughput: client updates per second and peak memory, ``inline`` against Flower's engine.

Scenarios (training only: federated and central evaluation are off, so the figures are updates):

- ``a-mlp``: ``tabular-mlp`` 13-64-2 on synthetic tabular clients shaped like the heart-disease
  set (13 features, 2 classes, 128 training rows each), 1000 clients, 100 per round, one local
  epoch, batch 32; ``a-mlp-dp`` is the same with DP-SGD (noise multiplier 1.0, clipping 1.0,
  Poisson sampling, every node's ledger charged each round).
- ``b-cnn``: ``image-cnn`` on scikit-learn's digits cut IID into 100 clients, 20 per round,
  one local epoch, batch 16.
- ``c-scale-K``: ``a-mlp`` with K = 100, 1000, 10000 clients per round (the federation has
  ``max(1000, K)`` clients); Flower's engine only up to ``--flower-max`` clients per round.

Every trial is one ``flowerbed.simulations.simulate.simulate`` call in a fresh process; trials
alternate inline, Flower, inline, Flower, ... and the medians are reported. Updates per second
are measured between the end of round 1 and the end of the last round (start-up, Ray included,
and the first round's warm-up are left out; the whole call's wall time is reported too). Peak
memory is the largest sum of proportional set sizes (PSS) over the trial's process tree (Ray's
workers included), sampled every 0.1 s.

Run: ``python -m flowerbed.benchmarks.simulation_throughput [--quick] [--repeats 2]
[--json PATH]``. Timings are never asserted; ratios are against Flower measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from flowerbed.experiment import DataConfig
from flowerbed.tasks.task import DataSchema, SiteData

ROWS, FEATURES = 128, 13
FACTORY = "flowerbed.benchmarks.simulation_throughput:synthetic_heart"


def synthetic_heart(data: DataConfig, seed: int) -> list[SiteData]:
    """``data.partition.num_clients`` tabular clients shaped like heart disease (128 train rows each)."""
    k = data.partition.num_clients
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(k, ROWS + 32, FEATURES)).astype(np.float32)
    w = rng.normal(size=FEATURES)
    shift = rng.normal(scale=0.5, size=(k, 1))
    y = ((x @ w) / np.sqrt(FEATURES) + shift + rng.normal(scale=0.5, size=(k, ROWS + 32)) > 0).astype(np.int64)
    schema = DataSchema("tabular", (FEATURES,), 2, tuple(f"f{i}" for i in range(FEATURES)))
    width = len(str(k - 1))
    return [
        SiteData(f"client-{i:0{width}d}", x[i, :ROWS], y[i, :ROWS], x[i, ROWS:], y[i, ROWS:], schema) for i in range(k)
    ]


def experiment(scenario: str, backend: str, rounds: int, output: str) -> dict[str, Any]:
    """The experiment (as a dict) of one scenario on one backend."""
    exp: dict[str, Any] = {
        "name": scenario,
        "seed": 0,
        "rounds": rounds,
        "output": output,
        "task": {"name": "tabular-mlp", "args": {"hidden": 64}},
        "data": {"dataset": FACTORY, "partition": {"kind": "natural", "num_clients": 1000}},
        "train": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "clients_per_round": 100},
        "evaluate": {"federated": False, "central": False, "local_baselines": False, "plots": False},
        "backend": {"name": backend},
    }
    if scenario == "a-mlp-dp":
        exp["privacy"] = {"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}
    elif scenario == "b-cnn":
        exp["task"] = {"name": "image-cnn", "args": {}}
        exp["data"] = {"dataset": "digits", "num_classes": 10, "partition": {"kind": "iid", "num_clients": 100}}
        exp["train"] = {"local_epochs": 1, "batch_size": 16, "lr": 0.05, "clients_per_round": 20}
    elif scenario.startswith("c-scale-"):
        per_round = int(scenario.rsplit("-", 1)[1])
        exp["data"]["partition"]["num_clients"] = max(1000, per_round)
        exp["train"]["clients_per_round"] = per_round
    return exp


# -- one trial, in its own process --------------------------------------------------------------


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one simulation and return its timings (called in the trial's own process)."""
    import torch

    from flowerbed.experiment import parse_experiment
    from flowerbed.server.run_folder import read_timings
    from flowerbed.simulations.simulate import simulate

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    exp = parse_experiment(spec["experiment"], spec["scenario"])
    started = time.perf_counter()
    run_dir = simulate(exp, quiet=True)
    wall = time.perf_counter() - started
    times = [t["time"] for t in read_timings(run_dir)]
    per_round = exp.train.clients_per_round
    steady = (times[-1] - times[0]) if len(times) > 1 else times[0]
    rounds_timed = len(times) - 1 if len(times) > 1 else 1
    return {
        "wall_s": wall,
        "round_s": steady / rounds_timed,
        "updates_per_s": per_round * rounds_timed / steady,
        "rounds": len(times),
    }


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def spawn_trial(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run ``run_trial`` in a fresh process; add the peak PSS of its process tree."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, FLOWERBED_SIM_NODE_DIR=str(Path(tmp) / "nodes"))
        cmd = [
            sys.executable,
            "-m",
            "flowerbed.benchmarks.simulation_throughput",
            "--trial",
            json.dumps(spec),
            "--trial-out",
            str(out),
        ]
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], sum(_pss_kb(p) for p in _tree(proc.pid)))
                done.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            return {"error": f"timed out after {timeout:.0f} s"}
        finally:
            done.set()
            sampler.join()
        if proc.returncode != 0 or not out.is_file():
            return {"error": (err or "")[-600:]}
        result = json.loads(out.read_text())
        result["peak_mib"] = peak[0] / 1024
        return result


# -- the comparison --------------------------------------------------------------------------------


def scenarios(quick: bool, flower_max: int) -> list[tuple[str, list[str]]]:
    """(scenario, backends) in the order they run."""
    scale = [100, 1000] if quick else [100, 1000, 10000]
    out = [("a-mlp", ["inline", "flower"]), ("a-mlp-dp", ["inline", "flower"]), ("b-cnn", ["inline", "flower"])]
    for k in scale:
        out.append((f"c-scale-{k}", ["inline", "flower"] if k <= flower_max else ["inline"]))
    return out


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every scenario, print a table and return (and optionally write) the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, one repeat, smaller scaling")
    parser.add_argument("--repeats", type=int, default=2, help="trials per backend and scenario (A B A B ...)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per trial (round 1 is warm-up)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of the inline process "
        "(Ray gives each of Flower's workers 1; 0 keeps torch's default)",
    )
    parser.add_argument("--flower-max", type=int, default=1000, help="largest clients per round run on Flower")
    parser.add_argument("--only", default="", help="comma-separated scenario names to run")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a trial is abandoned")
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    parser.add_argument("--trial", help=argparse.SUPPRESS)
    parser.add_argument("--trial-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trial:
        Path(args.trial_out).write_text(json.dumps(run_trial(json.loads(args.trial))))
        return {}
    repeats = 1 if args.quick else args.repeats
    rounds = 2 if args.quick else args.rounds
    chosen = {s for s in args.only.split(",") if s}
    figures: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {"repeats": repeats, "rounds": rounds, "inline_threads": args.threads},
        "scenarios": {},
    }
    out_root = tempfile.mkdtemp(prefix="flowerbed-bench-")
    for scenario, backends in scenarios(args.quick, args.flower_max):
        if chosen and scenario not in chosen:
            continue
        trials: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
        for rep in range(repeats):
            for backend in backends:
                spec = {
                    "scenario": scenario,
                    "experiment": experiment(scenario, backend, rounds, out_root),
                    "threads": args.threads if backend == "inline" else 0,
                }
                result = spawn_trial(spec, args.timeout)
                trials[backend].append(result)
                shown = result.get("error") or (
                    f"{result['updates_per_s']:9.1f} updates/s  round {result['round_s']:.3f} s  "
                    f"wall {result['wall_s']:.1f} s  peak {result['peak_mib']:.0f} MiB"
                )
                print(f"{scenario:14s} {backend:7s} #{rep + 1}: {shown}", flush=True)
        summary: dict[str, Any] = {"trials": trials}
        for backend, rows in trials.items():
            summary[backend] = {
                "updates_per_s": _median(rows, "updates_per_s"),
                "round_s": _median(rows, "round_s"),
                "wall_s": _median(rows, "wall_s"),
                "peak_mib": _median(rows, "peak_mib"),
            }
        inline, flower = summary.get("inline", {}), summary.get("flower", {})
        if inline.get("updates_per_s") and flower.get("updates_per_s"):
            summary["speedup"] = inline["updates_per_s"] / flower["updates_per_s"]
        figures["scenarios"][scenario] = summary
    _print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


def _print_table(figures: dict[str, Any]) -> None:
    def fmt(value: float | None, spec: str, suffix: str = "") -> str:
        width = int(spec.split(".")[0]) + len(suffix)
        return (format(value, spec) + suffix) if value is not None else "-".rjust(width)

    heads = ("inline upd/s", "flower upd/s", "speedup", "inline MiB", "flower MiB")
    widths = (13, 13, 8, 11, 11)
    print("\n" + f"{'scenario':14s} " + " ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True)))
    for name, s in figures["scenarios"].items():
        i, f = s.get("inline", {}), s.get("flower", {})
        print(
            f"{name:14s} {fmt(i.get('updates_per_s'), '13.1f')} {fmt(f.get('updates_per_s'), '13.1f')} "
            f"{fmt(s.get('speedup'), '7.1f', 'x')} {fmt(i.get('peak_mib'), '11.0f')} {fmt(f.get('peak_mib'), '11.0f')}"
        )


if __name__ == "__main__":
    main()
