"""A hospital's node: check local data offline, then join the federation as a Flower SuperNode.

``flowerbed node start --kit KIT --data PATH`` runs two processes:

- ``flower-supernode`` with the kit's CA certificate (``--root-certificates``: the node talks only
  to a coordinator the federation CA vouches for), its private key (``--auth-supernode-private-key``:
  the coordinator admits only registered keys), and ``--isolation process``;
- flowerbed's warm executor (``flowerbed.client.warm_executor``), which runs each message's
  ClientApp in a child forked from an interpreter that already imported torch and flowerbed.

The node's settings reach the ClientApp through Flower's node config (a TOML file in the node's
state folder): ``data-path``, ``site``, and when given ``ledger``, ``budget-epsilon``,
``budget-delta`` and ``approvals``. When the SuperNode stops, its last words are turned into a
message that says what went wrong and what to do.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from flowerbed.client.node_config import parse_node_config
from flowerbed.exception import DataError, NodeError
from flowerbed.experiment import Experiment
from flowerbed.kit import NodeKit

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
        ``warm``: flowerbed's warm executor forks a pre-imported child per message. ``flower``:
        Flower's own SuperExec starts a new ``flwr-clientapp`` process per message.
    poll_interval : float | None (default: None)
        Cap on the SuperNode's idle wait between asking for messages (Flower's own: 3 s), through
        ``flowerbed.client.supernode_launcher``; ``None`` runs ``flower-supernode`` as it is. On a
        2-core machine shared by the coordinator and four nodes a 0.25 s cap gained nothing
        (benchmarks/README.md): the ServerApp's own 3 s poll and CPU dominate.
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
    poll_interval: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def node_config(self) -> dict[str, Any]:
        """The ClientApp's node config, checked against the node-config schema.

        Raises
        ------
        ConfigError
            Listing every unknown key (with the nearest valid one) and every bad value.
        """
        config: dict[str, Any] = {"data-path": str(self.data_path), "site": self.site}
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


def _executable(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else shutil.which(name) or name


def supernode_command(settings: NodeSettings) -> list[str]:
    """The ``flower-supernode`` command line for this node."""
    if settings.poll_interval is None:
        launcher = [_executable("flower-supernode")]
    else:
        launcher = [
            sys.executable,
            "-m",
            "flowerbed.client.supernode_launcher",
            "--poll-interval",
            str(settings.poll_interval),
            "--",
        ]
    command = [
        *launcher,
        "--superlink",
        settings.coordinator,
        "--node-config",
        str(settings.state_dir / "node-config.toml"),
        "--isolation",
        "process" if settings.executor == "warm" else "subprocess",
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


def executor_command(settings: NodeSettings, supernode_pid: int) -> list[str]:
    """The warm executor's command line."""
    return [
        sys.executable,
        "-m",
        "flowerbed.client.warm_executor",
        "--runtime-api-address",
        f"127.0.0.1:{settings.runtime_port}",
        "--parent-pid",
        str(supernode_pid),
    ]


def node_env(settings: NodeSettings) -> dict[str, str]:
    """Environment of the node's processes: its own Flower home, no telemetry."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(settings.state_dir / "flwr-home")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


_EXPLANATIONS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"code: 2004|Failed to activate SuperNode|No SuperNode found"),
        "the coordinator at {coordinator} refused this node: site {site}'s key is not registered "
        "there. Ask the coordinator's operator to add the site (flowerbed provision --add-site "
        "{site}) and restart the coordinator, then use the kit they send you.",
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
    """A running node: the SuperNode and its warm executor.

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
        self._tail: collections.deque[str] = collections.deque(maxlen=200)
        self._pump: threading.Thread | None = None

    def start(self) -> None:
        """Start the SuperNode and the warm executor."""
        if self.settings.insecure:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)
        write_node_config(self.settings)
        env = node_env(self.settings)
        log_file = self.settings.state_dir / "supernode.log"
        self.supernode = subprocess.Popen(
            supernode_command(self.settings),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._pump = threading.Thread(target=self._copy_output, args=(log_file,), daemon=True)
        self._pump.start()
        if self.settings.executor != "warm":
            return
        self.executor = subprocess.Popen(
            executor_command(self.settings, self.supernode.pid),
            env=env,
        )

    def _copy_output(self, log_file: Path) -> None:
        assert self.supernode is not None and self.supernode.stdout is not None
        with log_file.open("a") as log:
            for line in self.supernode.stdout:
                self._tail.append(line)
                log.write(line)
                log.flush()
                self.out.write(line)
                self.out.flush()

    def wait(self) -> int:
        """Block until the SuperNode exits; forward SIGINT/SIGTERM.

        Raises
        ------
        NodeError
            When the SuperNode stopped for a reason the hospital can fix (refused key, wrong CA,
            unreachable coordinator), with what to do.
        """
        if self.supernode is None:
            return 0

        def forward(signum: int, _frame: object) -> None:
            self.stop()

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        code = self.supernode.wait()
        if self._pump is not None:
            self._pump.join(timeout=5)
        self.stop()
        if code != 0:
            reason = explain_exit("".join(self._tail), self.settings)
            if reason:
                raise NodeError(f"node {self.settings.site}: {reason}")
        return code

    def stop(self, timeout: float = 10.0) -> None:
        """Stop both processes (the executor's message children finish or follow it)."""
        for process in (self.executor, self.supernode):
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)


# ---------------------------------------------------------------------------------------------
# offline data check


@dataclass
class DataCheck:
    """What ``flowerbed node check`` found in a node's data."""

    site: str
    path: Path
    dataset: str
    task: str
    num_train: int
    num_test: int
    num_features: int
    class_counts: dict[int, int]
    notes: list[str] = field(default_factory=list)


BUILTIN_SCHEMAS = {"heart-disease", "digits", "breast-cancer"}


def check_node_data(
    data_path: str | Path,
    site: str,
    experiment: Experiment | None = None,
    node_config: dict[str, Any] | None = None,
) -> DataCheck:
    """Validate a node's data against the task's schema, without any network access.

    Loads the file exactly as the ClientApp will, compares its shape with the dataset's schema,
    checks that the task is allowed on this node, builds the task's model and runs it on a few
    rows.

    Raises
    ------
    DataError
        The file is missing, unreadable, or does not match the schema (names the file).
    TaskError
        The task is not allowed on this node.
    """
    from flowerbed.client.approval import check_task_approved
    from flowerbed.tasks import resolve_task
    from flowerbed.tasks.data.catalog import dataset_schema, load_node_data

    experiment = experiment or Experiment()
    path = Path(data_path).expanduser()
    site_data = load_node_data(experiment.data, path, site)
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
    check_task_approved(experiment.task.name, {"data-path": str(path), "site": site, **(node_config or {})})
    task = resolve_task(experiment.task.name, experiment.task.args)
    model = task.build_model(schema)
    import torch

    with torch.no_grad():
        sample = torch.as_tensor(site_data.x_train[:8])
        out = model(sample)
    if tuple(out.shape) != (len(sample), schema.num_classes) or not torch.isfinite(out).all():
        raise DataError(
            f"{path}: task {experiment.task.name!r} gave output {tuple(out.shape)} on these rows; "
            f"expected ({len(sample)}, {schema.num_classes}) finite values"
        )
    labels, counts = np.unique(site_data.y_train, return_counts=True)
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
    )
