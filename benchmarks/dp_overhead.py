"""DP-SGD overhead: one DP epoch divided by one plain epoch, for two small models.

- ``heart-mlp``: the built-in ``tabular-mlp`` on the Cleveland hospital's training split
  (about 230 rows, batch 32).
- ``digits-cnn``: the built-in ``image-cnn`` on scikit-learn's digits (8x8, 75% train split,
  batch 32).

For each model three ways of training one epoch are timed, interleaved (plain, flowerbed DP,
Opacus DP, plain, ...) after one warm-up each, and the medians are reported:

- ``plain``: ``flowerbed.client.training.train_local`` (shuffled mini-batches);
- ``dp``: ``flowerbed.client.private_training.train_private`` (the whole call, set-up included);
- ``opacus``: Opacus's default path (``PrivacyEngine.make_private`` with Poisson sampling and
  hooks; only the epoch loop is timed).

Run: ``python -m flowerbed.benchmarks.dp_overhead [--repeats 15] [--json PATH]``.
Timings are never asserted; the ratios are relative to ``plain`` measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from flowerbed.client.private_training import train_private
from flowerbed.client.training import train_local
from flowerbed.experiment import TrainConfig
from flowerbed.privacy.planner import DPPlan, sampling
from flowerbed.tasks.registry import resolve_task
from flowerbed.tasks.task import DataSchema


def heart_data() -> tuple[np.ndarray, np.ndarray, DataSchema]:
    """Cleveland's preprocessed training split."""
    from flowerbed.tasks.data.heart import bundled_path, load_site

    site = load_site(bundled_path("cleveland"), "cleveland")
    return site.x_train, site.y_train, site.schema


def digits_data() -> tuple[np.ndarray, np.ndarray, DataSchema]:
    """scikit-learn digits as 1x8x8 images in [0, 1], first 75% of rows."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    cut = int(0.75 * len(y))
    return x[:cut], y[:cut], DataSchema(kind="image", input_shape=(1, 8, 8), num_classes=10)


def _opacus_epoch(
    model: torch.nn.Module,
    task: Any,
    x: np.ndarray,
    y: np.ndarray,
    plan: DPPlan,
    train: TrainConfig,
) -> Callable[[], None]:
    """Make Opacus-private objects, return a function that runs one epoch over them."""
    from opacus import PrivacyEngine

    loader = DataLoader(TensorDataset(torch.as_tensor(x), torch.as_tensor(y)), batch_size=train.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="prv")
        module, optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=train.lr),
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            poisson_sampling=True,
        )

    def epoch() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for xb, yb in dp_loader:
                optimizer.zero_grad()
                task.loss_fn(module(xb), yb).backward()
                optimizer.step()

    return epoch


def measure(name: str, task_name: str, data: tuple[np.ndarray, np.ndarray, DataSchema], repeats: int) -> dict[str, Any]:
    """Median epoch times (seconds) and ratios to plain for one model."""
    x, y, schema = data
    task = resolve_task(task_name)
    train = TrainConfig(batch_size=32, lr=0.05, local_epochs=1)
    q, steps = sampling(len(y), train.batch_size)
    plan = DPPlan(
        noise_multiplier=1.0,
        sample_rate=q,
        steps_per_round=steps,
        rounds=1,
        max_grad_norm=1.0,
        delta=1e-5,
    )
    device = torch.device("cpu")

    def plain() -> None:
        train_local(task.build_model(schema, seed=0), task, x, y, train, seed=0, device=device)

    def dp() -> None:
        train_private(task.build_model(schema, seed=0), task, x, y, train, plan=plan, device=device)

    opacus_epoch = _opacus_epoch(task.build_model(schema, seed=0), task, x, y, plan, train)
    runners = {"plain": plain, "dp": dp, "opacus": opacus_epoch}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for fn in runners.values():  # warm-up
        fn()
    for _ in range(repeats):
        for key, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "rows": len(y),
        "steps_per_epoch": steps,
        "plain_s": med["plain"],
        "dp_s": med["dp"],
        "opacus_s": med["opacus"],
        "dp_ratio": med["dp"] / med["plain"],
        "opacus_ratio": med["opacus"] / med["plain"],
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Print (and optionally write as JSON) the DP / plain epoch-time ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [
        measure("heart-mlp", "tabular-mlp", heart_data(), args.repeats),
        measure("digits-cnn", "image-cnn", digits_data(), args.repeats),
    ]
    print(f"{'model':<12}{'rows':>6}{'plain ms':>10}{'dp ms':>9}{'dp/plain':>10}{'opacus ms':>11}{'opacus/plain':>14}")
    for r in results:
        print(
            f"{r['model']:<12}{r['rows']:>6}{1e3 * r['plain_s']:>10.2f}{1e3 * r['dp_s']:>9.2f}"
            f"{r['dp_ratio']:>9.2f}x{1e3 * r['opacus_s']:>11.2f}{r['opacus_ratio']:>13.2f}x"
        )
    if args.json:
        meta = {
            "torch": torch.__version__,
            "threads": args.threads,
            "machine": platform.machine(),
            "python": platform.python_version(),
        }
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
