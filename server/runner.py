"""Run a federation end to end over any Grid: initial model, round loop, final model, summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.serverapp import Grid

from flowerbed.experiment import Experiment
from flowerbed.privacy.dp_sgd import make_private_compatible
from flowerbed.seeds import derive_seed
from flowerbed.server import run_folder
from flowerbed.server.federation import CentralEvaluator, Federation, Reporter
from flowerbed.tasks import resolve_task
from flowerbed.tasks.data.catalog import dataset_schema


def initial_model(experiment: Experiment) -> torch.nn.Module:
    """The global model before round 1: the same weights for the same seed, everywhere."""
    task = resolve_task(experiment.task.name, experiment.task.args)
    schema = dataset_schema(experiment.data, experiment.seed)
    model = task.build_model(schema, seed=derive_seed(experiment.seed, "init"))
    return make_private_compatible(model) if experiment.privacy.enabled else model


def run_federation(
    grid: Grid,
    experiment: Experiment,
    run_dir: Path,
    *,
    expected_nodes: int,
    resume: bool = False,
    central_evaluator: CentralEvaluator | None = None,
    reporter: Reporter | None = None,
    site_max_examples: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Run or resume every round, then save ``model.safetensors``, ``model.pt`` and ``summary.json``."""
    model = initial_model(experiment)
    weights = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    federation = Federation(
        grid,
        experiment,
        run_dir,
        expected_nodes=expected_nodes,
        initial_weights=weights,
        central_evaluator=central_evaluator,
        reporter=reporter,
        site_max_examples=site_max_examples,
    )
    summary = federation.run(resume=resume)
    input_shape = dataset_schema(experiment.data, experiment.seed).input_shape
    run_folder.save_final_model(run_dir, federation.final_weights, model, input_shape)
    run_folder.write_summary(run_dir, summary)
    if reporter is not None:
        reporter.run_finished(summary)
    return summary
