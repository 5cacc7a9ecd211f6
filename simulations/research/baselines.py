"""Local-only baselines: each site trains alone on its own data, for the same number of epochs.

The question a hospital asks is "what do we gain by federating?": the federated model's accuracy
is reported beside that of models each trained on one site only, on every site's test split and on
the pooled test set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flowerbed.client.training import evaluate_local, train_local
from flowerbed.experiment import Experiment
from flowerbed.seeds import derive_seed
from flowerbed.server.runner import initial_model
from flowerbed.tasks import resolve_device, resolve_task
from flowerbed.tasks.data.catalog import pooled_test_set
from flowerbed.tasks.task import SiteData


def local_only_baselines(experiment: Experiment, sites: list[SiteData]) -> dict[str, Any]:
    """Train one model per site for ``rounds x local_epochs`` epochs; evaluate it everywhere.

    Returns ``{"sites": {site: {"own": acc, "pooled": acc}}, "mean_pooled": acc}``.
    """
    task = resolve_task(experiment.task.name, experiment.task.args)
    device = resolve_device(experiment.task.device)
    train = experiment.train.model_copy(update={"local_epochs": experiment.rounds * experiment.train.local_epochs})
    x_pool, y_pool = pooled_test_set(sites)
    results: dict[str, dict[str, float]] = {}
    for site in sites:
        model = initial_model(experiment)
        seed = derive_seed(experiment.seed, "local-only", site.name)
        train_local(model, task, site.x_train, site.y_train, train, seed=seed, device=device)
        own = evaluate_local(model, task, site.x_test, site.y_test, device=device)
        pooled = evaluate_local(model, task, x_pool, y_pool, device=device)
        results[site.name] = {"own": own.get("accuracy", float("nan")), "pooled": pooled.get("accuracy", float("nan"))}
    return {
        "sites": results,
        "mean_pooled": float(np.mean([r["pooled"] for r in results.values()])),
        "mean_own": float(np.mean([r["own"] for r in results.values()])),
    }
