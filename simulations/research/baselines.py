"""Local-only baselines: each site trains alone on its own data, for the same number of epochs.

The question a hospital asks is "what do we gain by federating?": the federated model's figure
on the task's ``primary_metric`` (accuracy, a C-index, a loss, ...) is reported beside that of
models each trained on one site only, on every site's test split and on the pooled test set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flowerbed.client.training import evaluate_local, train_local
from flowerbed.experiment import Experiment
from flowerbed.seeds import derive_seed
from flowerbed.server.runner import initial_model
from flowerbed.simulations.research.comparison import metric_value
from flowerbed.tasks import resolve_device, resolve_task
from flowerbed.tasks.data.catalog import pooled_test_set
from flowerbed.tasks.task import SiteData

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
    for site in sites:
        model = initial_model(experiment)
        seed = derive_seed(experiment.seed, "local-only", site.name)
        train_local(model, task, site.x_train, site.y_train, train, seed=seed, device=device)
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


def _mean(values: list[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return float(np.mean([v for v in values if v is not None]))
