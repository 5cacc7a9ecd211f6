"""Local-only baselines: each site trains alone on its own data, for the same number of epochs.

With validation splits (``data.validation_fraction``) a local model follows the federation's
rule: its site holds out the same validation rows, it is validated after every round's worth of
epochs (``evaluate.validation_every``), stops on the same ``train.early_stopping`` and is
reported at its best validation round when the federation reports its best model.

The question a hospital asks is "what do we gain by federating?": the federated model's figure
on the task's ``primary_metric`` (accuracy, a C-index, a loss, ...) is reported beside that of
models each trained on one site only, on every site's test split and on the pooled test set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flowerbed.client.training import evaluate_local, train_local
from flowerbed.experiment import Experiment
from flowerbed.seeds import derive_seed
from flowerbed.server.model_selection import Selection, SelectionProgress, selection_for
from flowerbed.server.runner import initial_model
from flowerbed.simulations.research.comparison import metric_value
from flowerbed.tasks import resolve_device, resolve_task
from flowerbed.tasks.data.catalog import pooled_test_set
from flowerbed.tasks.data.validation import hold_out_validation
from flowerbed.tasks.task import SiteData, Task

__all__ = ["local_only_baselines"]


def local_only_baselines(experiment: Experiment, sites: list[SiteData]) -> dict[str, Any]:
    """Train one model per site for ``rounds x local_epochs`` epochs; evaluate it everywhere.

    Returns
    -------
    dict
        ``{"metric": name, "greater_is_better": bool, "sites": {site: {"own": v, "pooled": v}},
        "mean_pooled": v, "mean_own": v, "missing": [...]}``, every ``v`` the task's
        ``primary_metric``; ``None`` where a model has no finite value for it (``missing`` then
        says where and which metrics there were), and a mean is ``None`` unless every site has one.
    """
    task = resolve_task(experiment.task.name, experiment.task.args)
    device = resolve_device(experiment.task.device)
    metric = task.primary_metric
    train = experiment.train.model_copy(update={"local_epochs": experiment.rounds * experiment.train.local_epochs})
    x_pool, y_pool = pooled_test_set(sites)
    results: dict[str, dict[str, float | None]] = {}
    missing: list[str] = []
    selection = selection_for(experiment, task)
    for site in sites:
        model = initial_model(experiment)
        seed = derive_seed(experiment.seed, "local-only", site.name)
        if selection is None:
            train_local(model, task, site.x_train, site.y_train, train, seed=seed, device=device)
        else:
            site = hold_out_validation(site, experiment.data.validation_fraction, experiment.data.split_seed)
            _train_with_validation(model, experiment, task, site, selection, seed, device)
        scores = {
            "own": evaluate_local(model, task, site.x_test, site.y_test, device=device),
            "pooled": evaluate_local(model, task, x_pool, y_pool, device=device),
        }
        results[site.name] = {where: metric_value(values, metric) for where, values in scores.items()}
        for where, values in scores.items():
            if results[site.name][where] is None:
                found = ", ".join(k for k in values if k != "num-examples") or "none"
                state = "is not finite" if metric in values else f"is not among its metrics ({found})"
                missing.append(f"{site.name} only, {where} test set: {metric} {state}")
    return {
        "metric": metric,
        "greater_is_better": task.greater_is_better,
        "sites": results,
        "mean_pooled": _mean([r["pooled"] for r in results.values()]),
        "mean_own": _mean([r["own"] for r in results.values()]),
        "missing": missing,
    }


def _train_with_validation(
    model: torch.nn.Module,
    experiment: Experiment,
    task: Task,
    site: SiteData,
    selection: Selection,
    seed: int,
    device: torch.device,
) -> None:
    """Round by round on the site's training rows, validated as the federation is; ``model`` ends as reported."""
    progress = SelectionProgress(selection)
    best: dict[str, torch.Tensor] | None = None
    for server_round in range(1, experiment.rounds + 1):
        train_local(
            model, task, site.x_train, site.y_train, experiment.train,
            seed=derive_seed(seed, server_round), device=device,
        )  # fmt: skip
        if server_round % experiment.evaluate.validation_every and server_round != experiment.rounds:
            continue
        metrics = evaluate_local(model, task, site.x_val, site.y_val, device=device)  # type: ignore[arg-type]
        if progress.observe({"round": server_round, "validation": metrics}):
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if progress.stop_reason():
            break
    if best is not None and experiment.reports_best_model:
        model.load_state_dict(best)


def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return float(np.mean([v for v in values if v is not None]))
