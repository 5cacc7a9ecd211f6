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

Workload a1 (pfl-research's benchmark, run as pfl runs it):

- ``a1``: ``tabular-mlp`` 13-64-2 (``Linear(13, 64)``-ReLU-``Linear(64, 2)``) on 1,000 clients of 128
  rows from ``a1_data`` (a fixed linear rule, a per-client feature shift, 10 % of the labels
  flipped), 100 clients per round, 8 local SGD steps of batch 16 (``train.local_steps``), lr 0.1,
  20 rounds, FedAvg weighted by examples (server learning rate 1). Training only; the final
  model is scored once, after the run, on a held-out set of 50 further clients from the same
  recipe (flowerbed's central evaluator on the pooled test splits that carry it).
- ``a1-10k``: the same with 10,000 clients, all of them in every round.
- ``a1-dp``: ``a1`` with DP-SGD (noise multiplier 1.0, clipping 1.0, Poisson sampling with rate
  16/128, as ``a-mlp-dp``); CPU seconds are reported beside wall time, and the DP/plain ratio of
  CPU seconds per round.

Each a1 scenario alternates three systems: the raw floor (``a1_floor_round``: the same arithmetic
written directly in batched torch on stacked client weights, with ``torch.bmm`` and hand-written
gradients, DP included, a round's clients in groups of ``FLOOR_CHUNK``), flowerbed's ``inline``
backend and, with ``--a1-flower-rounds N``, Flower's engine for N rounds. Every trial process runs
one torch thread (``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` = 1). The table gives updates/s,
seconds and process CPU seconds per steady round, each system's seconds and CPU seconds per round
over the floor's (``x floor``, ``x floor CPU``), and the final held-out accuracy.

Run: ``python -m flowerbed.benchmarks.simulation_throughput [--quick] [--repeats 2]
[--json PATH]``; workload a1 alone: ``python -m flowerbed.benchmarks.simulation_throughput --only
a1,a1-dp,a1-10k --repeats 3``. Timings are never asserted; ratios are against Flower (or the
raw floor) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flowerbed.benchmarks.source_tree import source_tree_path
from flowerbed.experiment import DataConfig, Experiment
from flowerbed.tasks.task import DataSchema, SiteData

if TYPE_CHECKING:
    import torch

ROWS, FEATURES = 128, 13
FACTORY = "flowerbed.benchmarks.simulation_throughput:synthetic_heart"
A1_FACTORY = "flowerbed.benchmarks.simulation_throughput:a1_federation"
A1_SCENARIOS = {"a1": 1000, "a1-dp": 1000, "a1-10k": 10000}  # scenario -> clients in the federation
A1_PER_ROUND = {"a1": 100, "a1-dp": 100, "a1-10k": 10000}
A1_TEST_CLIENTS, A1_HIDDEN, A1_CLASSES = 50, 64, 2
A1_STEPS, A1_BATCH, A1_LR, A1_ROUNDS = 8, 16, 0.1, 20
A1_NOISE, A1_CLIP = 1.0, 1.0
FLOOR_CHUNK = 1000  # the floor trains a round's clients in groups of this many (their rows stay in cache)


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


# -- workload a1: data, raw floor, experiment ------------------------------------------------------


def a1_clients(n: int, seeds: list[np.random.SeedSequence], w: np.ndarray, b: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clients of a1's recipe from the seeds of (shift, features, flips).

    Returns features ``[n, 128, 13]`` (float32; the labels come from the float64 draws) and labels
    ``[n, 128]`` (int64).
    """
    s_mu, s_x, s_flip = seeds
    mu = np.random.default_rng(s_mu).normal(0, 0.3, (n, 1, FEATURES))
    x = np.random.default_rng(s_x).standard_normal((n, ROWS, FEATURES)) + mu
    y = x @ w + b > 0
    y ^= np.random.default_rng(s_flip).random(y.shape) < 0.1
    return x.astype(np.float32), y.astype(np.int64)


def a1_data(num_clients: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Workload a1's training clients and its held-out set (50 clients): ``x, y, x_test, y_test``.

    ``SeedSequence(0)`` spawns the seeds of the rule, the shifts, the features, the flips and the
    held-out set; the rule is ``w ~ N(0, 1)^13``, ``b = 0.5 N(0, 1)``; client ``i`` has the shift
    ``mu_i ~ N(0, 0.3^2)^13``, rows ``x ~ N(mu_i, 1)``, labels ``x @ w + b > 0`` with 10 % flipped.
    The held-out set follows the same recipe with the three seeds spawned from its own.
    """
    s_rule, s_mu, s_x, s_flip, s_test = np.random.SeedSequence(0).spawn(5)
    rule = np.random.default_rng(s_rule)
    w = rule.normal(size=FEATURES)
    b = 0.5 * rule.normal()
    x, y = a1_clients(num_clients, [s_mu, s_x, s_flip], w, b)
    x_test, y_test = a1_clients(A1_TEST_CLIENTS, s_test.spawn(3), w, b)
    return x, y, x_test, y_test


def a1_federation(data: DataConfig, seed: int) -> list[SiteData]:
    """``data.partition.num_clients`` clients of ``a1_data`` as sites (the recipe's seeds are fixed).

    The held-out clients ride in the test splits of the first 50 sites (one each, the others'
    are empty), so the pooled test set that central evaluation scores is exactly the held-out set.
    """
    k = data.partition.num_clients
    x, y, x_test, y_test = a1_data(k)
    schema = DataSchema("tabular", (FEATURES,), A1_CLASSES, tuple(f"f{i}" for i in range(FEATURES)))
    width = len(str(k - 1))
    none_x, none_y = x_test[0, :0], y_test[0, :0]
    return [
        SiteData(
            f"client-{i:0{width}d}",
            x[i],
            y[i],
            x_test[i] if i < A1_TEST_CLIENTS else none_x,
            y_test[i] if i < A1_TEST_CLIENTS else none_y,
            schema,
        )
        for i in range(k)
    ]


@dataclass(frozen=True)
class FloorDP:
    """DP-SGD of the raw floor: Poisson rate, noise multiplier and clipping norm (as flowerbed's)."""

    sample_rate: float = A1_BATCH / ROWS
    noise_multiplier: float = A1_NOISE
    max_grad_norm: float = A1_CLIP


A1Weights = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"]  # w1 [13, 64], b1, w2 [64, 2], b2


def a1_initial_weights(seed: int = 0) -> A1Weights:
    """The 13-64-2 MLP's weights as ``torch.nn.Linear`` initializes them (``x @ w1 + b1`` layout)."""
    import torch

    torch.manual_seed(seed)
    first, second = torch.nn.Linear(FEATURES, A1_HIDDEN), torch.nn.Linear(A1_HIDDEN, A1_CLASSES)
    return (
        first.weight.detach().T.contiguous(),
        first.bias.detach(),
        second.weight.detach().T.contiguous(),
        second.bias.detach(),
    )


def a1_floor_round(
    weights: A1Weights,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
    *,
    steps: int = A1_STEPS,
    batch: int = A1_BATCH,
    lr: float = A1_LR,
    dp: FloorDP | None = None,
) -> A1Weights:
    """One round of the raw floor: every client of ``x`` ``[K, n, 13]``, ``y`` ``[K, n]`` trains, then the mean.

    Each client takes ``steps`` SGD steps from ``weights`` on its own batches (a fresh permutation
    cut into batches of ``batch``; with ``dp``, Poisson batches, each row's gradient clipped, the
    sum noised and divided by the expected batch size) with the mean cross-entropy's gradient
    written out by hand for stacked weights (``torch.baddbmm``/``torch.bmm``). The new weights are
    the clients' average weighted by their rows.
    """
    import torch

    k, n, _ = x.shape
    w1, b1, w2, b2 = (t.expand(k, *t.shape).clone() if t.dim() == 2 else t.expand(k, 1, -1).clone() for t in weights)
    clients = torch.arange(k).unsqueeze(1)
    expected = max(1, int(n * dp.sample_rate)) if dp is not None else batch
    if dp is None:  # one epoch's order per client: each step's batch is a slice
        order = torch.rand((k, n), generator=generator).argsort(1)
        x, y = x[clients, order], y[clients, order]
    for t in range(steps):
        valid = None
        if dp is None:
            xb, yb = x[:, t * batch : (t + 1) * batch], y[:, t * batch : (t + 1) * batch]
        else:
            member = torch.rand((k, n), generator=generator) < dp.sample_rate
            width = max(1, int(member.sum(1).max()))
            position = torch.arange(n).expand(k, n)
            idx = torch.where(member, position, position + n).argsort(1)[:, :width]
            valid = member.gather(1, idx)
            xb, yb = x[clients, idx], y[clients, idx]
        h = torch.baddbmm(b1, xb, w1).clamp_(min=0)
        dz = torch.baddbmm(b2, h, w2).softmax(-1)
        dz.scatter_add_(2, yb.unsqueeze(-1), torch.full_like(dz[..., :1], -1.0))  # d(cross-entropy)/d(logits)
        dh = torch.ops.aten.threshold_backward(torch.bmm(dz, w2.transpose(1, 2)), h, 0.0)  # through the ReLU
        if valid is not None:  # each row's gradient norm from its factors: |dz|^2 (|h|^2 + 1) + |dh|^2 (|x|^2 + 1)
            norm2 = dz.square().sum(-1) * (h.square().sum(-1) + 1) + dh.square().sum(-1) * (xb.square().sum(-1) + 1)
            factor = (dp.max_grad_norm / (norm2.sqrt() + 1e-6)).clamp_(max=1.0).mul_(valid).unsqueeze(-1)
            dz, dh = dz * factor, dh * factor
        grads = [
            torch.bmm(xb.transpose(1, 2), dh),
            dh.sum(1, keepdim=True),
            torch.bmm(h.transpose(1, 2), dz),
            dz.sum(1, keepdim=True),
        ]
        for param, grad in zip((w1, b1, w2, b2), grads, strict=True):
            if dp is not None:
                grad.add_(torch.randn(grad.shape, generator=generator), alpha=dp.noise_multiplier * dp.max_grad_norm)
            param.sub_(grad, alpha=lr / expected)
    share = torch.full((k,), float(n)) / (k * n)  # every client weighs its rows
    return tuple(
        torch.einsum("k,k...->...", share, p).reshape(w.shape) for p, w in zip((w1, b1, w2, b2), weights, strict=True)
    )  # type: ignore[return-value]


def a1_accuracy(weights: A1Weights, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the 13-64-2 MLP with ``weights`` on rows ``x`` ``[m, 13]``, labels ``y`` ``[m]``."""
    w1, b1, w2, b2 = weights
    logits = (x @ w1 + b1).clamp(min=0) @ w2 + b2
    return float((logits.argmax(1) == y).float().mean())


def floor_trial(scenario: str, rounds: int) -> dict[str, Any]:
    """The raw floor on one a1 scenario for ``rounds`` rounds: timings, CPU seconds and held-out accuracy."""
    import torch

    begun = time.perf_counter()
    x_np, y_np, xt_np, yt_np = a1_data(A1_SCENARIOS[scenario])
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    x_test, y_test = torch.from_numpy(xt_np).reshape(-1, FEATURES), torch.from_numpy(yt_np).reshape(-1)
    per_round, dp = A1_PER_ROUND[scenario], FloorDP() if scenario == "a1-dp" else None
    generator = torch.Generator().manual_seed(0)
    weights = a1_initial_weights()
    started, cpu_started = time.perf_counter(), time.process_time()
    times, cpus = [], []
    with torch.no_grad():
        for _ in range(rounds):
            chosen = torch.randperm(len(x), generator=generator)[:per_round]
            groups = [
                (a1_floor_round(weights, x[part], y[part], generator, dp=dp), len(part))
                for part in chosen.split(FLOOR_CHUNK)
            ]  # every client has as many rows: the groups weigh by their clients
            weights = tuple(sum(w[j] * (n / per_round) for w, n in groups) for j in range(4))  # type: ignore[assignment]
            times.append(time.perf_counter() - started)
            cpus.append(time.process_time() - cpu_started)
        accuracy = a1_accuracy(weights, x_test, y_test)
    return {**_steady(times, cpus, per_round), "wall_s": time.perf_counter() - begun, "accuracy": accuracy}


def _steady(times: list[float], cpus: list[float] | None, per_round: int) -> dict[str, Any]:
    """Updates/s, s/round (and CPU s/round) from the end of round 1 to the end of the last round."""
    span = (times[-1] - times[0]) if len(times) > 1 else times[0]
    timed = len(times) - 1 if len(times) > 1 else 1
    out: dict[str, Any] = {"round_s": span / timed, "updates_per_s": per_round * timed / span, "rounds": len(times)}
    if cpus and len(cpus) == len(times) > 1:
        out["round_cpu_s"] = (cpus[-1] - cpus[0]) / timed
    return out


def a1_experiment(scenario: str, backend: str, rounds: int, output: str) -> dict[str, Any]:
    """The experiment (as a dict) of an a1 scenario on one backend."""
    exp: dict[str, Any] = {
        "name": scenario,
        "seed": 0,
        "rounds": rounds,
        "output": output,
        "task": {"name": "tabular-mlp", "args": {"hidden": A1_HIDDEN}},
        "data": {
            "dataset": A1_FACTORY,
            "num_classes": A1_CLASSES,
            "partition": {"kind": "natural", "num_clients": A1_SCENARIOS[scenario]},
        },
        "train": {
            "local_steps": A1_STEPS,
            "batch_size": A1_BATCH,
            "lr": A1_LR,
            "optimizer": "sgd",
            "momentum": 0.0,
            "clients_per_round": A1_PER_ROUND[scenario],
            "weighting": "train-rows",
        },
        "strategy": {"name": "FedAvg"},
        "evaluate": {"federated": False, "central": False, "local_baselines": False, "plots": False},
        "backend": {"name": backend},
    }
    if scenario == "a1-dp":
        exp["privacy"] = {"enabled": True, "noise_multiplier": A1_NOISE, "max_grad_norm": A1_CLIP}
    return exp


def experiment(scenario: str, backend: str, rounds: int, output: str) -> dict[str, Any]:
    """The experiment (as a dict) of one scenario on one backend."""
    if scenario in A1_SCENARIOS:
        return a1_experiment(scenario, backend, rounds, output)
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
    """Run one simulation (or the raw floor) and return its timings (called in the trial's own process).

    The process CPU seconds at each round's end come from the quiet reporter's round hook; they
    count this process and its running children (the checkpoint writer's), so they are reported
    for the in-process systems (inline, floor).
    """
    import torch

    from flowerbed.experiment import parse_experiment
    from flowerbed.server.federation import SilentReporter
    from flowerbed.server.run_folder import read_timings
    from flowerbed.simulations.simulate import simulate

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec.get("floor"):
        return floor_trial(spec["scenario"], spec["floor"]["rounds"])
    cpus: list[float] = []

    def round_finished(self: SilentReporter, record: dict[str, Any], total_rounds: int, elapsed: float) -> None:
        children = _children_cpu_s() if record["round"] in (1, total_rounds) else 0.0  # only the ends are used
        cpus.append(time.process_time() + children)

    SilentReporter.round_finished = round_finished  # type: ignore[method-assign]
    exp = parse_experiment(spec["experiment"], spec["scenario"])
    started = time.perf_counter()
    run_dir = simulate(exp, quiet=True)
    wall = time.perf_counter() - started
    times = [t["time"] for t in read_timings(run_dir)]
    in_process = exp.backend.name == "inline" and exp.backend.workers == 1
    result = {"wall_s": wall, **_steady(times, cpus if in_process else None, exp.train.clients_per_round)}
    if spec["scenario"] in A1_SCENARIOS:
        result["accuracy"] = held_out_accuracy(exp, run_dir)
    return result


def _children_cpu_s() -> float:
    """CPU seconds used so far by this process's running descendants (``/proc``; 0 where there is none)."""
    from flowerbed.process_control import descendants

    total = 0
    for pid in descendants(os.getpid()):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it has just exited
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def held_out_accuracy(exp: Experiment, run_dir: Path) -> float:
    """The final model's accuracy from flowerbed's central evaluator, run once after the rounds."""
    from flowerbed.simulations.research.central import make_central_evaluator
    from flowerbed.tasks.data.catalog import load_federation
    from flowerbed.weights import load_safetensors

    evaluate = make_central_evaluator(exp, load_federation(exp.data, exp.seed))
    return float(evaluate(load_safetensors(run_dir / "model.safetensors"))["accuracy"])


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
        if spec.get("pythonpath"):  # the "before" system: another flowerbed source tree
            env["PYTHONPATH"] = spec["pythonpath"]
        if spec["threads"]:
            env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
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
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = json.loads(out.read_text())
        result["peak_mib"] = peak[0] / 1024
        result["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return result


# -- the comparison --------------------------------------------------------------------------------


def scenarios(
    quick: bool, flower_max: int, a1_flower: bool = False, before: bool = False
) -> list[tuple[str, list[str]]]:
    """(scenario, systems) in the order they run.

    ``floor`` is a1's raw batched-torch floor; ``before`` the inline backend of the source tree
    given as ``--before-src``.
    """
    scale = [100, 1000] if quick else [100, 1000, 10000]
    inline = ["inline", "before"] if before else ["inline"]
    out = [(name, [*inline, "flower"]) for name in ("a-mlp", "a-mlp-dp", "b-cnn")]
    for k in scale:
        out.append((f"c-scale-{k}", [*inline, "flower"] if k <= flower_max else inline))
    for name in A1_SCENARIOS:
        flower = a1_flower and A1_PER_ROUND[name] <= flower_max
        out.append((name, ["floor", *inline, *(["flower"] if flower else [])]))
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
    parser.add_argument("--a1-rounds", type=int, default=A1_ROUNDS, help="rounds of the a1 scenarios")
    parser.add_argument(
        "--a1-flower-rounds", type=int, default=0, help="also run a1 on Flower's engine for this many rounds (0: not)"
    )
    parser.add_argument("--only", default="", help="comma-separated scenario names to run")
    parser.add_argument(
        "--before-src",
        type=Path,
        default=None,
        help="a flowerbed source tree (e.g. git archive REV | tar -x -C DIR) whose inline backend also runs, "
        "as 'before'",
    )
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
    a1_rounds = 2 if args.quick else args.a1_rounds
    a1_flower_rounds = min(args.a1_flower_rounds, a1_rounds)
    chosen = {s for s in args.only.split(",") if s}
    figures: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {
            "repeats": repeats,
            "rounds": rounds,
            "a1_rounds": a1_rounds,
            "a1_flower_rounds": a1_flower_rounds,
            "inline_threads": args.threads,
        },
        "scenarios": {},
    }
    out_root = tempfile.mkdtemp(prefix="flowerbed-bench-")
    before_path = str(source_tree_path(args.before_src, Path(out_root))) if args.before_src else None
    for scenario, backends in scenarios(args.quick, args.flower_max, a1_flower_rounds > 0, before_path is not None):
        if chosen and scenario not in chosen:
            continue
        a1 = scenario in A1_SCENARIOS
        trials: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
        for rep in range(repeats):
            for backend in backends:
                spec: dict[str, Any] = {"scenario": scenario, "threads": args.threads if backend != "flower" else 0}
                if backend == "floor":
                    spec["floor"] = {"rounds": a1_rounds}
                else:
                    n = (a1_flower_rounds if backend == "flower" else a1_rounds) if a1 else rounds
                    spec["experiment"] = experiment(scenario, "inline" if backend == "before" else backend, n, out_root)
                if backend == "before":
                    spec["pythonpath"] = before_path
                result = spawn_trial(spec, args.timeout)
                trials[backend].append(result)
                shown = result.get("error") or (
                    f"{result['updates_per_s']:9.1f} updates/s  round {result['round_s']:.3f} s  "
                    + (f"cpu/round {result['round_cpu_s']:.3f} s  " if "round_cpu_s" in result else "")
                    + f"wall {result['wall_s']:.1f} s  peak {result['peak_mib']:.0f} MiB"
                    + (f"  accuracy {result['accuracy']:.4f}" if "accuracy" in result else "")
                )
                print(f"{scenario:14s} {backend:7s} #{rep + 1}: {shown}", flush=True)
        summary: dict[str, Any] = {"trials": trials}
        keys = ("updates_per_s", "round_s", "round_cpu_s", "wall_s", "cpu_s", "peak_mib", "accuracy")
        for backend, rows in trials.items():
            summary[backend] = {key: _median(rows, key) for key in keys}
        inline, flower = summary.get("inline", {}), summary.get("flower", {})
        if inline.get("updates_per_s") and flower.get("updates_per_s"):
            summary["speedup"] = inline["updates_per_s"] / flower["updates_per_s"]
        before = summary.get("before", {})
        if before.get("updates_per_s") and flower.get("updates_per_s"):
            summary["before_speedup"] = before["updates_per_s"] / flower["updates_per_s"]
        floor = summary.get("floor", {})
        for key, ratio in (("round_s", "vs_floor"), ("round_cpu_s", "vs_floor_cpu")):  # over the floor's
            for backend in backends:
                if floor.get(key) and summary[backend].get(key):
                    summary[backend][ratio] = summary[backend][key] / floor[key]
        figures["scenarios"][scenario] = summary
    plain, private = figures["scenarios"].get("a1", {}), figures["scenarios"].get("a1-dp", {})
    figures["a1_dp_cpu_ratio"] = {
        system: private[system]["round_cpu_s"] / plain[system]["round_cpu_s"]
        for system in ("floor", "inline", "before")
        if (plain.get(system) or {}).get("round_cpu_s") and (private.get(system) or {}).get("round_cpu_s")
    }
    _print_table(figures)
    _print_a1_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


def _print_table(figures: dict[str, Any]) -> None:
    def fmt(value: float | None, spec: str, suffix: str = "") -> str:
        width = int(spec.split(".")[0]) + len(suffix)
        return (format(value, spec) + suffix) if value is not None else "-".rjust(width)

    rows = {name: s for name, s in figures["scenarios"].items() if name not in A1_SCENARIOS}
    if not rows:
        return
    before = any("before" in s for s in rows.values())
    heads = ("inline upd/s", "flower upd/s", "speedup", "inline MiB", "flower MiB")
    heads += ("before upd/s", "before speedup") if before else ()
    widths = (13, 13, 8, 11, 11, 13, 15)
    print("\n" + f"{'scenario':14s} " + " ".join(h.rjust(w) for h, w in zip(heads, widths, strict=False)))
    for name, s in rows.items():
        i, f, b = s.get("inline", {}), s.get("flower", {}), s.get("before", {})
        then = f" {fmt(b.get('updates_per_s'), '13.1f')} {fmt(s.get('before_speedup'), '14.1f', 'x')}"
        print(
            f"{name:14s} {fmt(i.get('updates_per_s'), '13.1f')} {fmt(f.get('updates_per_s'), '13.1f')} "
            f"{fmt(s.get('speedup'), '7.1f', 'x')} {fmt(i.get('peak_mib'), '11.0f')} {fmt(f.get('peak_mib'), '11.0f')}"
            + (then if before else "")
        )


def _print_a1_table(figures: dict[str, Any]) -> None:
    """Workload a1 side by side: each system's medians and its (CPU) time per round against the raw floor's."""
    names = {
        "floor": "raw torch floor",
        "inline": "flowerbed inline",
        "before": "before (inline)",
        "flower": "Flower engine",
    }
    rows = [(name, s) for name, s in figures["scenarios"].items() if name in A1_SCENARIOS]
    if not rows:
        return

    def fmt(value: float | None, spec: str) -> str:
        return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))

    heads = ("updates/s", "s/round", "CPU s/round", "x floor", "x floor CPU", "wall s", "peak MiB", "accuracy")
    widths = (10, 9, 12, 8, 12, 8, 9, 9)
    print("\n" + f"{'scenario':9s} {'system':17s}" + " ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True)))
    for name, s in rows:
        for system in (b for b in ("floor", "inline", "before", "flower") if b in s):
            m = s[system]
            print(
                f"{name:9s} {names[system]:17s}{fmt(m.get('updates_per_s'), '10.0f')} {fmt(m.get('round_s'), '9.4f')} "
                f"{fmt(m.get('round_cpu_s'), '12.4f')} {fmt(m.get('vs_floor'), '8.2f')} "
                f"{fmt(m.get('vs_floor_cpu'), '12.2f')} {fmt(m.get('wall_s'), '8.1f')} "
                f"{fmt(m.get('peak_mib'), '9.0f')} {fmt(m.get('accuracy'), '9.4f')}"
            )
    for system, ratio in figures.get("a1_dp_cpu_ratio", {}).items():
        print(f"a1-dp / a1, CPU s per round, {names[system]}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
