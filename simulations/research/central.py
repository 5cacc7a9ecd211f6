"""Central evaluation: the server scores the global model on a test set it holds (simulations)."""

from __future__ import annotations

import numpy as np
import torch

from flowerbed.client.training import evaluate_local
from flowerbed.experiment import Experiment
from flowerbed.privacy.dp_sgd import make_private_compatible
from flowerbed.server.federation import CentralEvaluator
from flowerbed.tasks import resolve_device, resolve_task
from flowerbed.tasks.data.catalog import pooled_test_set
from flowerbed.tasks.task import SiteData


def make_central_evaluator(experiment: Experiment, sites: list[SiteData]) -> CentralEvaluator:
    """Evaluate weights on all sites' test splits together (the pooled test set)."""
    task = resolve_task(experiment.task.name, experiment.task.args)
    device = resolve_device(experiment.task.device)
    model = task.build_model(sites[0].schema)
    if experiment.privacy.enabled:
        model = make_private_compatible(model)
    x, y = pooled_test_set(sites)

    def evaluate(weights: dict[str, np.ndarray]) -> dict[str, float]:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
        return evaluate_local(model, task, x, y, device=device)

    return evaluate
