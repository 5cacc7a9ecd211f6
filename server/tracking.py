"""Experiment tracking: MLflow and TensorBoard, fed by the round loop's reporter.

``run_federation`` wraps its reporter with ``with_tracking``, so a simulation and a deployed
ServerApp log the same things when the experiment's ``[tracking]`` asks for them:

- the resolved experiment as parameters (``train.lr``, ``privacy.noise_multiplier``, ...);
- every round (step = round): ``train/*``, ``federated/*``, ``validation/*``, ``central/*``,
  ``sites/participants``, ``sites/refused``, ``epsilon/max`` and per site ``site/<site>/<metric>``
  (``site/<site>/epsilon`` is the epsilon the node reported for its dataset);
- at the end: ``final/*`` metrics, and ``summary.json``, ``experiment.json``, ``metrics.jsonl`` and
  the final models as MLflow artifacts (``log_report`` adds ``plots/`` once a report is drawn).

MLflow writes to a file store in the run folder (``mlflow/``) unless ``tracking.mlflow_uri`` names
a server or database; TensorBoard writes event files to ``tensorboard/``. ``tracking.json`` in the
run folder keeps the MLflow run's id, so a resumed run goes on in the same MLflow run. Both
packages are the optional extra ``flowerbed[tracking]`` and are imported only when switched on.
A tracking failure during the run is reported once and never stops the federation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flowerbed.exception import ConfigError
from flowerbed.experiment import Experiment, TrackingConfig
from flowerbed.server.federation import Reporter, SilentReporter

EXTRA = 'pip install "flowerbed[tracking]"'
STATE_FILE = "tracking.json"
MLFLOW_DIR = "mlflow"
TENSORBOARD_DIR = "tensorboard"
ARTIFACTS = ("summary.json", "experiment.json", "metrics.jsonl", "model.safetensors", "model.pt2", "best.safetensors")
_PARAM_LIMIT = 6000  # MLflow's longest parameter value
_BATCH = 100
GROUPS = (("train", "train"), ("evaluate", "federated"), ("validation", "validation"), ("central", "central"))
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- /]")


def check_available(config: TrackingConfig) -> None:
    """Fail before the run starts when a switched-on tracker's package is not installed.

    Raises
    ------
    ConfigError
        Naming the key and the extra to install.
    """
    wanted = {"tracking.mlflow": ("mlflow", config.mlflow), "tracking.tensorboard": ("tensorboard", config.tensorboard)}
    missing = [
        f"{key} = true needs the {module} package, which is not installed: {EXTRA}"
        for key, (module, on) in wanted.items()
        if on and importlib.util.find_spec(module) is None
    ]
    if missing:
        raise ConfigError("experiment (tracking)", missing)


def with_tracking(experiment: Experiment, run_dir: Path, reporter: Reporter | None) -> Reporter | None:
    """``reporter`` wrapped in a ``TrackingReporter`` when ``[tracking]`` switches a tracker on, else unchanged."""
    config = experiment.tracking
    if not (config.mlflow or config.tensorboard):
        return reporter
    check_available(config)
    return TrackingReporter(reporter, config, run_dir)


@contextlib.contextmanager
def failures_recorded(reporter: Reporter | None) -> Iterator[None]:
    """Mark the tracked run as failed (and close its writers) when the block raises."""
    try:
        yield
    except BaseException as exc:
        if isinstance(reporter, TrackingReporter):
            reporter.run_failed(exc)
        raise


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _key(*parts: str) -> str:
    return "/".join(_UNSAFE.sub("_", p) for p in parts)


def round_metrics(record: dict[str, Any]) -> dict[str, float]:
    """One ``metrics.jsonl`` record as flat, named scalars (the names both trackers use)."""
    out: dict[str, float] = {}
    for group, label in GROUPS:
        for name, value in (record.get(group) or {}).items():
            if (number := _number(value)) is not None:
                out[_key(label, name)] = number
    out["sites/participants"] = float(len(record.get("participants") or []))
    out["sites/refused"] = float(len(record.get("refused") or {}))
    if (eps := _number(record.get("epsilon_max"))) is not None:
        out["epsilon/max"] = eps
    for site, values in (record.get("sites") or {}).items():
        for name, value in (values or {}).items():
            if (number := _number(value)) is not None:
                out[_key("site", site, name)] = number
    return out


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's final figures as flat, named scalars (``final/...``)."""
    final = summary.get("final") or {}
    out: dict[str, float] = {}
    for group in ("federated", "central"):
        for name, value in (final.get(group) or {}).items():
            if (number := _number(value)) is not None:
                out[_key("final", group, name)] = number
    for site, values in (final.get("sites") or {}).items():
        for name, value in (values or {}).items():
            if (number := _number(value)) is not None:
                out[_key("final", "site", site, name)] = number
    for site, value in ((summary.get("epsilon") or {}).get("per_site") or {}).items():
        if (number := _number(value)) is not None:
            out[_key("final", "site", site, "epsilon")] = number
    return out


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested configuration as ``a.b.c -> text`` (lists and empty tables as JSON)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text[:_PARAM_LIMIT]
    return out


def _read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, run_dir / STATE_FILE)


def mlflow_uri(config: TrackingConfig, run_dir: Path) -> str:
    """Where MLflow writes: ``tracking.mlflow_uri``, else the file store ``<run folder>/mlflow``."""
    return config.mlflow_uri or (run_dir / MLFLOW_DIR).resolve().as_uri()


def _mlflow_client(uri: str) -> Any:
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store in maintenance mode behind this switch; the run folder's own
        # store is a plain local record, as TensorBoard's event files are.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class _MlflowSink:
    """One MLflow run per run folder (a resumed run goes on in the same one)."""

    def __init__(self, config: TrackingConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.uri = mlflow_uri(config, run_dir)
        self.client = _mlflow_client(self.uri)
        self.run_id = ""

    def start(self, experiment: Experiment, first_round: int, state: dict[str, Any]) -> None:
        previous = state.get("mlflow_run_id") if state.get("mlflow_uri") == self.uri else None
        if previous:
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
            return
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        name = self.config.mlflow_experiment or experiment.name
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except MlflowException:  # another run created it meanwhile
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = found.experiment_id
        tags = {"flowerbed.run_dir": str(self.run_dir.resolve()), "flowerbed.strategy": experiment.strategy.name}
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flat_params(experiment.to_dict()).items()]
        for i in range(0, len(params), _BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + _BATCH])
        self.client.log_batch(self.run_id, tags=[RunTag("flowerbed.first_round", str(first_round))])
        state.update(mlflow_run_id=self.run_id, mlflow_uri=self.uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def finish(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        stopped = summary.get("stopped") or ""
        self.client.log_batch(
            self.run_id,
            tags=[
                RunTag("flowerbed.rounds_completed", str(summary.get("rounds_completed", 0))),
                RunTag("flowerbed.stopped", str(stopped)[:_PARAM_LIMIT]),
            ],
        )
        for name in ARTIFACTS:
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        if (self.run_dir / "plots").is_dir():
            self.client.log_artifacts(self.run_id, str(self.run_dir / "plots"), "plots")
        if not summary.get("rounds_completed"):
            status = "FAILED"
        elif str(stopped).startswith("stopped by the operator"):
            status = "KILLED"
        else:
            status = "FINISHED"
        self.client.set_terminated(self.run_id, status=status)

    def fail(self, exc: BaseException) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag("flowerbed.error", str(exc)[:_PARAM_LIMIT])])
        self.client.set_terminated(self.run_id, status="FAILED")


class _TensorBoardSink:
    """Event files in ``<run folder>/tensorboard``; a resumed run drops events past its checkpoint."""

    def __init__(self, run_dir: Path) -> None:
        self.log_dir = run_dir / TENSORBOARD_DIR
        self.writer: Any = None

    def start(self, experiment: Experiment, first_round: int, state: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.log_dir), purge_step=first_round if first_round > 1 else None)
        if first_round == 1:
            text = json.dumps(experiment.to_dict(), indent=2)
            self.writer.add_text("experiment", "    " + text.replace("\n", "\n    "), 0)

    def metrics(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        if summary.get("stopped"):
            self.writer.add_text("stopped", str(summary["stopped"]), int(summary.get("rounds_completed") or 0))
        self.writer.close()

    def fail(self, exc: BaseException) -> None:
        self.writer.add_text("error", str(exc))
        self.writer.close()


class TrackingReporter:
    """A ``Reporter`` that forwards every call to ``inner`` and logs to MLflow and TensorBoard.

    Parameters
    ----------
    inner : Reporter | None
        The display it wraps (terminal, Flower's log, or nothing).
    config : TrackingConfig
        The experiment's ``[tracking]`` section.
    run_dir : Path
        The run folder (MLflow's default store, TensorBoard's events and ``tracking.json`` live there).
    """

    def __init__(self, inner: Reporter | None, config: TrackingConfig, run_dir: Path) -> None:
        self.inner: Reporter = inner or SilentReporter()
        self.config = config
        self.run_dir = run_dir
        self.sinks: dict[str, Any] = {}
        self.state: dict[str, Any] = {}

    def _safely(self, name: str, action: str, call: Any, *args: Any) -> None:
        sink = self.sinks.get(name)
        if sink is None:
            return
        try:
            call(sink, *args)
        except Exception as exc:  # tracking never stops a federated run
            self.sinks.pop(name)
            self.inner.note(f"tracking: {name} failed to {action} ({exc}); {name} logging is off for this run")

    def run_started(self, experiment: Experiment, run_dir: Path, first_round: int) -> None:
        """Open the MLflow run (or reopen it on resume) and the TensorBoard writer; log the experiment.

        Raises
        ------
        ConfigError
            When MLflow cannot open its store (names ``tracking.mlflow_uri``).
        """
        self.run_dir = run_dir
        self.state = _read_state(run_dir) if first_round > 1 else {}
        if self.config.mlflow:
            try:
                sink = _MlflowSink(self.config, run_dir)
                sink.start(experiment, first_round, self.state)
            except Exception as exc:
                raise ConfigError(
                    "experiment (tracking.mlflow_uri)",
                    [f"MLflow could not open {mlflow_uri(self.config, run_dir)!r}: {exc}"],
                ) from exc
            self.sinks["MLflow"] = sink
        if self.config.tensorboard:
            board = _TensorBoardSink(run_dir)
            board.start(experiment, first_round, self.state)
            self.sinks["TensorBoard"] = board
        _write_state(run_dir, self.state)
        self.inner.run_started(experiment, run_dir, first_round)
        self._catch_up(first_round)

    def _catch_up(self, first_round: int) -> None:
        """On resume, log the checkpointed rounds this tracker had not seen (e.g. a crash right after one)."""
        if first_round <= 1:
            return
        from flowerbed.server.run_folder import read_metrics

        logged = int(self.state.get("logged_round", 0))
        for record in read_metrics(self.run_dir):
            if logged < record["round"] < first_round:
                self._log_round(record)

    def _log_round(self, record: dict[str, Any]) -> None:
        values = round_metrics(record)
        step = int(record["round"])
        for name in list(self.sinks):
            self._safely(name, "log a round", lambda s, v=values: s.metrics(v, step))
        self.state["logged_round"] = step
        _write_state(self.run_dir, self.state)

    def round_finished(self, record: dict[str, Any], total_rounds: int, elapsed: float) -> None:
        """Forward, then log the round's metrics at step = round."""
        self.inner.round_finished(record, total_rounds, elapsed)
        self._log_round(record)

    def note(self, text: str) -> None:
        """Forward."""
        self.inner.note(text)

    def run_finished(self, summary: dict[str, Any]) -> None:
        """Log the final figures and artifacts, close both trackers, then forward."""
        values = final_metrics(summary)
        step = int(summary.get("rounds_completed") or 0)
        for name in list(self.sinks):
            self._safely(name, "log the final figures", lambda s: s.metrics(values, step))
            self._safely(name, "finish", lambda s: s.finish(summary))
        self.sinks.clear()
        self.inner.run_finished(summary)

    def run_failed(self, exc: BaseException) -> None:
        """Mark the tracked run as failed, with the error, and close both trackers."""
        for name in list(self.sinks):
            self._safely(name, "record the failure", lambda s: s.fail(exc))
        self.sinks.clear()


def log_report(run_dir: Path) -> bool:
    """Add a drawn report (``plots/``) and the latest ``summary.json`` to the run's MLflow run.

    For reports drawn after the run ended (``flowerbed simulate`` draws them last). Returns
    ``False`` when the run folder was not tracked with MLflow.
    """
    state = _read_state(run_dir)
    if not state.get("mlflow_run_id"):
        return False
    client = _mlflow_client(state["mlflow_uri"])
    if (run_dir / "summary.json").is_file():
        client.log_artifact(state["mlflow_run_id"], str(run_dir / "summary.json"))
    if (run_dir / "plots").is_dir():
        client.log_artifacts(state["mlflow_run_id"], str(run_dir / "plots"), "plots")
    return True
