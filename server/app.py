"""The ServerApp for deployments and ``flwr run``: the experiment comes from the run config.

Run-config keys (``RUN_CONFIG_KEYS``; every one is declared in ``[tool.flwr.app.config]`` of
the app's ``pyproject.toml``, so ``flwr run --run-config`` may override any of them):

- ``experiment``: path to an experiment TOML, or the TOML text itself. A relative path is looked
  up in the working directory, then in the installed flowerbed, so the packaged default
  ``simulations/experiments/heart.toml`` resolves wherever the ServerApp runs.
- ``run-dir``: the run folder to write (default: a new folder under the experiment's ``output``).
- ``resume``: ``true`` to continue ``run-dir`` from its last checkpoint.
- ``expected-nodes``: nodes to wait for (``0``, the default: ``data.partition.num_clients``).
- ``site-max-examples``: JSON object, site -> the most ``num-examples`` its replies may claim (the
  federation file's ``max_examples``; ``flowerbed run start`` fills it in).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import flowerbed
from flowerbed.config_utils import find_file
from flowerbed.exception import ConfigError
from flowerbed.experiment import Experiment, load_experiment, parse_experiment
from flowerbed.process_control import flower_logs_once
from flowerbed.server.progress import LogReporter
from flowerbed.server.run_folder import new_run_dir
from flowerbed.server.runner import run_federation

RUN_CONFIG_KEYS = ("experiment", "run-dir", "resume", "expected-nodes", "site-max-examples")

app = ServerApp()


def experiment_path(value: str) -> Path:
    """The experiment file a run config names: absolute, or relative to the working directory or flowerbed.

    Raises
    ------
    ConfigError
        Naming every place looked in.
    """
    path = find_file(value)
    if path.is_file() or path.is_absolute():
        return path
    package = Path(flowerbed.__file__).resolve().parent
    places = ", ".join(str(p) for p in (Path.cwd(), package, package.parent))
    raise ConfigError(
        "run config 'experiment'",
        [
            f"{value!r}: no such file in {places}; give an absolute path (a file on the coordinator's "
            "machine) or the experiment's TOML text"
        ],
    )


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
    return load_experiment(experiment_path(value))


def expected_nodes(run_config: dict, experiment: Experiment) -> int:
    """The run config's ``expected-nodes``; ``0`` or absent: the experiment's ``data.partition.num_clients``."""
    raw = run_config.get("expected-nodes", 0)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ConfigError("run config", [f"expected-nodes = {raw!r}: must be a whole number >= 0"]) from None
    if value < 0:
        raise ConfigError("run config", [f"expected-nodes = {value}: must be >= 0 (0: the experiment's clients)"])
    return value or experiment.data.partition.num_clients


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run (or resume) the federation described by the run config."""
    flower_logs_once()
    run_config = context.run_config
    experiment = experiment_from_run_config(run_config)
    resume = str(run_config.get("resume", "false")).lower() == "true"
    expected = expected_nodes(run_config, experiment)
    caps = site_caps(str(run_config.get("site-max-examples", "")))
    run_dir_value = str(run_config.get("run-dir", "")).strip()
    if run_dir_value:
        run_dir = Path(run_dir_value).expanduser()
        made = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir, made = new_run_dir(experiment), True
    try:
        run_federation(
            grid,
            experiment,
            run_dir,
            expected_nodes=expected,
            resume=resume,
            reporter=LogReporter(),
            site_max_examples=caps,
        )
    except BaseException:
        if made and not resume:
            remove_empty_run_dir(run_dir)
        raise


def remove_empty_run_dir(run_dir: Path) -> bool:
    """Remove a run folder that a failed run left without a completed round (nothing to report or resume)."""
    import shutil

    if (run_dir / "checkpoints" / "LATEST").is_file() or (run_dir / "summary.json").is_file():
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


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
