"""A hospital's node: check local data offline, then join the federation as a Flower SuperNode.

``flowerbed node start --kit KIT --data PATH`` runs two processes:

- Flower's SuperNode (through ``flowerbed.client.supernode_launcher``, without Flower's fixed
  waits on a round's path; ``--poll-interval 0``: ``flower-supernode`` as it is) with the kit's CA
  certificate (``--root-certificates``: the node talks only to a coordinator the federation CA
  vouches for), its private key (``--auth-supernode-private-key``:
  the coordinator admits only registered keys), ``--isolation process`` (the SuperNode starts no
  app itself) and a SuperExec secret made at every start (``--superexec-auth-secret-file``: only
  the node's own executor may take its tasks);
- flowerbed's executor (``flowerbed.client.warm_executor``), which runs each message as the
  hospital's installed ``flowerbed.client.app:app`` and refuses a run whose app bundle names or
  carries other code; by default in a child forked from an interpreter that already imported
  torch and flowerbed. It asks the SuperNode for work when the SuperNode says it pulled a message
  (a byte appended to ``state/executor.wake``).

Before it starts them, the node checks that the coordinator speaks what the node expects: TLS with
a kit, plain HTTP with ``--insecure``; a mismatch fails at once with what to do. On SIGTERM or
Ctrl-C both processes and every message's process stop within seconds.

The node's settings reach the ClientApp through Flower's node config (a TOML file in the node's
state folder): ``data-path``, ``site``, and when given ``ledger``, ``budget-epsilon``,
``budget-delta`` and ``approvals``. When the SuperNode stops, its last words are turned into a
message that says what went wrong and what to do.
"""

from __future__ import annotations

import collections
import os
import re
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from flowerbed.client.node_config import parse_node_config
from flowerbed.client.supernode_launcher import DEFAULT_POLL_INTERVAL, poll_interval_problem
from flowerbed.exception import DataError, NodeError
from flowerbed.experiment import Experiment
from flowerbed.kit import NodeKit
from flowerbed.process_control import (
    StopSignal,
    child_env,
    flower_executable,
    popen_ignoring_interrupt,
    stop_processes,
)

INSECURE_WARNING = (
    "WARNING: this node runs with --insecure: no TLS (model updates cross the network "
    "unencrypted) and no node authentication. Use it only for a trial on one machine."
)
DEFAULT_RUNTIME_PORT = 9094


@dataclass(frozen=True)
class NodeSettings:
    """Everything ``flowerbed node start`` needs, resolved from the kit and the options.

    Parameters
    ----------
    site : str
        The hospital's site name.
    coordinator : str
        The coordinator's address, ``host:port``.
    data_path : Path
        The hospital's data file.
    state_dir : Path
        Where the node keeps its Flower home, node config and log.
    kit : NodeKit | None
        The start-up kit (``None`` only with ``insecure``).
    insecure : bool (default: False)
        No TLS, no node authentication.
    runtime_port : int (default: 9094)
        Local port of the SuperNode's Runtime API (loopback only).
    connect_timeout : float | None (default: 600)
        Give up when the coordinator cannot be reached for this long (``None``: never).
    executor : {"warm", "flower"} (default: "warm")
        ``warm``: flowerbed's executor forks a pre-imported child per message. ``flower``: a new
        process per message, as Flower's own SuperExec does (for comparison). Both run only the
        installed flowerbed ClientApp and refuse bundles that name or carry other code.
    poll_interval : float | None (default: 0.2)
        Cap on the SuperNode's wait between asking for messages while a run is going on (Flower's
        own: 3 s, which an idle node keeps), through ``flowerbed.client.supernode_launcher``, which
        also removes Flower's other fixed waits on a round's path; 0.05 to 3 s, or ``None`` to run
        ``flower-supernode`` as it is.
    extra : dict[str, Any]
        More node-config keys (``ledger``, ``budget-epsilon``, ``budget-delta``, ``approvals``).
    """

    site: str
    coordinator: str
    data_path: Path
    state_dir: Path
    kit: NodeKit | None = None
    insecure: bool = False
    runtime_port: int = DEFAULT_RUNTIME_PORT
    connect_timeout: float | None = 600.0
    executor: str = "warm"
    poll_interval: float | None = DEFAULT_POLL_INTERVAL
    extra: dict[str, Any] = field(default_factory=dict)

    def node_config(self) -> dict[str, Any]:
        """The ClientApp's node config, checked against the node-config schema.

        Raises
        ------
        ConfigError
            Listing every unknown key (with the nearest valid one) and every bad value.
        """
        config: dict[str, Any] = {"data-path": str(self.data_path), "site": self.site, "state": str(self.state_dir)}
        if self.kit is not None and self.kit.node_cert is not None:  # its secure-aggregation identity
            config["identity-key"] = str(self.kit.node_key)
            config["identity-cert"] = str(self.kit.node_cert)
            config["ca-cert"] = str(self.kit.ca_cert)
        config.update({k: v for k, v in self.extra.items() if v is not None})
        parse_node_config(config, source="node config (flowerbed node start)", deployed=True)
        return config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_node_config(settings: NodeSettings) -> Path:
    """Write the node config as TOML (Flower reads ``--node-config FILE.toml``)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    path = settings.state_dir / "node-config.toml"
    path.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in settings.node_config().items()))
    return path


def supernode_command(settings: NodeSettings) -> list[str]:
    """The ``flower-supernode`` command line for this node."""
    if settings.poll_interval is None:
        launcher = [flower_executable("flower-supernode")]
    else:
        problem = poll_interval_problem(settings.poll_interval)
        if problem is not None or settings.poll_interval == 0:
            raise NodeError(problem or "poll_interval 0: use None for Flower's own flower-supernode")
        launcher = [
            sys.executable,
            "-P",  # the working folder is not on sys.path
            "-m",
            "flowerbed.client.supernode_launcher",
            "--poll-interval",
            str(settings.poll_interval),
            "--wake-file",
            str(wake_file(settings)),
            "--",
        ]
    command = [
        *launcher,
        "--superlink",
        settings.coordinator,
        "--node-config",
        str(settings.state_dir / "node-config.toml"),
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(superexec_secret_file(settings)),
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.runtime_port),
    ]
    if settings.connect_timeout is not None:
        command += ["--max-wait-time", str(settings.connect_timeout)]
    if settings.insecure:
        return [*command, "--insecure"]
    if settings.kit is None:
        raise NodeError("a start-up kit is required (--kit KIT) unless --insecure is given")
    return [
        *command,
        "--root-certificates",
        str(settings.kit.ca_cert),
        "--auth-supernode-private-key",
        str(settings.kit.node_key),
    ]


def superexec_secret_file(settings: NodeSettings) -> Path:
    """The SuperExec secret the SuperNode and the node's executor share (made at every start, 0600)."""
    return settings.state_dir / "superexec.secret"


def wake_file(settings: NodeSettings) -> Path:
    """The file the SuperNode appends to for every message it has pulled; the executor watches it."""
    return settings.state_dir / "executor.wake"


def executor_command(settings: NodeSettings, supernode_pid: int) -> list[str]:
    """The node executor's command line (``--spawn``: a new process per message).

    With the launcher (``poll_interval`` set) the executor asks for a task when the SuperNode says
    it has a message (``--wake-file``); under Flower's plain ``flower-supernode`` it polls.
    """
    command = [
        sys.executable,
        "-P",  # the working folder is not on sys.path
        "-m",
        "flowerbed.client.warm_executor",
        "--runtime-api-address",
        f"127.0.0.1:{settings.runtime_port}",
        "--parent-pid",
        str(supernode_pid),
        "--superexec-auth-secret-file",
        str(superexec_secret_file(settings)),
    ]
    if settings.poll_interval is not None:
        command += ["--wake-file", str(wake_file(settings))]
    return command if settings.executor == "warm" else [*command, "--spawn"]


def _write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` readable by this account only (0600), replacing any earlier file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def probe_tls(address: str, timeout: float = 3.0) -> bool | None:
    """Whether the server at ``host:port`` completes a TLS handshake (``None``: it cannot be reached).

    Nothing is sent beyond the handshake and the certificate is not trusted for anything.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except (OSError, ValueError):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(sock, server_hostname=host or None):
            return True
    except ssl.SSLError:
        return False
    except OSError:
        return None
    finally:
        sock.close()


def check_transport(settings: NodeSettings) -> None:
    """Fail at once when the coordinator's transport does not match the node's (TLS or ``--insecure``).

    Raises
    ------
    NodeError
        Naming the option to change; a coordinator that cannot be reached yet is left to the retries.
    """
    tls = probe_tls(settings.coordinator)
    if settings.insecure and tls is True:
        raise NodeError(
            f"--insecure: the coordinator at {settings.coordinator} uses TLS, so a node without TLS can never "
            "connect to it. Start the node with the hospital's kit (--kit KIT) instead of --insecure."
        )
    if not settings.insecure and tls is False:
        raise NodeError(
            f"the coordinator at {settings.coordinator} does not use TLS (it was started with --insecure); this "
            "kit connects only over TLS. Ask the coordinator's operator, or use --insecure for a trial on one machine."
        )


def node_env(settings: NodeSettings) -> dict[str, str]:
    """Environment of the node's processes: its own Flower home, no telemetry, this interpreter's scripts first.

    ``OMP_WAIT_POLICY=PASSIVE`` (unless set): torch's OpenMP threads sleep between operations
    instead of spinning. Spinning threads of a message's process take the CPU from every other
    process on the machine; with a few nodes (or a coordinator) sharing the cores, a round's local
    training of a small model took 5 to 10 s instead of 0.1 s (benchmarks/README.md).
    """
    env = child_env()
    env["FLWR_HOME"] = str(settings.state_dir / "flwr-home")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


_EXPLANATIONS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"code: 2004|Failed to activate SuperNode|No SuperNode found"),
        "the coordinator at {coordinator} refused this node: site {site}'s key is not registered "
        "there, or a node with this kit is already connected to it (Flower answers both alike). "
        "If this kit runs on another machine, or its node stopped less than a minute ago and still "
        "counts as connected, stop that node or wait a minute and start again; otherwise ask the "
        "coordinator's operator to add the site (flowerbed provision --add-site {site}) and restart "
        "the coordinator, then use the kit they send you.",
    ),
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED.*(unable to get local issuer|self.signed|unknown ca)", re.I),
        "the server at {coordinator} presented a TLS certificate that this kit's CA ({ca}) does not "
        "vouch for: the kit belongs to another federation, or the address points at another "
        "server. The node did not connect. Check 'coordinator' in kit.toml and ask the "
        "coordinator's operator for the current kit.",
    ),
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED.*(hostname|IP address mismatch|doesn't match)", re.I),
        "the coordinator's TLS certificate does not name {coordinator}: ask the operator to add "
        "this address to [coordinator] in federation.toml and re-provision (--force).",
    ),
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED.*expired", re.I),
        "the coordinator's TLS certificate has expired: ask the operator to re-provision it.",
    ),
    (
        re.compile(r"Unable to parse the private key"),
        "the kit's node.key ({key}) is not a valid key: ask the coordinator for a new kit.",
    ),
    (
        re.compile(r"Giving up reconnection|ConnectError|Connection refused", re.I),
        "the coordinator at {coordinator} could not be reached: check the address, the firewall "
        "(outgoing TCP to that port) and that the coordinator is running.",
    ),
]


def explain_exit(output: str, settings: NodeSettings) -> str | None:
    """Turn the SuperNode's last output into a sentence that says what to do (None if unknown)."""
    values = {
        "coordinator": settings.coordinator,
        "site": settings.site,
        "ca": settings.kit.ca_cert if settings.kit else "-",
        "key": settings.kit.node_key if settings.kit else "-",
    }
    for pattern, text in _EXPLANATIONS:
        if pattern.search(output):
            return text.format(**values)
    return None


class Node:
    """A running node: the SuperNode and its executor.

    Parameters
    ----------
    settings : NodeSettings
        Resolved settings.
    out : TextIO | None (default: sys.stdout)
        Where the SuperNode's output is echoed (also kept in ``state_dir/supernode.log``).
    """

    def __init__(self, settings: NodeSettings, out: TextIO | None = None) -> None:
        self.settings = settings
        self.out = out if out is not None else sys.stdout
        self.supernode: subprocess.Popen | None = None
        self.executor: subprocess.Popen | None = None
        self.stop_signal: StopSignal | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=200)
        self._pump: threading.Thread | None = None

    def start(self) -> None:
        """Check the coordinator's transport, then start the SuperNode and the executor.

        Raises
        ------
        NodeError
            When ``--insecure`` meets a TLS coordinator, or a kit a coordinator without TLS.
        """
        if self.settings.insecure:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)
        command = supernode_command(self.settings)
        write_node_config(self.settings)
        check_transport(self.settings)
        _write_secret(superexec_secret_file(self.settings), secrets.token_bytes(32))
        wake_file(self.settings).write_bytes(b"")
        env = node_env(self.settings)
        log_file = self.settings.state_dir / "supernode.log"
        self.supernode = popen_ignoring_interrupt(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self._pump = threading.Thread(target=self._copy_output, args=(log_file,), daemon=True)
        self._pump.start()
        self.executor = popen_ignoring_interrupt(executor_command(self.settings, self.supernode.pid), env=env)

    def _copy_output(self, log_file: Path) -> None:
        assert self.supernode is not None and self.supernode.stdout is not None
        with log_file.open("a") as log:
            for line in self.supernode.stdout:
                self._tail.append(line)
                log.write(line)
                log.flush()
                self.out.write(line)
                self.out.flush()

    def run(self) -> int:
        """Start, serve until SIGTERM or Ctrl-C (or until the SuperNode stops), stop everything; the exit code."""
        self.stop_signal = StopSignal().install()
        self.start()
        return self.wait()

    def wait(self) -> int:
        """Serve until SIGTERM or Ctrl-C, or until the SuperNode or the executor exits; then stop both.

        Raises
        ------
        NodeError
            When the SuperNode stopped for a reason the hospital can fix (refused key, wrong CA,
            unreachable coordinator), with what to do, or the executor failed.
        """
        if self.supernode is None:
            return 0
        stop = self.stop_signal or StopSignal().install()
        self.stop_signal = stop
        executor_failed = False
        while not stop.requested and self.supernode.poll() is None:
            if self.executor is not None and self.executor.poll() is not None:
                executor_failed = True
                break
            time.sleep(0.2)
        self.stop()
        if self._pump is not None:
            self._pump.join(timeout=5)
        if stop.requested:
            print(f"node {self.settings.site} stopped", file=self.out, flush=True)
            return 0
        if executor_failed:
            raise NodeError(f"node {self.settings.site}: its executor exited with code {self.executor.returncode}")
        code = self.supernode.returncode
        if code != 0:
            reason = explain_exit("".join(self._tail), self.settings)
            if reason:
                raise NodeError(f"node {self.settings.site}: {reason}")
        return code

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the executor (and every message's process) and the SuperNode: SIGTERM, then SIGKILL."""
        stop_processes([self.executor, self.supernode], grace=timeout)


# ---------------------------------------------------------------------------------------------
# offline data check


if TYPE_CHECKING:
    from flowerbed.client.data_report import DataReport
    from flowerbed.tasks.data.contract import DataContract


@dataclass
class DataCheck:
    """What ``flowerbed node check`` found in a node's data (``report``: the data-quality report)."""

    site: str
    path: Path
    dataset: str
    task: str
    num_train: int
    num_test: int
    num_features: int
    class_counts: dict[int, int]
    notes: list[str] = field(default_factory=list)
    report: DataReport | None = None
    report_paths: tuple[Path, ...] = ()


BUILTIN_SCHEMAS = {"heart-disease", "digits", "breast-cancer"}


def check_node_data(
    data_path: str | Path,
    site: str,
    experiment: Experiment | None = None,
    node_config: dict[str, Any] | None = None,
    *,
    contract: DataContract | None = None,
    report_dir: Path | None = None,
) -> DataCheck:
    """Check a node's data against the federation's data contract and the task, without any network access.

    Reads the file exactly as the ClientApp will (same contract, dialect and split), collects every
    problem into a data-quality report (written to ``report_dir`` as Markdown and JSON when given),
    then checks that the task is allowed on this node, builds its model and runs it on a few rows.

    Parameters
    ----------
    data_path, site : str | Path, str
        The hospital's file and the site's name.
    experiment : Experiment | None
        The run to check against (default: the built-in one, or a CSV run of ``contract``).
    node_config : dict | None
        More node-config keys (``approvals``, ``csv-delimiter``, ``data-contract``, ...).
    contract : DataContract | None
        The federation's contract as the node holds it (its kit's ``contract.json``); the
        experiment's must be the same.
    report_dir : Path | None
        Where ``data-report.md`` and ``data-report.json`` are written.

    Raises
    ------
    DataError
        The file is missing or not text, or (``DataCheckFailed``) has blocking problems: every one
        is listed, and the report holds them all.
    TaskError
        The task is not allowed on this node.
    """
    from flowerbed.client.approval import check_task_approved
    from flowerbed.client.data_report import DataCheckFailed, build_report, contract_mismatch, site_problem
    from flowerbed.client.local_data import dialect_options, node_contract, node_split
    from flowerbed.tasks import resolve_task
    from flowerbed.tasks.data.catalog import (
        CONTRACTS,
        TABULAR,
        dataset_schema,
        load_node_data,
        read_node_table,
        resolve_contract,
        site_from_table,
    )

    path = Path(data_path).expanduser()
    raw_config = {"data-path": str(path), "site": site, **(node_config or {})}
    config = parse_node_config(raw_config, deployed=True)
    held = contract if contract is not None else node_contract(config)
    if experiment is None:
        builtin = held is None or any(c.fingerprint == held.fingerprint for c in CONTRACTS.values())
        experiment = Experiment() if builtin else _contract_experiment(held)
    data = node_split(experiment.data, config)
    report, paths = None, ()
    if data.dataset in TABULAR:
        if not path.exists():
            raise DataError(f"node {site!r}: data-path {str(path)!r} does not exist; set data-path in the node config")
        run = resolve_contract(data)
        problems = [contract_mismatch(held, run)] if held and run and held.fingerprint != run.fingerprint else []
        table = read_node_table(data, path, dialect_options(config), held or run)
        site_data = None
        if not table.blocking:
            try:
                site_data = site_from_table(data, table, site)
                if len(np.unique(site_data.y_train)) < 2:
                    raise DataError(f"{path}: every training row has the same label; a site needs two classes")
            except DataError as exc:
                problems.append(site_problem(exc, path))
                site_data = None
        report = build_report(
            table,
            site,
            site_data,
            test_fraction=data.test_fraction,
            min_test_rows=config.test_rows_needed,
            problems=problems,
        )
        paths = report.write(report_dir) if report_dir is not None else ()
        if report.blocking or site_data is None:
            raise DataCheckFailed(report, paths)
        site_data.source = str(path)
    else:
        site_data = load_node_data(data, path, site)
    schema = site_data.schema
    if experiment.data.dataset in BUILTIN_SCHEMAS:
        expected = dataset_schema(experiment.data, experiment.seed)
        if tuple(schema.input_shape) != tuple(expected.input_shape) or schema.num_classes != expected.num_classes:
            raise DataError(
                f"{path}: rows have shape {schema.input_shape} with {schema.num_classes} classes, but "
                f"dataset {experiment.data.dataset!r} expects {expected.input_shape} with "
                f"{expected.num_classes} classes"
            )
    for name, x in (("train", site_data.x_train), ("test", site_data.x_test)):
        if not np.isfinite(x).all():
            raise DataError(f"{path}: the {name} split has missing or infinite values after preprocessing")
    check_task_approved(experiment.task.name, raw_config)
    task = resolve_task(experiment.task.name, experiment.task.args)
    model = task.build_model(schema)
    import torch

    with torch.no_grad():
        sample = torch.as_tensor(site_data.x_train[:8])
        out = model(sample)
    # class targets: one logit per class; value targets: whatever the task's loss reads, one row per example
    classes = schema.target == "class"
    fits = tuple(out.shape) == (len(sample), schema.num_classes) if classes else len(out) == len(sample)
    if not fits or not torch.isfinite(out).all():
        wanted = f"({len(sample)}, {schema.num_classes})" if classes else f"{len(sample)} rows of"
        raise DataError(
            f"{path}: task {experiment.task.name!r} gave output {tuple(out.shape)} on these rows; "
            f"expected {wanted} finite values"
        )
    labels, counts = np.unique(site_data.y_train, return_counts=True) if classes else ((), ())
    return DataCheck(
        site=site,
        path=path,
        dataset=experiment.data.dataset,
        task=experiment.task.name,
        num_train=site_data.num_train,
        num_test=len(site_data.y_test),
        num_features=schema.num_features,
        class_counts={int(k): int(v) for k, v in zip(labels, counts, strict=True)},
        notes=list(site_data.notes),
        report=report,
        report_paths=paths,
    )


def _contract_experiment(contract: DataContract) -> Experiment:
    """A CSV run of a contract that is not built in (what a kit's contract implies without an experiment)."""
    classes = max(2, len(contract.label.codes))
    return Experiment.model_validate(
        {"data": {"dataset": "csv", "contract": contract.model_dump(mode="json"), "num_classes": classes}}
    )
