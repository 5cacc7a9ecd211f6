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
- ``expected-nodes``: how many hospitals to wait for,
- ``site-max-examples``: the federation file's ``max_examples`` per site (JSON), the most weight
  each site's replies may claim.

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

import flowerbed
from flowerbed.config_utils import find_file
from flowerbed.exception import RunError
from flowerbed.experiment import experiment_data, parse_experiment
from flowerbed.protocol import EPSILON_SCOPE
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
site-max-examples = ""
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

    A relative path is looked up in the working directory, then in flowerbed itself (its bundled
    ``simulations/experiments/*.toml``). Returns the text, the experiment's name and its number of
    clients (the default number of nodes to wait for). Validation errors name the file and the key,
    before anything is sent.
    """
    path = find_file(experiment_path)
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
    caps = {site.name: site.max_examples for site in federation.sites if site.max_examples is not None}
    run_config.write_text(
        tomli_w.dumps(
            {
                "experiment": text,
                "run-dir": str(run_dir),
                "resume": False,
                "expected-nodes": nodes,
                "site-max-examples": json.dumps(caps, sort_keys=True) if caps else "",
            }
        )
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
    """Continue a run folder from its last checkpoint as a new Flower run (e.g. after a stop or a restart).

    A stop request left in the run folder (``STOP``) is withdrawn first.

    Raises
    ------
    RunError
        When the run folder has no checkpoint yet (start it again instead), or its newest checkpoint
        cannot be resumed (``checkpoint.latest_state``: a ``metrics.jsonl`` without its history).
    """
    _check_coordinator(federation)
    record = find_run(federation, ref)
    run_dir = Path(record.run_dir)
    if not (run_dir / "checkpoints" / "LATEST").is_file():
        raise RunError(f"{run_dir}: no checkpoint to resume from; start the run again with `flowerbed run start`")
    from flowerbed.server.checkpoint import latest_state

    latest_state(run_dir)  # its history must be whole (metrics.jsonl) before a run is submitted
    config = tomllib.loads(Path(record.run_config).read_text())
    config["resume"] = True
    resume_config = Path(record.run_config).with_name(f"{record.name}.resume.toml")
    resume_config.write_text(tomli_w.dumps(config))
    _stop_quietly(federation, record)
    (run_dir / STOP_FILE).unlink(missing_ok=True)
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


# ---------------------------------------------------------------------------------------------
# the run folder, read without the training stack (``run status`` answers at once)

STOP_FILE = "STOP"  # the round loop's stop request (``flowerbed.server.federation.STOP_FILE``)
ROUND_SENT = "round-sent.json"  # the last round whose training went out (``flowerbed.server.run_folder``)


def _json_file(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSONL file (a torn last line is left out)."""
    try:
        lines = path.read_text().split("\n")[:-1]
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def checkpointed_round(run_dir: Path) -> int:
    """The round of the run folder's newest complete checkpoint (0: none)."""
    try:
        return int((run_dir / "checkpoints" / "LATEST").read_text().strip().removeprefix("round-"))
    except (OSError, ValueError):
        return 0


def round_in_progress(run_dir: Path) -> int | None:
    """The round whose training went out to the sites and whose checkpoint is not written yet, if any."""
    sent = _json_file(run_dir / ROUND_SENT).get("round")
    if isinstance(sent, int) and sent > checkpointed_round(run_dir) and not (run_dir / "summary.json").is_file():
        return sent
    return None


def _round_timeout(run_dir: Path) -> float:
    train = _json_file(run_dir / "experiment.json").get("train") or {}
    return float(train.get("round_timeout") or 600.0)


def stop_run(
    federation: FederationConfig,
    ref: str | None = None,
    *,
    now: bool = False,
    timeout: float | None = None,
    log: Callable[[str], None] = print,
) -> RunRecord:
    """Stop a run once its round in progress is checkpointed (``now``: at once); resume continues it.

    A round whose training went out to the sites and that is cut short is trained again by
    ``run resume``, and every site that had trained it is charged for it twice in its ledger. So
    while a round is in progress this asks the round loop to stop before its next round (the
    run folder's ``STOP`` file) and waits up to ``timeout`` seconds (default: twice the
    experiment's ``train.round_timeout``, plus a minute) for the round's checkpoint; then it
    stops the Flower run. ``now`` stops it at once, and says which round will be trained again.
    """
    _check_coordinator(federation)
    record = find_run(federation, ref)
    run_dir = Path(record.run_dir)
    run_id = latest_flower_run_id(record)
    pending = round_in_progress(run_dir)
    if pending is not None and not now:
        (run_dir / STOP_FILE).write_text("stop before the next round (flowerbed run stop)\n")
        limit = timeout if timeout is not None else 2 * _round_timeout(run_dir) + 60
        log(
            f"run {record.name}: round {pending} is in progress; it stops after that round's checkpoint "
            f"(waiting up to {limit:.0f} s; --now stops it at once)"
        )
        deadline, asked = time.monotonic() + limit, time.monotonic()
        while round_in_progress(run_dir) == pending and time.monotonic() < deadline:
            if time.monotonic() - asked >= 10:  # a run that failed or was stopped elsewhere never checkpoints
                asked = time.monotonic()
                if str(flower_status(federation, run_id).get("status", "")).startswith("finished"):
                    break
            time.sleep(0.5)
        pending = round_in_progress(run_dir)
    if (run_dir / "summary.json").is_file():
        return record  # it ended on its own, before its next round
    result = _flwr(federation, "stop", str(run_id), CONNECTION, "--format", "json")
    try:
        _json_reply(result, "flwr stop")
    except RunError:
        if not str(flower_status(federation, run_id).get("status", "")).startswith("finished"):
            raise
    if pending is not None:
        log(
            f"run {record.name}: stopped during round {pending}, after its training went out: `flowerbed run "
            f"resume` trains round {pending} again, and each site that had trained it is charged for it twice"
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


def progress_reason(status: dict[str, Any]) -> str:
    """One sentence on where the run stands and, when it made no progress or stopped, why.

    Built from the run folder alone (``summary.json``'s ``stopped``, ``refused``,
    ``budget_exhausted``, ``left_out`` and ``excluded``, and ``metrics.jsonl``) and Flower's status.
    """
    summary, flower = status["summary"], status["status"]
    done = status["rounds_done"]
    if summary:
        stopped = summary.get("stopped")
        if not summary.get("rounds_completed"):
            gone = [
                f"{what}{', '.join(sites)}"
                for what, sites in (
                    ("privacy budget spent at ", summary.get("budget_exhausted")),
                    ("left the run: ", summary.get("left_out")),
                    ("did not take part: ", summary.get("excluded")),
                )
                if sites
            ]
            return f"no progress: no round completed ({'; '.join(gone) or stopped or 'no reason recorded'})"
        if stopped:
            return f"stopped after round {done}: {stopped}"
        return f"finished: {summary.get('rounds_completed')} of {summary.get('rounds_planned')} rounds"
    if status["stopping"]:
        return f"stopping: it stops after round {status['in_progress'] or done + 1} (`flowerbed run stop`)"
    if flower.startswith("finished"):
        pending = status["in_progress"]
        cut = f"; round {pending} was cut short after its training went out" if pending else ""
        details = f" ({status['status_details']})" if status["status_details"] else ""
        resume = "`flowerbed run resume` continues it" if done else "nothing to resume: start it again"
        return f"ended without a summary after round {done}{details}{cut}; {resume}"
    if not status["folder"]:
        if flower.startswith("running"):
            return "starting: the coordinator's ServerApp has not written the run folder yet"
        return "submitted: waiting for the coordinator's ServerApp to start"
    if status["in_progress"]:
        return f"running: round {status['in_progress']} in progress"
    return f"running: {done} rounds done" if done else "running: waiting for the nodes and the first round"


def run_status(federation: FederationConfig, ref: str | None = None, *, ask_flower: bool = True) -> dict[str, Any]:
    """A run's progress from its run folder (rounds, sites, metrics, epsilon per site) and Flower.

    Returns
    -------
    dict
        ``name``, ``run_dir``, ``flower_run_id``, ``status``, ``rounds_done``, ``rounds``,
        ``participants`` and ``refused`` of the last round, ``sites`` (every site that took
        part in any round), ``metrics`` (last round: ``train``, ``evaluate``, ``central``),
        ``epsilon`` (site -> the epsilon it last reported: cumulative at its ledger, see
        ``epsilon_scope``), ``epsilon_max``, ``excluded`` (nodes that refused the run at its start,
        with their reason), ``budget_exhausted`` and ``left_out`` (sites that left the run, and
        why), ``stopped`` (why the round loop stopped early), ``retrained`` (round -> sites that
        trained it twice: interrupted after its training went out, then resumed), ``in_progress``,
        ``stopping``, ``reason`` (one sentence: where the run stands, and why it made no progress
        or stopped), ``final`` (final metrics) and ``finished``.
    """
    record = find_run(federation, ref)
    run_dir = Path(record.run_dir)
    records = _json_lines(run_dir / "metrics.jsonl")
    rounds = _json_file(run_dir / "experiment.json").get("rounds")
    last = records[-1] if records else {}
    sites: list[str] = []
    epsilon: dict[str, float] = {}
    retrained: dict[str, list[str]] = {}
    for rec in records:
        for site in rec.get("participants") or []:
            if site not in sites:
                sites.append(site)
        for site, values in (rec.get("sites") or {}).items():
            if isinstance(values, dict) and values.get("epsilon") is not None:
                epsilon[site] = float(values["epsilon"])
        if rec.get("retrained"):
            retrained[str(rec["round"])] = list(rec["retrained"])
    flower = flower_status(federation, latest_flower_run_id(record)) if ask_flower else {}
    summary = _json_file(run_dir / "summary.json")
    status: dict[str, Any] = {
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
        "epsilon_scope": EPSILON_SCOPE,
        "excluded": summary.get("excluded", {}),
        "budget_exhausted": summary.get("budget_exhausted", {}),
        "left_out": summary.get("left_out", {}),
        "stopped": summary.get("stopped"),
        "retrained": retrained,
        "in_progress": round_in_progress(run_dir),
        "stopping": (run_dir / STOP_FILE).is_file() and not summary,
        "folder": run_dir.is_dir(),
        "final": summary.get("final", {}),
        "finished": bool(summary),
        "summary": summary,
    }
    status["reason"] = progress_reason(status)
    del status["summary"]
    return status


def stream_logs(federation: FederationConfig, ref: str | None = None, *, follow: bool = False) -> int:
    """Print a run's log (Flower's ``flwr log``); ``follow`` streams until the run ends."""
    _check_coordinator(federation)
    record = find_run(federation, ref) if ref is None or not ref.isdigit() else None
    run_id = latest_flower_run_id(record) if record else int(str(ref))
    mode = "--stream" if follow else "--show"
    command = flwr_command("log", str(run_id), CONNECTION, mode)
    return subprocess.call(command, env=operator_env(federation), cwd=federation.state_dir)


ReportWriter = Callable[[Sequence[Path]], list[Path]]


def collect_run(
    federation: FederationConfig,
    ref: str | None,
    destination: str | Path,
    *,
    report: ReportWriter | None = None,
) -> tuple[Path, list[Path]]:
    """Copy a run folder (final model, metrics, summary, report, checkpoints) out of the coordinator.

    ``report`` (``flowerbed report``'s writer) first draws the run's report into its folder, so the
    copy carries it; a run with no completed round has none. ``destination`` ending in
    ``.tar.gz`` gets an archive; otherwise a folder of that name. Returns the copy and the report's
    files in the run folder.

    Raises
    ------
    RunError
        When the run folder does not exist yet, or the destination folder already does.
    """
    record = find_run(federation, ref)
    run_dir = Path(record.run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: the run has not written its folder yet (see `flowerbed run status`)")
    destination = Path(destination).expanduser()
    archive = destination.name.endswith(".tar.gz")
    if not archive and destination.exists():
        raise RunError(f"{destination} already exists; choose a new folder or a .tar.gz name")
    written = report([run_dir]) if report is not None and _json_lines(run_dir / "metrics.jsonl") else []
    if archive:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(destination, "w:gz") as tar:
            tar.add(run_dir, arcname=run_dir.name)
        return destination, written
    shutil.copytree(run_dir, destination)
    return destination, written
