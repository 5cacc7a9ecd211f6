"""The ServerApp for deployments and ``flwr run``: the experiment comes from the run config.

Run-config keys:

- ``experiment``: path to an experiment TOML (absolute, or relative to the working directory), or
  the TOML text itself.
- ``run-dir``: the run folder to write (default: a new folder under the experiment's ``output``).
- ``resume``: ``true`` to continue ``run-dir`` from its last checkpoint.
- ``expected-nodes``: nodes to wait for (default: ``data.partition.num_clients``).
- ``site-max-examples``: JSON object, site -> the most ``num-examples`` its replies may claim (the
  federation file's ``max_examples``; ``flowerbed run start`` fills it in).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flowerbed.exception import ConfigError
from flowerbed.experiment import Experiment, load_experiment, parse_experiment
from flowerbed.server.progress import LogReporter
from flowerbed.server.run_folder import new_run_dir
from flowerbed.server.runner import run_federation

app = ServerApp()


def experiment_from_run_config(run_config: dict) -> Experiment:
    """The experiment named (or given inline) by the run config's ``experiment`` key."""
    value = str(run_config.get("experiment", "")).strip()
    if not value:
        raise ConfigError("run config", ["experiment: required (a path to an experiment .toml, or its text)"])
    if "\n" in value or "=" in value:
        try:
            return parse_experiment(tomllib.loads(value), "run config 'experiment'")
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("run config 'experiment'", [f"not valid TOML: {exc}"]) from None
    return load_experiment(Path(value).expanduser())


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federation described by the run config."""
    run_config = context.run_config
    experiment = experiment_from_run_config(run_config)
    resume = str(run_config.get("resume", "false")).lower() == "true"
    run_dir_value = str(run_config.get("run-dir", "")).strip()
    if run_dir_value:
        run_dir = Path(run_dir_value).expanduser()
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = new_run_dir(experiment)
    expected = int(run_config.get("expected-nodes", experiment.data.partition.num_clients))
    caps = site_caps(str(run_config.get("site-max-examples", "")))
    run_federation(
        grid,
        experiment,
        run_dir,
        expected_nodes=expected,
        resume=resume,
        reporter=LogReporter(),
        site_max_examples=caps,
    )


def site_caps(text: str) -> dict[str, int]:
    """The run config's ``site-max-examples`` (empty: no per-site caps)."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
        if isinstance(value, dict) and all(isinstance(v, int) and v > 0 for v in value.values()):
            return {str(k): int(v) for k, v in value.items()}
    except ValueError:
        pass
    raise ConfigError("run config", ["site-max-examples: must be a JSON object of site -> positive integer"])
