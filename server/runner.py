"""Run a federation end to end over any Grid: initial model, round loop, final model, summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from flwr.serverapp import Grid

from flowerbed.exception import ConfigError
from flowerbed.experiment import Experiment
from flowerbed.privacy.dp_sgd import make_private_compatible
from flowerbed.seeds import derive_seed
from flowerbed.server import run_folder
from flowerbed.server.federation import CentralEvaluator, Federation, Reporter
from flowerbed.server.model_selection import selection_for
from flowerbed.server.tracking import failures_recorded, with_tracking
from flowerbed.tasks import resolve_task
from flowerbed.tasks.data.catalog import dataset_schema
from flowerbed.weights import load_safetensors


def initial_model(experiment: Experiment) -> torch.nn.Module:
    """The global model before round 1: the same weights for the same seed, everywhere.

    The task's ``init_fn`` then sets the initial state in place, where the task has one. With
    ``task.initial_weights``, the weights come from that safetensors file instead (every name and
    shape must match the task's model).

    Raises
    ------
    ConfigError
        When the file is missing or does not fit the model (naming the file and the tensors).
    """
    task = resolve_task(experiment.task.name, experiment.task.args)
    schema = dataset_schema(experiment.data, experiment.seed)
    seed = derive_seed(experiment.seed, "init")
    model = task.build_model(schema, seed=seed)
    if task.init_fn is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            task.init_fn(model)
    if experiment.privacy.enabled:
        model = make_private_compatible(model)
    if experiment.task.initial_weights:
        load_initial_weights(model, Path(experiment.task.initial_weights).expanduser())
    return model


def load_initial_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy a safetensors file into ``model``, refusing any missing, extra or misshapen tensor."""
    source = "experiment (task.initial_weights)"
    if not path.is_file():
        raise ConfigError(source, [f"task.initial_weights = {str(path)!r}: no such file"])
    try:
        weights = load_safetensors(path)
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ConfigError(source, [f"{path}: not a safetensors file ({exc})"]) from None
    state = model.state_dict()
    problems = [f"{path}: missing {k} {tuple(v.shape)}" for k, v in state.items() if k not in weights]
    problems += [f"{path}: {k} is not a weight of the task's model" for k in weights if k not in state]
    problems += [
        f"{path}: {k} has shape {tuple(weights[k].shape)}, the model's is {tuple(v.shape)}"
        for k, v in state.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    if problems:
        raise ConfigError(source, problems)
    model.load_state_dict({k: torch.from_numpy(weights[k].copy()).to(v.dtype) for k, v in state.items()})


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
    """Run or resume every round, then save the models and ``summary.json``.

    ``model.safetensors`` and ``model.pt2`` hold the last round's global model, ``best.safetensors``
    the best on validation (when the nodes hold validation splits); a run that completed no round
    writes no model.
    """
    task = resolve_task(experiment.task.name, experiment.task.args)
    if experiment.train.weighting == "task" and task.weight_fn is None:
        raise ConfigError(
            "experiment (train.weighting)",
            [f"train.weighting = 'task' needs a weight_fn on task {task.name!r}; give the Task one or pick train-rows"],
        )
    reporter = with_tracking(experiment, run_dir, reporter)  # MLflow, TensorBoard: the experiment's [tracking]
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
        selection=selection_for(experiment, task),
    )
    if (experiment.task.initial_weights or task.init_fn is not None) and not resume:
        run_folder.save_initial_weights(run_dir, weights)
    with failures_recorded(reporter):
        summary = federation.run(resume=resume)
    if summary["rounds_completed"]:
        input_shape = dataset_schema(experiment.data, experiment.seed).input_shape
        run_folder.save_final_model(run_dir, federation.final_weights, model, input_shape)
        if federation.best_weights is not None:
            run_folder.save_best_model(run_dir, federation.best_weights)
    run_folder.write_summary(run_dir, summary)
    if reporter is not None:
        reporter.run_finished(summary)
    return summary
