"""What secure aggregation costs: one round with and without it, and against Flower's SecAgg+.

For each number of nodes n and model size m, every repetition:

1. trains every node locally (``--local-batches`` SGD batches of 64 on an MLP with about m
   parameters) from the same global model; the update is new weights - global weights;
2. then, interleaved in the order A B C, finishes the round
   A. in the clear, as flowerbed's plain train phase does: every node serializes its new weights
      into a Flower reply; the coordinator checks every reply (``validate_train_reply``), runs
      FedAvg's ``aggregate_train`` over them and casts the result to the model's dtypes;
   B. with flowerbed's secure aggregation: ``run_secure_sum`` (every node's and the coordinator's
      work, in this process, one node after the other), each masked vector serialized by its node
      into a Flower ``Array`` and parsed by the coordinator, then the one equivalent reply through
      FedAvg and the cast, as the secure train phase does. Every node has an identity (a node key
      and a certificate from one federation CA) and checks the roster and the survivor set's
      signatures. Checks are remembered per process, as in a simulation: the first node checks
      every entry, as a deployed node does, and is the slowest node; the others reuse its results;
   C. with Flower 1.42's SecAgg+ at equivalent parameters: the node side is the stage functions of
      ``flwr.client.mod.secure_aggregation.secaggplus_mod`` called directly; the coordinator side
      is the computation of ``SecAggPlusWorkflow`` (routing, summing, Shamir recombination, mask
      regeneration, dequantization) replayed from its source. Flower's workflow runs only under
      its legacy API and a Grid, so it is not run end to end here.

Every node and the coordinator get ``--threads`` cores (default: this machine's): torch trains
with that many threads and secure aggregation masks with that many. Round times (medians over
repetitions) are given two ways:

- ``sequential``: the whole round on one machine, nodes one after the other (what a simulation
  pays), in CPU seconds: all training + every node's and the coordinator's part of A or B.
- ``parallel``: the critical path of a deployment where nodes work at the same time, in wall
  seconds: the median node's training + the slowest node's part + the coordinator's part.
  Network time is not included (a secure round has three more message exchanges).

Usage::

    python -m flowerbed.benchmarks.secagg_overhead               # n = 10, 50, 100; m = 10k, 1M
    python -m flowerbed.benchmarks.secagg_overhead --quick        # a smoke run in seconds
    python -m flowerbed.benchmarks.secagg_overhead --json out.json

Timings are never asserted; ratios compare figures measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from flowerbed.flower_internals import enter_task_identity
from flowerbed.privacy.secagg.chunks import set_default_workers
from flowerbed.privacy.secagg.identity import forget_checks
from flowerbed.privacy.secagg.params import derive_params
from flowerbed.privacy.secagg.protocol import RoundTimings, run_secure_sum, throwaway_identities
from flowerbed.server.reply_validation import validate_train_reply
from flowerbed.server.secure_train_phase import equivalent_reply
from flowerbed.weights import array_view, arrays_to_numpy, numpy_to_arrays

BATCH = 64
IN_FEATURES = 100
CLASSES = 10


# ------------------------------------------------------------------ local training (baseline)
def make_model(params: int) -> torch.nn.Module:
    """An MLP 100 -> h -> 10 with about ``params`` parameters (111 h + 10)."""
    hidden = max(1, round((params - CLASSES) / (IN_FEATURES + 1 + CLASSES)))
    return torch.nn.Sequential(torch.nn.Linear(IN_FEATURES, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, CLASSES))


def flat(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def train_node(model: torch.nn.Module, global_flat: np.ndarray, node: int, batches: int):
    """Local SGD from the global weights; returns (update, examples, cpu seconds, wall seconds)."""
    start, wall = time.process_time(), time.perf_counter()
    # a copy: vector_to_parameters makes the parameters views of the vector it is given
    torch.nn.utils.vector_to_parameters(torch.from_numpy(global_flat.copy()), model.parameters())
    gen = torch.Generator().manual_seed(node)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(batches):
        x = torch.randn(BATCH, IN_FEATURES, generator=gen)
        y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    update = (flat(model) - global_flat).astype(np.float32)
    return update, float(batches * BATCH), time.process_time() - start, time.perf_counter() - wall


def plain_sum(updates: dict[int, np.ndarray], weights: dict[int, float]) -> np.ndarray:
    total = np.zeros(next(iter(updates.values())).size, dtype=np.float64)
    for node, update in updates.items():
        total += weights[node] * update
    return total


# ------------------------------------------------------------------ flowerbed's two train phases
def _timed(fn, *args):
    """``(fn(*args), process CPU seconds, wall seconds)``."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn(*args)
    return out, time.process_time() - cpu, time.perf_counter() - wall


def _unflatten(shapes: dict[str, tuple[int, ...]], vector: np.ndarray) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        out[name] = vector[offset : offset + size].reshape(shape)
        offset += size
    return out


def plain_reply(shapes: dict[str, tuple[int, ...]], global_flat: np.ndarray, update: np.ndarray, weight: float):
    """What a node sends in a plain round: its new weights (serialized) and its number of examples."""
    state = {k: torch.from_numpy(v) for k, v in _unflatten(shapes, global_flat + update).items()}
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": weight})})
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)


def plain_coordinator(replies: list, reference: dict[str, np.ndarray], server_round: int) -> None:
    """The coordinator's part of a plain round: check every reply against the global model, FedAvg, cast."""
    for reply in replies:
        problem = validate_train_reply(reply, reference)
        if problem:
            raise RuntimeError(problem)
    arrays, _ = FedAvg().aggregate_train(server_round, replies)
    numpy_to_arrays({k: v.astype(np.float32, copy=False) for k, v in arrays_to_numpy(arrays).items()})


def secure_coordinator_finish(result, shapes: dict[str, tuple[int, ...]], global_flat: np.ndarray, server_round: int):
    """The coordinator's last step in a secure round: one equivalent reply through FedAvg, cast."""
    reply = equivalent_reply(_unflatten(shapes, global_flat), result, [])
    arrays, _ = FedAvg().aggregate_train(server_round, [reply])
    numpy_to_arrays({k: v.astype(np.float32, copy=False) for k, v in arrays_to_numpy(arrays).items()})


class _ArrayTransport:
    """Sends every masked vector through a Flower ``Array``: the node serializes, the coordinator parses."""

    def __init__(self) -> None:
        self.node_cpu: dict[int, float] = defaultdict(float)
        self.node_wall: dict[int, float] = defaultdict(float)
        self.server_cpu = self.server_wall = self.wall = 0.0

    def __call__(self, stage: str, replies: dict[int, dict[str, Any]]) -> None:
        if stage != "masked_input":
            return
        for node, reply in replies.items():
            array, cpu, node_wall = _timed(Array, reply["masked"])
            self.node_cpu[node] += cpu
            self.node_wall[node] += node_wall
            parsed, cpu, server_wall = _timed(array_view, array)  # as the secure train phase reads it
            self.server_cpu += cpu
            self.server_wall += server_wall
            self.wall += node_wall + server_wall
            reply["masked"] = parsed


# ------------------------------------------------------------------ Flower 1.42 SecAgg+
def flower_secaggplus(
    updates: dict[int, np.ndarray],
    weights: dict[int, float],
    *,
    num_shares: int,
    threshold: int,
    clipping_range: float,
    quantization_range: int,
    modulus_range: int,
    max_weight: float,
) -> tuple[np.ndarray, dict[int, float], float]:
    """One SecAgg+ round with Flower's own code; returns (weighted sum, node CPU, server CPU).

    CPU is process time: Flower's Shamir code runs in worker threads, which thread time would miss.
    """
    from flwr.app import ConfigRecord

    # the package re-exports the function under the module's name: import the module itself
    mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_extract,
        get_parameters_shape,
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    node_cpu: dict[int, float] = dict.fromkeys(updates, 0.0)
    server_cpu = 0.0

    def on_node(node: int, fn, *args):
        start = time.process_time()
        out = fn(*args)
        node_cpu[node] += time.process_time() - start
        return out

    ids = sorted(updates)
    n = len(ids)
    # server: setup (ring of neighbours, itself included, as in SecAggPlusWorkflow.setup_stage)
    t0 = time.process_time()
    order = list(ids)
    random.Random(0).shuffle(order)
    half = num_shares >> 1
    nbrs = {nid: {order[(i + o) % n] for o in range(-half, half + 1)} for i, nid in enumerate(order)}
    setup = {
        Key.SAMPLE_NUMBER: n,
        Key.SHARE_NUMBER: num_shares,
        Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: clipping_range,
        Key.TARGET_RANGE: quantization_range,
        Key.MOD_RANGE: modulus_range,
        Key.MAX_WEIGHT: max_weight,
    }
    server_cpu += time.process_time() - t0
    states = {}
    pks = {}
    for nid in ids:
        state = mod.SecAggPlusState()
        state.nid = nid
        states[nid] = state
        res = on_node(nid, mod._setup, state, ConfigRecord(dict(setup)))
        pks[nid] = [res[Key.PUBLIC_KEY_1], res[Key.PUBLIC_KEY_2]]
    # share keys
    fwd: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in ids}
    for nid in ids:
        cfg = ConfigRecord({str(j): pks[j] for j in nbrs[nid]})
        res = on_node(nid, mod._share_keys, states[nid], cfg)
        t0 = time.process_time()
        for dst, ct in zip(res[Key.DESTINATION_LIST], res[Key.CIPHERTEXT_LIST], strict=True):
            fwd[dst][0].append(nid)
            fwd[dst][1].append(ct)
        server_cpu += time.process_time() - t0
    # collect masked vectors
    masked_vector = None
    for nid in ids:
        cfg = ConfigRecord({Key.SOURCE_LIST: fwd[nid][0], Key.CIPHERTEXT_LIST: fwd[nid][1]})
        params = ndarrays_to_parameters([updates[nid]])
        res = on_node(nid, mod._collect_masked_vectors, states[nid], cfg, int(weights[nid]), params)
        t0 = time.process_time()
        vec = [bytes_to_ndarray(b) for b in res[Key.MASKED_PARAMETERS]]
        masked_vector = vec if masked_vector is None else parameters_addition(masked_vector, vec)
        server_cpu += time.process_time() - t0
    t0 = time.process_time()
    masked_vector = parameters_mod(masked_vector, modulus_range)
    server_cpu += time.process_time() - t0
    # unmask (nobody dropped)
    shares: dict[int, list[bytes]] = {nid: [] for nid in ids}
    for nid in ids:
        cfg = ConfigRecord({Key.ACTIVE_NODE_ID_LIST: sorted(nbrs[nid]), Key.DEAD_NODE_ID_LIST: []})
        res = on_node(nid, mod._unmask, states[nid], cfg)
        t0 = time.process_time()
        for owner, share in zip(res[Key.NODE_ID_LIST], res[Key.SHARE_LIST], strict=True):
            shares[owner].append(share)
        server_cpu += time.process_time() - t0
    t0 = time.process_time()
    shapes = get_parameters_shape(masked_vector)
    for nid in ids:
        secret = combine_shares(shares[nid])
        masked_vector = parameters_subtraction(masked_vector, pseudo_rand_gen(secret, modulus_range, shapes))
    recon = parameters_mod(masked_vector, modulus_range)
    q_total_ratio, recon = factor_extract(recon)
    inv = quantization_range / q_total_ratio
    agg = dequantize(recon, clipping_range, quantization_range)
    agg[0] = (agg[0] - (n - 1) * clipping_range) * inv
    server_cpu += time.process_time() - t0
    _ = (generate_shared_key, bytes_to_private_key, bytes_to_public_key)  # used on dropouts only
    return agg[0] * sum(weights.values()), node_cpu, server_cpu


# ------------------------------------------------------------------ one configuration
@dataclass
class Series:
    """Per-repetition figures of one aggregation method (CPU seconds unless named wall)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)
    node_median: list[float] = field(default_factory=list)
    node_max: list[float] = field(default_factory=list)
    server_wall: list[float] = field(default_factory=list)
    node_wall_median: list[float] = field(default_factory=list)
    node_wall_max: list[float] = field(default_factory=list)
    error: float = 0.0

    def add(
        self,
        wall: float,
        server: float,
        nodes: list[float],
        server_wall: float | None = None,
        node_walls: list[float] | None = None,
    ) -> None:
        self.wall.append(wall)
        self.server.append(server)
        self.cpu.append(server + sum(nodes))
        self.node_median.append(statistics.median(nodes) if nodes else 0.0)
        self.node_max.append(max(nodes) if nodes else 0.0)
        walls = node_walls if node_walls is not None else nodes
        self.server_wall.append(server if server_wall is None else server_wall)
        self.node_wall_median.append(statistics.median(walls) if walls else 0.0)
        self.node_wall_max.append(max(walls) if walls else 0.0)


def run_config(n: int, m: int, reps: int, batches: int, flower: bool) -> dict[str, Any]:
    """Train, then aggregate A (plain) B (flowerbed) C (Flower), ``reps`` times."""
    # Flower stamps every Message with the running task's identity; here there is no SuperLink
    enter_task_identity(1, 1)
    model = make_model(m)
    m_real = sum(p.numel() for p in model.parameters())
    global_flat = flat(model)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    params = derive_params(n, m_real, max_weight=float(batches * BATCH))
    train_node(model, global_flat, 0, batches)  # warm-up: first torch call pays one-off costs
    train_total, train_median = [], []
    plain, secure, theirs = Series(), Series(), Series()
    identities = throwaway_identities([1000 + i for i in range(n)])
    for rep in range(reps):
        updates, weights, train_cpu, train_wall = {}, {}, [], []
        for i in range(n):
            node = 1000 + i
            updates[node], weights[node], cpu, wall = train_node(model, global_flat, node + rep, batches)
            train_cpu.append(cpu)
            train_wall.append(wall)
        train_total.append(sum(train_cpu))
        train_median.append(statistics.median(train_wall))
        total_weight = sum(weights.values())
        reference = plain_sum(updates, weights)
        # A: a plain round: every node sends its new weights, the coordinator checks every reply
        # and runs FedAvg over them (flowerbed's plain train phase)
        replies, plain_nodes_cpu, plain_nodes_wall = [], [], []
        for node in updates:
            (reply, cpu, wall) = _timed(plain_reply, shapes, global_flat, updates[node], weights[node])
            replies.append(reply)
            plain_nodes_cpu.append(cpu)
            plain_nodes_wall.append(wall)
        _, cpu, wall = _timed(plain_coordinator, replies, _unflatten(shapes, global_flat), rep)
        plain.add(wall, cpu, plain_nodes_cpu, wall, plain_nodes_wall)
        del replies
        # B: the same round through flowerbed's secure aggregation; masked vectors travel as Flower
        # Arrays (serialized by the node, parsed by the coordinator), the result is one reply to FedAvg
        timings = RoundTimings()
        transport = _ArrayTransport()
        forget_checks()  # every round's first node checks every certificate and signature itself
        result = run_secure_sum(
            updates, weights, params, round_id=rep, timings=timings, observe=transport, identities=identities
        )
        _, cpu, wall = _timed(secure_coordinator_finish, result, shapes, global_flat, rep)
        secure.add(
            timings.wall + transport.wall + wall,
            timings.server + transport.server_cpu + cpu,
            [timings.client[k] + transport.node_cpu[k] for k in timings.client],
            timings.server_wall + transport.server_wall + wall,
            [timings.client_wall[k] + transport.node_wall[k] for k in timings.client_wall],
        )
        err = float(np.max(np.abs(result.weighted_sum - reference))) / total_weight
        secure.error = max(secure.error, err)
        # C: Flower SecAgg+
        if flower:
            wall = time.perf_counter()
            agg, node_cpu, server_cpu = flower_secaggplus(
                updates,
                weights,
                num_shares=params.neighbours + 1,
                threshold=params.threshold,
                clipping_range=params.clip_range,
                quantization_range=1 << params.quantization_bits,
                modulus_range=1 << 32,
                max_weight=params.max_weight,
            )
            theirs.add(time.perf_counter() - wall, server_cpu, list(node_cpu.values()))
            err = float(np.max(np.abs(agg - reference))) / total_weight
            theirs.error = max(theirs.error, err)
    med = statistics.median
    secagg = params.to_payload() | {
        "required_bits": params.required_bits,
        "modulus_bits": params.modulus_bits,
        "mean_error_bound": params.mean_error_bound,
    }
    per_batch = med(train_median) / batches
    seq = [(t + s) / (t + p) - 1 for t, s, p in zip(train_total, secure.cpu, plain.cpu, strict=True)]
    par = [
        (t + x + s) / (t + px + ps) - 1
        for t, x, s, px, ps in zip(
            train_median,
            secure.node_wall_max,
            secure.server_wall,
            plain.node_wall_max,
            plain.server_wall,
            strict=True,
        )
    ]
    out: dict[str, Any] = {
        "nodes": n,
        "params": m_real,
        "local_batches": batches,
        "secagg": secagg,
        "threads": torch.get_num_threads(),
        "train_wall_s_per_node": med(train_median),
        "train_cpu_s_total": med(train_total),
        "plain": _series(plain),
        "secure": _series(secure),
        "overhead_sequential": med(seq),
        "overhead_parallel": med(par),
        "batches_for_25pct": {
            "sequential": _break_even(n * per_batch, med(plain.cpu), med(secure.cpu)),
            "parallel": _break_even(
                per_batch,
                med(plain.node_wall_max) + med(plain.server_wall),
                med(secure.node_wall_max) + med(secure.server_wall),
            ),
        },
    }
    if flower:
        out["flower"] = _series(theirs) | {
            "method": "secaggplus_mod stage functions + SecAggPlusWorkflow computation replayed",
            "cpu_ratio_flower_over_flowerbed": med(theirs.cpu) / med(secure.cpu),
            "wall_ratio_flower_over_flowerbed": med(theirs.wall) / med(secure.wall),
        }
    return out


def _series(s: Series) -> dict[str, float]:
    med = statistics.median
    return {
        "cpu_s": med(s.cpu),
        "wall_s": med(s.wall),
        "server_cpu_s": med(s.server),
        "node_cpu_s_median": med(s.node_median),
        "node_cpu_s_max": med(s.node_max),
        "server_wall_s": med(s.server_wall),
        "node_wall_s_median": med(s.node_wall_median),
        "node_wall_s_max": med(s.node_wall_max),
        "max_error_of_mean": s.error,
    }


def _break_even(train_per_batch: float, plain: float, secure: float) -> float:
    """Local batches b with (b * per_batch + secure) / (b * per_batch + plain) = 1.25."""
    return max(0.0, (secure - 1.25 * plain) / (0.25 * train_per_batch))


def _flwr_version() -> str:
    import flwr

    return getattr(flwr, "__version__", "1.42")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, one repetition")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ap.add_argument("--nodes", type=int, nargs="*", default=None)
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--local-batches", type=int, default=None)
    ap.add_argument("--no-flower", action="store_true", help="skip Flower's SecAgg+")
    ap.add_argument(
        "--threads",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="cores of every node and of the coordinator: torch threads for training, threads for masking "
        "(default: this machine's cores)",
    )
    args = ap.parse_args(argv)
    nodes = args.nodes or ([5, 10] if args.quick else [10, 50, 100])
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 1_000_000])
    reps = args.reps or (1 if args.quick else 3)
    batches = args.local_batches or (2 if args.quick else 50)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # FedAvg logs every aggregation
    torch.set_num_threads(args.threads)
    set_default_workers(args.threads)
    print(
        f"secure aggregation overhead: {reps} repetitions (medians), local training = {batches} "
        f"SGD batches of {BATCH} per node on an MLP 100-h-10; every node and the coordinator use "
        f"{args.threads} thread(s)\n"
        f"Flower {_flwr_version()} SecAgg+: its mod's stage functions + its workflow's computation, "
        "replayed in process (not end to end);\nequivalent parameters: num_shares = k + 1, threshold t, "
        "clipping 8, quantization range 2^16, modulus 2^32; both include (de)serializing the masked vectors.\n"
    )
    results = []
    header = (
        f"{'n':>4} {'params':>9} | {'train/node':>10} {'plain':>8} | {'secure':>8} "
        f"{'server':>8} {'node':>8} | {'seq ovh':>7} {'par ovh':>7} {'b@25% s/p':>11} | "
        f"{'flower':>8} {'server':>8} {'node':>8} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for m in sizes:
        for n in nodes:
            r = run_config(n, m, reps, batches, flower=not args.no_flower)
            results.append(r)
            s, fl, be = r["secure"], r.get("flower"), r["batches_for_25pct"]
            line = (
                f"{n:>4} {r['params']:>9} | {r['train_wall_s_per_node']:>9.4f}s "
                f"{r['plain']['server_wall_s']:>7.4f}s | {s['cpu_s']:>7.3f}s "
                f"{s['server_wall_s']:>7.3f}s {s['node_wall_s_max']:>7.4f}s | "
                f"{r['overhead_sequential']:>6.0%} {r['overhead_parallel']:>7.0%} "
                f"{be['sequential']:>5.0f}/{be['parallel']:<5.0f} |"
            )
            if fl:
                line += (
                    f" {fl['cpu_s']:>7.3f}s {fl['server_cpu_s']:>7.3f}s "
                    f"{fl['node_cpu_s_median']:>7.4f}s {fl['cpu_ratio_flower_over_flowerbed']:>5.1f}x"
                )
            print(line, flush=True)
    print(
        "\ntrain/node: one node's local training (wall, median node); plain: the coordinator's part of a "
        "plain round (wall);\nsecure: CPU seconds of the whole secure aggregation (every node + coordinator, "
        "all threads); "
        "server: the\ncoordinator's part (wall); node: the slowest node's part (wall); flower: the same for "
        "Flower's SecAgg+ (CPU);\nratio: flower CPU / secure CPU. Medians over repetitions.\n"
        "seq ovh: (all training + secure) / (all training + plain) - 1 in CPU seconds: one machine, nodes one "
        "after the other.\npar ovh: (median training + slowest node's secure part + coordinator's part) / "
        "(median training + plain) - 1\nin wall seconds: nodes on their own machines at the same time (network "
        "not included).\nb@25%: local batches per node at which the overhead would be 25% (sequential / "
        "parallel)."
    )
    if args.json:
        doc = {
            "benchmark": "secagg_overhead",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
            "threads": args.threads,
            "local_batches": batches,
            "batch_size": BATCH,
            "repetitions": reps,
            "results": results,
        }
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
