"""``flowerbed simulate``: run an experiment's federation on one machine and leave a report."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from flowerbed.client.app import app as client_app
from flowerbed.client.node_round import SIM_NODE_DIR_ENV
from flowerbed.client.secagg_handlers import IDENTITY_DIR, simulated_identity_paths
from flowerbed.exception import ConfigError
from flowerbed.experiment import Experiment, parse_experiment
from flowerbed.process_control import flower_logs_once
from flowerbed.server.federation import STOP_FILE, SilentReporter
from flowerbed.server.progress import ConsoleReporter
from flowerbed.server.run_folder import new_run_dir, read_experiment, read_summary, write_summary
from flowerbed.server.runner import run_federation
from flowerbed.simulations.research.central import make_central_evaluator
from flowerbed.strategies.registry import build_strategy
from flowerbed.tasks.data.catalog import load_federation
from flowerbed.tasks.task import SiteData

NODES_DIR = "nodes"


def _server_app(experiment: Experiment, run_dir: Path, sites: list[SiteData], resume: bool, reporter, outcome: dict):
    app = ServerApp()
    central = make_central_evaluator(experiment, sites) if experiment.evaluate.central else None

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome["summary"] = run_federation(
                grid,
                experiment,
                run_dir,
                expected_nodes=len(sites),
                resume=resume,
                central_evaluator=central,
                reporter=reporter,
            )
        except BaseException as exc:  # re-raised in the caller's thread, with its own message
            outcome["error"] = exc

    return app


@contextlib.contextmanager
def virtual_nodes_home(folder: Path) -> Iterator[None]:
    """Keep the virtual hospitals' own state (their privacy ledger) in ``folder`` while a simulation runs.

    It is the nodes' side of the run folder: the coordinator's code never reads it, and a resumed
    run's nodes find their releases there.
    """
    previous = os.environ.get(SIM_NODE_DIR_ENV)
    os.environ[SIM_NODE_DIR_ENV] = str(folder)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(SIM_NODE_DIR_ENV, None)
        else:
            os.environ[SIM_NODE_DIR_ENV] = previous


def make_node_identities(folder: Path, sites: list[str]) -> None:
    """A throwaway federation CA and one identity per virtual node, for secure aggregation.

    Each virtual node (partition ``i``) gets a node key and a certificate naming its site, under
    ``folder`` (``ca.pem``, ``partition-<i>/node.key``, ``node.crt``); the CA's key is never written,
    so nothing else can be issued under it. The nodes check one another exactly as deployed nodes do.
    """
    from cryptography.hazmat.primitives import serialization

    from flowerbed.privacy.secagg.identity import throwaway_federation

    lowered = [s.lower() for s in sites]
    usable = len(set(lowered)) == len(sites) and all(0 < len(s) <= 64 for s in sites)
    names = list(sites) if usable else [f"partition-{i}" for i in range(len(sites))]
    _, ca_cert, identities = throwaway_federation(names)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for partition, name in enumerate(names):
        identity = identities[name]
        key_path, cert_path, _ = simulated_identity_paths(folder, partition)
        key_path.parent.mkdir(parents=True, exist_ok=True)
        key_path.unlink(missing_ok=True)
        key = identity.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        with os.fdopen(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(key)
        cert_path.write_bytes(_der_to_pem(identity.certificate))


def _der_to_pem(der: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def bundled_experiment(name: str) -> Path:
    """Path of an experiment file shipped with flowerbed (``heart``, ``digits_dirichlet``, ...)."""
    return Path(str(resources.files("flowerbed.simulations").joinpath("experiments", f"{name}.toml")))


def backend_line(experiment: Experiment, num_nodes: int) -> str | None:
    """What starts before the first round when it is slow (Ray: 20 s or more), said before it starts."""
    backend = experiment.backend
    where = f"the Ray cluster at {backend.ray_address}" if backend.ray_address else None
    if backend.name == "flower":
        cpus = os.cpu_count() or 1
        return (
            f"starting Flower's simulation engine (Ray) for {num_nodes} virtual nodes on {where or f'{cpus} CPUs'}: "
            "Ray's start takes 20 s or more on a small machine (backend.name = 'inline' needs none) ..."
        )
    if backend.workers > 1 and backend.vectorize:
        return (
            f"starting Ray with {backend.workers} workers{f' on {where}' if where else ''} for {num_nodes} "
            "virtual nodes: Ray's start takes 20 s or more on a small machine ..."
        )
    return None  # in this process: the first round starts at once


def run_backend(experiment: Experiment, server_app: ServerApp, num_nodes: int) -> None:
    """Execute the apps on the experiment's backend (the seam between harness and engine)."""
    if experiment.backend.name == "flower":
        from flowerbed.simulations.engine.flower_backend import run_on_flower

        run_on_flower(server_app, client_app, num_nodes, experiment.backend)
        return
    if experiment.backend.name == "inline":
        from flowerbed.simulations.engine.inline_backend import run_inline

        run_inline(experiment, server_app, client_app, num_nodes)
        return
    raise ConfigError("experiment", [f"backend.name = {experiment.backend.name!r} is unknown"])


def simulate(
    experiment: Experiment,
    *,
    quiet: bool = False,
    run_dir: Path | None = None,
    resume: bool = False,
    console: Console | None = None,
) -> Path:
    """Run (or resume) a simulated federation; return its run folder.

    The data is loaded and checked before any engine starts, so a bad dataset or partition fails
    in a second with a message that names the key.
    """
    build_strategy(experiment.strategy)  # a strategy that cannot run here fails now, not after the engine starts
    sites = load_federation(experiment.data, experiment.seed)
    flower_logs_once()
    if not quiet:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    else:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    made = run_dir is None
    if run_dir is None:
        run_dir = new_run_dir(experiment)
    reporter = SilentReporter() if quiet else ConsoleReporter(console)
    outcome: dict[str, Any] = {}
    try:
        server_app = _server_app(experiment, run_dir, sites, resume, reporter, outcome)
        if experiment.secagg.enabled:
            make_node_identities(run_dir / NODES_DIR / IDENTITY_DIR, [s.name for s in sites])
        if not quiet and (line := backend_line(experiment, len(sites))):
            (console or Console(highlight=False)).print(line)
        with virtual_nodes_home(run_dir / NODES_DIR):
            run_backend(experiment, server_app, len(sites))
        if "error" in outcome:
            raise outcome["error"]
    except BaseException:
        if made:
            remove_unfinished_run_dir(run_dir)
        raise
    summary = outcome.get("summary") or read_summary(run_dir)
    if experiment.evaluate.local_baselines and summary:
        from flowerbed.simulations.research.baselines import local_only_baselines
        from flowerbed.simulations.research.comparison import comparison_summary, print_comparison

        summary["comparison"] = comparison_summary(summary, local_only_baselines(experiment, sites))
        write_summary(run_dir, summary)
        if not quiet:
            print_comparison(summary["comparison"], console or Console(highlight=False))
    if experiment.evaluate.plots and (summary or {}).get("rounds_completed", 1):  # no round, nothing to draw
        from flowerbed.simulations.research.report import write_report

        written = write_report([run_dir])
        if not quiet:
            (console or Console(highlight=False)).print(
                f"plots: {', '.join(p.name for p in written)} in {written[0].parent}"
            )
    if experiment.tracking.mlflow:  # the plots and the final summary are made after the round loop's tracking
        from flowerbed.server.tracking import log_report

        log_report(run_dir)
    return run_dir


def remove_unfinished_run_dir(run_dir: Path) -> bool:
    """Remove the folder of a run that failed before completing a round (nothing to report or resume).

    Such a folder would only break ``flowerbed report runs/<name>-*``; one with a checkpoint is kept
    (``flowerbed resume`` continues it).
    """
    if (run_dir / "checkpoints" / "LATEST").is_file() or (run_dir / "summary.json").is_file():
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def resume_simulation(run_dir: Path, *, quiet: bool = False, console: Console | None = None) -> Path:
    """Continue a simulated run from its last complete round (an operator's stop request is withdrawn)."""
    experiment = parse_experiment(read_experiment(run_dir), str(run_dir / "experiment.json"))
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    return simulate(experiment, quiet=quiet, run_dir=run_dir, resume=True, console=console)
