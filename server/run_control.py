"""The operator's run commands: start, status, logs, stop, resume and collect a federated run.

A run is submitted to the coordinator's SuperLink with ``flwr run`` through the Control API (the
``flowerbed`` connection written by ``flowerbed coordinator start``). Every ``flwr`` command runs
through ``flowerbed.server.operator_cli``, which sends the operator's token: the coordinator refuses
Control API calls without it. The Flower app bundle it
submits holds no code, only ``pyproject.toml``: the ServerApp and every ClientApp are the
installed flowerbed of the coordinator and of each hospital. The run config carries:

- ``experiment``: the resolved experiment as TOML text (the coordinator's copy of the file, with
  ``--set`` overrides applied),
- ``run-dir``: the run folder, chosen here (``<state>/runs/<name>-<UTC time>``) so that every
  command can find it,
- ``resume``: ``true`` to continue ``run-dir`` from its last checkpoint,
- ``expected-nodes``: how many hospitals to wait for.

``<state>/runs.json`` maps Flower run ids to run folders; a run is named by its Flower run id, its
folder name, or nothing (the latest).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

import flowerbed
from flowerbed.exception import RunError
from flowerbed.experiment import experiment_data, parse_experiment
from flowerbed.server.coordinator import (
    CONNECTION,
    INSECURE_WARNING,
    CoordinatorPaths,
    flower_env,
    operator_token_file,
)
from flowerbed.server.federation_config import FederationConfig
from flowerbed.server.operator_auth import TOKEN_FILE_ENV, read_token

APP_PYPROJECT = """\
# The Flower app bundle `flowerbed run start` submits: configuration only, no code. The
# coordinator and every hospital run their own installed flowerbed.
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "flowerbed-run"
version = "{version}"
description = "A flowerbed federated run"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "flowerbed"

[tool.flwr.app.components]
serverapp = "flowerbed.server.app:app"
clientapp = "flowerbed.client.app:app"

[tool.flwr.app.config]
experiment = ""
run-dir = ""
resume = false
expected-nodes = 0
"""


@dataclass
class RunRecord:
    """One submission of a run folder to the coordinator (a start or a resume)."""

    flower_run_id: int
    name: str
    run_dir: str
    submitted_at: str
    run_config: str
    resumes: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# bookkeeping


def _registry_path(federation: FederationConfig) -> Path:
    return federation.state_dir / "runs.json"


def read_runs(federation: FederationConfig) -> list[RunRecord]:
    """Every run submitted to this coordinator, oldest first."""
    path = _registry_path(federation)
    if not path.exists():
        return []
    return [RunRecord(**r) for r in json.loads(path.read_text())]


def _write_runs(federation: FederationConfig, runs: list[RunRecord]) -> None:
    path = _registry_path(federation)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    tmp.replace(path)


def find_run(federation: FederationConfig, ref: str | None = None) -> RunRecord:
    """The run named by a Flower run id (of its start or any resume), a folder name, or the latest.

    Raises
    ------
    RunError
        When no such run was submitted to this coordinator.
    """
    runs = read_runs(federation)
    if not runs:
        raise RunError(f"no runs were started on this coordinator ({_registry_path(federation)})")
    if ref is None:
        return runs[-1]
    for run in reversed(runs):
        if ref in (str(run.flower_run_id), run.name, run.run_dir) or ref in map(str, run.resumes):
            return run
    known = ", ".join(f"{r.name} ({r.flower_run_id})" for r in runs[-5:])
    raise RunError(f"run {ref!r} is unknown on this coordinator; recent runs: {known}")


def app_dir(federation: FederationConfig) -> Path:
    """Write (if needed) the code-free Flower app folder that ``flwr run`` bundles."""
    folder = federation.state_dir / "app"
    folder.mkdir(parents=True, exist_ok=True)
    pyproject = folder / "pyproject.toml"
    text = APP_PYPROJECT.format(version=flowerbed.__version__)
    if not pyproject.exists() or pyproject.read_text() != text:
        pyproject.write_text(text)
    return folder


def operator_env(federation: FederationConfig) -> dict[str, str]:
    """Environment of the operator's ``flwr`` commands: the coordinator's Flower home and token file."""
    return {**flower_env(federation), TOKEN_FILE_ENV: str(operator_token_file(federation))}


def flwr_command(*args: str) -> list[str]:
    """``flwr ARGS`` as the operator (``flowerbed.server.operator_cli``)."""
    return [sys.executable, "-m", "flowerbed.server.operator_cli", *args]


def _flwr(federation: FederationConfig, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        flwr_command(*args),
        env=operator_env(federation),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=federation.state_dir,
    )


def _json_reply(result: subprocess.CompletedProcess, what: str) -> dict[str, Any]:
    text = result.stdout
    start = text.find("{")
    try:
        reply = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        reply = {}
    if not reply.get("success"):
        message = reply.get("error-message") or result.stderr.strip() or text.strip() or "no answer"
        raise RunError(f"{what} failed: {message.strip()} (is `flowerbed coordinator start` running?)")
    return reply


def _check_coordinator(federation: FederationConfig) -> None:
    paths = CoordinatorPaths(federation.state_dir)
    if not (paths.flwr_home / "config.toml").exists():
        raise RunError(
            f"{paths.state} has no coordinator connection: start the coordinator first "
            "(flowerbed coordinator start FEDERATION.toml)"
        )
    if paths.insecure_marker.exists():
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    read_token(operator_token_file(federation))


# ---------------------------------------------------------------------------------------------
# commands


def resolve_experiment_text(
    experiment_path: str | Path, overrides: list[str] | None, run_dir: Path
) -> tuple[str, str, int]:
    """The experiment as TOML text with overrides applied and ``output`` set to the run's parent.

    Returns the text, the experiment's name and its number of clients (the default number of
    nodes to wait for). Validation errors name the file and the key, before anything is sent.
    """
    path = Path(experiment_path)
    data = experiment_data(path, overrides)
    data["output"] = str(run_dir.parent)
    experiment = parse_experiment(data, str(path))
    return tomli_w.dumps(data), experiment.name, experiment.data.partition.num_clients


def _submit(federation: FederationConfig, run_config: Path, stream: bool) -> int:
    args = ["run", str(app_dir(federation)), CONNECTION, "--run-config", str(run_config), "--format", "json"]
    reply = _json_reply(_flwr(federation, *args), "flwr run")
    run_id = int(reply["run-id"])
    if stream:
        stream_logs(federation, str(run_id), follow=True)
    return run_id


def start_run(
    federation: FederationConfig,
    experiment_path: str | Path,
    *,
    overrides: list[str] | None = None,
    expected_nodes: int | None = None,
    stream: bool = False,
) -> RunRecord:
    """Submit a new run of an experiment to the coordinator.

    Parameters
    ----------
    federation : FederationConfig
        The coordinator's federation file.
    experiment_path : str | Path
        The experiment TOML (validated here, before submission).
    overrides : list[str] | None (default: None)
        ``key.sub=value`` overrides, as in ``flowerbed simulate --set``.
    expected_nodes : int | None (default: None)
        Hospitals to wait for; default: the federation's sites, else the experiment's clients.
    stream : bool (default: False)
        Follow the run's log until it ends.
    """
    _check_coordinator(federation)
    runs_root = CoordinatorPaths(federation.state_dir).runs
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    text, name, num_clients = resolve_experiment_text(experiment_path, overrides, runs_root / "x")
    run_dir = runs_root / f"{name}-{stamp}"
    suffix = 1
    while run_dir.exists() or any(r.run_dir == str(run_dir) for r in read_runs(federation)):
        suffix += 1
        run_dir = runs_root / f"{name}-{stamp}-{suffix}"
    nodes = expected_nodes or len(federation.sites) or num_clients
    submissions = federation.state_dir / "submissions"
    submissions.mkdir(parents=True, exist_ok=True)
    run_config = submissions / f"{run_dir.name}.toml"
    run_config.write_text(
        tomli_w.dumps({"experiment": text, "run-dir": str(run_dir), "resume": False, "expected-nodes": nodes})
    )
    run_id = _submit(federation, run_config, stream=False)
    record = RunRecord(
        flower_run_id=run_id,
        name=run_dir.name,
        run_dir=str(run_dir),
        submitted_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        run_config=str(run_config),
    )
    _write_runs(federation, [*read_runs(federation), record])
    if stream:
        stream_logs(federation, str(run_id), follow=True)
    return record


def resume_run(federation: FederationConfig, ref: str | None = None, *, stream: bool = False) -> RunRecord:
    """Continue a run folder from its last checkpoint as a new Flower run (e.g. after a restart).

    Raises
    ------
    RunError
        When the run folder has no checkpoint yet (start it again instead).
    """
    _check_coordinator(federation)
    record = find_run(federation, ref)
    run_dir = Path(record.run_dir)
    if not (run_dir / "checkpoints" / "LATEST").is_file():
        raise RunError(f"{run_dir}: no checkpoint to resume from; start the run again with `flowerbed run start`")
    config = tomllib.loads(Path(record.run_config).read_text())
    config["resume"] = True
    resume_config = Path(record.run_config).with_name(f"{record.name}.resume.toml")
    resume_config.write_text(tomli_w.dumps(config))
    _stop_quietly(federation, record)
    run_id = _submit(federation, resume_config, stream=False)
    runs = read_runs(federation)
    for run in runs:
        if run.name == record.name:
            run.resumes.append(run_id)
            record = run
    _write_runs(federation, runs)
    if stream:
        stream_logs(federation, str(run_id), follow=True)
    return record


def _stop_quietly(federation: FederationConfig, record: RunRecord) -> None:
    """Stop the run's earlier Flower runs that may still be marked running (after a restart)."""
    for run_id in [record.flower_run_id, *record.resumes]:
        _flwr(federation, "stop", str(run_id), CONNECTION, "--format", "json", timeout=30)


def latest_flower_run_id(record: RunRecord) -> int:
    """The Flower run id currently working on the run folder."""
    return record.resumes[-1] if record.resumes else record.flower_run_id


def stop_run(federation: FederationConfig, ref: str | None = None) -> RunRecord:
    """Stop a run; its run folder keeps every finished round's checkpoint (resume continues it)."""
    _check_coordinator(federation)
    record = find_run(federation, ref)
    _json_reply(
        _flwr(federation, "stop", str(latest_flower_run_id(record)), CONNECTION, "--format", "json"), "flwr stop"
    )
    return record


def flower_status(federation: FederationConfig, run_id: int) -> dict[str, Any]:
    """Flower's view of a run (status, elapsed time), or ``{}`` when the coordinator does not answer."""
    try:
        reply = _json_reply(
            _flwr(federation, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json", timeout=30), "flwr ls"
        )
    except (RunError, subprocess.TimeoutExpired):
        return {}
    runs = reply.get("runs") or []
    return runs[0] if runs else {}


def run_status(federation: FederationConfig, ref: str | None = None, *, ask_flower: bool = True) -> dict[str, Any]:
    """A run's progress from its run folder (rounds, sites, metrics, epsilon per site) and Flower.

    Returns
    -------
    dict
        ``name``, ``run_dir``, ``flower_run_id``, ``status``, ``rounds_done``, ``rounds``,
        ``participants`` and ``refused`` of the last round, ``sites`` (every site that took
        part in any round), ``metrics`` (last round: ``train``, ``evaluate``, ``central``),
        ``epsilon`` (site -> latest epsilon), ``epsilon_max``, ``excluded`` (nodes that refused the
        run at its start, with their reason), ``final`` (final metrics) and ``finished``.
    """
    from flowerbed.server.run_folder import read_metrics, read_summary

    record = find_run(federation, ref)
    run_dir = Path(record.run_dir)
    records = read_metrics(run_dir) if run_dir.is_dir() else []
    rounds = None
    if (run_dir / "experiment.json").is_file():
        rounds = json.loads((run_dir / "experiment.json").read_text()).get("rounds")
    last = records[-1] if records else {}
    sites: list[str] = []
    epsilon: dict[str, float] = {}
    for rec in records:
        for site in rec.get("participants") or []:
            if site not in sites:
                sites.append(site)
        for site, values in (rec.get("sites") or {}).items():
            if isinstance(values, dict) and values.get("epsilon") is not None:
                epsilon[site] = float(values["epsilon"])
    flower = flower_status(federation, latest_flower_run_id(record)) if ask_flower else {}
    summary = read_summary(run_dir) if run_dir.is_dir() else {}
    return {
        "name": record.name,
        "run_dir": str(run_dir),
        "flower_run_id": latest_flower_run_id(record),
        "status": flower.get("status", "unknown"),
        "status_details": flower.get("status-details", ""),
        "rounds_done": int(last.get("round", 0)),
        "rounds": rounds,
        "participants": last.get("participants", []),
        "refused": last.get("refused", {}),
        "sites": sites,
        "metrics": {k: last.get(k) for k in ("train", "evaluate", "central") if last.get(k) is not None},
        "epsilon": epsilon,
        "epsilon_max": last.get("epsilon_max"),
        "excluded": summary.get("excluded", {}),
        "final": summary.get("final", {}),
        "finished": bool(summary),
    }


def stream_logs(federation: FederationConfig, ref: str | None = None, *, follow: bool = False) -> int:
    """Print a run's log (Flower's ``flwr log``); ``follow`` streams until the run ends."""
    _check_coordinator(federation)
    record = find_run(federation, ref) if ref is None or not ref.isdigit() else None
    run_id = latest_flower_run_id(record) if record else int(str(ref))
    mode = "--stream" if follow else "--show"
    command = flwr_command("log", str(run_id), CONNECTION, mode)
    return subprocess.call(command, env=operator_env(federation), cwd=federation.state_dir)


def collect_run(federation: FederationConfig, ref: str | None, destination: str | Path) -> Path:
    """Copy a run folder (final model, metrics, summary, plots, checkpoints) out of the coordinator.

    ``destination`` ending in ``.tar.gz`` gets an archive; otherwise a folder of that name.

    Raises
    ------
    RunError
        When the run folder does not exist yet.
    """
    record = find_run(federation, ref)
    run_dir = Path(record.run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: the run has not written its folder yet (see `flowerbed run status`)")
    destination = Path(destination).expanduser()
    if destination.name.endswith(".tar.gz"):
        destination.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(destination, "w:gz") as archive:
            archive.add(run_dir, arcname=run_dir.name)
        return destination
    if destination.exists():
        raise RunError(f"{destination} already exists; choose a new folder or a .tar.gz name")
    shutil.copytree(run_dir, destination)
    return destination
