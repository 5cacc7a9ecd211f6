"""The coordinator: Flower's SuperLink started with TLS, node authentication and persistent state.

``flowerbed coordinator start FEDERATION.toml`` runs two processes:

- ``flower-superlink`` through ``flowerbed.server.superlink_launcher``, whose Control API admits only
  the operator (the token ``flowerbed provision`` made, see ``flowerbed.server.operator_auth``), with

- TLS from the provisioned CA and coordinator certificate (``--ssl-*``),
- node authentication (``--enable-supernode-auth``): only hospitals whose public key the operator
  registered may connect; every kit's key is registered through Flower's Control API
  (``flwr supernode register``) once the SuperLink answers,
- a persistent SQLite database (``--database``) in the federation's state folder, so runs and
  registered nodes survive a restart,
- ``--disable-runtime-dependency-installation``: nothing is installed per run,
- ``--isolation process`` and ``--superexec-auth-secret-file``: the SuperLink starts no ServerApp
  itself; only the holder of a secret made at every start may take a run's task;
- flowerbed's ServerApp executor (``flowerbed.server.serverapp_executor``), which holds that secret
  and runs each run's ServerApp as the coordinator's installed flowerbed, refusing any bundle that
  names or carries other code (``flowerbed.app_bundle``).

On SIGTERM or Ctrl-C both stop, with every ServerApp process, within seconds
(``flowerbed.process_control``).

Everything the coordinator keeps lives in the state folder (``[coordinator] state``)::

    superlink.db           Flower's state (runs, nodes)
    superlink.log          the SuperLink's log (rotated daily)
    superlink.out          the SuperLink's console output (start-up errors)
    serverapp.out          the ServerApp executor's and ServerApps' console output (refused bundles)
    superexec.secret       the SuperExec secret of this start (0600)
    flwr-home/config.toml  the Flower CLI connection ``flowerbed`` used by ``flowerbed run ...``
    registered-nodes.json  site -> node id and public key, to revoke a rotated or removed key
    runs/                  run folders (final model, metrics, reports)

``--insecure`` starts the SuperLink without TLS and without node authentication (Flower allows
authentication only over TLS), for a trial on one machine; it prints a warning on every start. Its
operator token is ``<state>/operator.token``, made at the first start.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flowerbed import flower_internals
from flowerbed.exception import ConfigError, NodeError
from flowerbed.process_control import StopSignal, child_env, popen_ignoring_interrupt, stop_processes
from flowerbed.server.federation_config import FederationConfig
from flowerbed.server.operator_auth import new_token, read_token
from flowerbed.server.provisioning import ProvisionPaths, write_private

CONNECTION = "flowerbed"
INSECURE_WARNING = (
    "WARNING: the coordinator runs with --insecure: no TLS (model updates cross the network "
    "unencrypted) and no node authentication (any machine that reaches the port can join). "
    "Use it only for a trial on one machine or a closed test network."
)
LOOPBACK_BINDS = {"0.0.0.0", "127.0.0.1", "localhost", "::", "[::]"}
FLOWER_PRIVATE_API_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API", "FLWR_OIDC_ENABLED")


class StopRequested(Exception):
    """SIGTERM or Ctrl-C arrived while the coordinator was starting."""


@dataclass(frozen=True)
class CoordinatorPaths:
    """Files in the coordinator's state folder."""

    state: Path

    @property
    def database(self) -> Path:
        return self.state / "superlink.db"

    @property
    def log_file(self) -> Path:
        return self.state / "superlink.log"

    @property
    def flwr_home(self) -> Path:
        return self.state / "flwr-home"

    @property
    def registry(self) -> Path:
        return self.state / "registered-nodes.json"

    @property
    def runs(self) -> Path:
        return self.state / "runs"

    @property
    def insecure_marker(self) -> Path:
        return self.state / "INSECURE"

    @property
    def superexec_secret(self) -> Path:
        return self.state / "superexec.secret"

    @property
    def insecure_operator_token(self) -> Path:
        return self.state / "operator.token"

    @property
    def serverapp_output(self) -> Path:
        return self.state / "serverapp.out"


def operator_token_file(federation: FederationConfig, insecure: bool | None = None) -> Path:
    """The operator's token file: provisioned with TLS, in the state folder with ``--insecure``.

    ``insecure=None`` asks the state folder how the coordinator was last started.
    """
    paths = CoordinatorPaths(federation.state_dir)
    if insecure is None:
        insecure = paths.insecure_marker.exists()
    return paths.insecure_operator_token if insecure else ProvisionPaths(federation.output_dir).operator_token


def local_address(federation: FederationConfig) -> str:
    """The address operator commands on the coordinator's machine use to reach the SuperLink."""
    host = federation.coordinator.bind_host
    if host in LOOPBACK_BINDS:
        host = "127.0.0.1"
    return f"{host}:{federation.coordinator.port}"


def flower_env(federation: FederationConfig) -> dict[str, str]:
    """Environment for Flower processes and ``flwr`` commands of this coordinator.

    This interpreter's folder comes first on ``PATH``: the SuperLink and its children find this
    environment's Flower scripts also when the virtual environment is not activated.
    """
    env = child_env({k: v for k, v in os.environ.items() if k not in FLOWER_PRIVATE_API_SWITCHES})
    env["FLWR_HOME"] = str(CoordinatorPaths(federation.state_dir).flwr_home)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    return env


def write_cli_connection(federation: FederationConfig, insecure: bool) -> Path:
    """Write the Flower CLI connection ``flowerbed`` into the coordinator's Flower home.

    ``flwr run``, ``flwr ls``, ``flwr log``, ``flwr stop`` and ``flwr supernode register`` then reach
    this SuperLink's Control API with the federation CA (or without TLS when insecure).
    """
    paths = CoordinatorPaths(federation.state_dir)
    paths.flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{local_address(federation)}"',
    ]
    if insecure:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{ProvisionPaths(federation.output_dir).coordinator_ca}"')
    config = paths.flwr_home / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def superlink_command(federation: FederationConfig, *, insecure: bool = False) -> list[str]:
    """The ``flower-superlink`` command line for this federation (through flowerbed's launcher).

    Raises
    ------
    ConfigError
        When TLS files or the operator token are missing (run ``flowerbed provision`` first).
    """
    paths = CoordinatorPaths(federation.state_dir)
    command = [
        sys.executable,
        "-P",  # the working folder is not on sys.path
        "-m",
        "flowerbed.server.superlink_launcher",
        "--operator-token-file",
        str(operator_token_file(federation, insecure)),
        "--parent-pid",
        str(os.getpid()),
        "--",
        "--host",
        federation.coordinator.bind_host,
        "--port",
        str(federation.coordinator.port),
        "--database",
        str(paths.database),
        "--disable-runtime-dependency-installation",
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(paths.superexec_secret),
        "--log-file",
        str(paths.log_file),
    ]
    if insecure:
        return [*command, "--insecure"]
    tls = ProvisionPaths(federation.output_dir)
    needed = (tls.ca_cert, tls.server_cert, tls.server_key, tls.operator_token)
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise ConfigError(
            str(federation.output_dir),
            [f"{p} is missing: run `flowerbed provision FEDERATION.toml` first" for p in missing],
        )
    return [
        *command,
        "--ssl-ca-certfile",
        str(tls.ca_cert),
        "--ssl-certfile",
        str(tls.server_cert),
        "--ssl-keyfile",
        str(tls.server_key),
        "--enable-supernode-auth",
    ]


def executor_command(federation: FederationConfig, *, insecure: bool, superlink_pid: int) -> list[str]:
    """The ServerApp executor's command line (it stops when the SuperLink is gone)."""
    command = [
        sys.executable,
        "-P",  # the working folder is not on sys.path
        "-m",
        "flowerbed.server.serverapp_executor",
        "--runtime-api-address",
        local_address(federation),
        "--superexec-auth-secret-file",
        str(CoordinatorPaths(federation.state_dir).superexec_secret),
        "--parent-pid",
        str(superlink_pid),
    ]
    if insecure:
        return [*command, "--insecure"]
    return [*command, "--root-certificates", str(ProvisionPaths(federation.output_dir).coordinator_ca)]


def wait_until_ready(
    federation: FederationConfig,
    *,
    insecure: bool,
    timeout: float = 60.0,
    process: subprocess.Popen | None = None,
    stop: StopSignal | None = None,
) -> None:
    """Wait until the SuperLink answers its health endpoint.

    Raises
    ------
    NodeError
        If the process exits or the SuperLink does not answer within ``timeout`` seconds.
    StopRequested
        If ``stop`` records SIGTERM or Ctrl-C meanwhile.
    """
    import httpx

    scheme = "http" if insecure else "https"
    url = f"{scheme}://{local_address(federation)}/health"
    ca = ProvisionPaths(federation.output_dir).coordinator_ca
    verify: bool | ssl.SSLContext = False if insecure else ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop is not None and stop.requested:
            raise StopRequested
        if process is not None and process.poll() is not None:
            raise NodeError(
                f"flower-superlink exited with code {process.returncode} before it was ready; "
                f"see {CoordinatorPaths(federation.state_dir).state / 'superlink.out'}"
            )
        try:
            if httpx.get(url, verify=verify, timeout=2.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise NodeError(f"the coordinator did not answer at {url} within {timeout:.0f} s")


class _ControlClient:
    """Flower's Control API client for this coordinator (the one ``flwr supernode`` uses), as the operator."""

    def __init__(self, federation: FederationConfig, insecure: bool) -> None:
        from flwr.cli.typing import SuperLinkConnection
        from flwr.cli.utils import init_http_client_from_connection

        token = read_token(operator_token_file(federation, insecure))
        ca = None if insecure else str(ProvisionPaths(federation.output_dir).coordinator_ca)
        connection = SuperLinkConnection(
            name=CONNECTION, address=local_address(federation), root_certificates=ca, insecure=insecure
        )
        previous = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = str(CoordinatorPaths(federation.state_dir).flwr_home)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.client = init_http_client_from_connection(
                    connection, auth_plugin=flower_internals.operator_cli_auth_plugin(token)
                )
        finally:
            if previous is None:
                os.environ.pop("FLWR_HOME", None)
            else:
                os.environ["FLWR_HOME"] = previous

    def register(self, key_file: Path) -> tuple[int | None, str]:
        """Register a public key: (node id, "") or (None, Flower's reason)."""
        from flwr.cli.supernode.register import try_load_public_key
        from flwr.proto.control_pb2 import RegisterNodeRequest

        try:
            reply = self.client.RegisterNode(RegisterNodeRequest(public_key=try_load_public_key(key_file)))
        except Exception as exc:  # httpx.HTTPStatusError carries Flower's error as JSON
            return None, _flower_reason(exc)
        return int(reply.node_id), ""

    def unregister(self, node_id: int) -> tuple[bool, str]:
        """Unregister a node id: (True, "") or (False, Flower's reason)."""
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        try:
            self.client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
        except Exception as exc:
            return False, _flower_reason(exc)
        return True, ""

    def close(self) -> None:
        self.client.close()


def _flower_reason(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    message = flower_internals.flower_error_message(response.text) if response is not None else None
    return message or str(exc)


def register_nodes(
    federation: FederationConfig, log: Callable[[str], None] = print, *, insecure: bool = False
) -> dict[str, int]:
    """Register every provisioned site's public key; revoke keys that were rotated or removed.

    Uses Flower's Control API, as ``flwr supernode register`` and ``unregister`` do. Idempotent:
    a key Flower already knows is left as it is. Returns site -> Flower node id for the keys
    registered by this or an earlier call (``registered-nodes.json``).

    Raises
    ------
    NodeError
        If Flower refuses a key for another reason than "already in use".
    """
    paths = CoordinatorPaths(federation.state_dir)
    tls = ProvisionPaths(federation.output_dir)
    registry: dict[str, dict] = json.loads(paths.registry.read_text()) if paths.registry.exists() else {}
    control = _ControlClient(federation, insecure)
    try:
        for site in federation.site_names():
            key_file = tls.registered_key(site)
            if not key_file.is_file():
                log(f"site {site}: no key in {key_file}; run `flowerbed provision` to make its kit")
                continue
            public = key_file.read_text().strip()
            known = registry.get(site)
            node_id, reason = control.register(key_file)
            if node_id is not None:
                if known and known.get("node_id") and known.get("public_key") != public:
                    ok, why = control.unregister(int(known["node_id"]))
                    log(f"site {site}: old key {'revoked' if ok else f'not revoked ({why})'}")
                registry[site] = {"public_key": public, "node_id": node_id}
                log(f"site {site}: key registered (node {node_id})")
            elif "already in use" in reason:
                log(f"site {site}: key already registered")
            else:
                raise NodeError(f"site {site}: the coordinator refused key {key_file}: {reason}")
        for site in sorted(set(registry) - set(federation.site_names())):
            ok, why = control.unregister(int(registry[site]["node_id"]))
            log(f"site {site} is no longer in the federation file: key {'revoked' if ok else f'not revoked ({why})'}")
            del registry[site]
    finally:
        control.close()
    paths.registry.write_text(json.dumps(registry, indent=2, sort_keys=True) + "\n")
    return {site: int(entry["node_id"]) for site, entry in registry.items()}


class Coordinator:
    """A running coordinator for one federation: the SuperLink and flowerbed's ServerApp executor.

    Parameters
    ----------
    federation : FederationConfig
        The validated federation file.
    insecure : bool (default: False)
        No TLS and no node authentication; prints ``INSECURE_WARNING``.
    """

    def __init__(self, federation: FederationConfig, *, insecure: bool = False) -> None:
        self.federation = federation
        self.insecure = insecure
        self.paths = CoordinatorPaths(federation.state_dir)
        self.process: subprocess.Popen | None = None
        self.executor: subprocess.Popen | None = None
        self.stop_signal: StopSignal | None = None

    def start(self, *, timeout: float = 60.0, log: Callable[[str], None] = print) -> None:
        """Start the SuperLink, wait until it answers, start the executor, register the provisioned nodes.

        Raises
        ------
        StopRequested
            When ``stop_signal`` records SIGTERM or Ctrl-C before the coordinator is up (all stopped).
        """
        if self.insecure:
            print(INSECURE_WARNING, file=sys.stderr, flush=True)
        self.paths.state.mkdir(parents=True, exist_ok=True)
        self.paths.runs.mkdir(exist_ok=True)
        token_file = operator_token_file(self.federation, self.insecure)
        if self.insecure and not token_file.exists():
            write_private(token_file, new_token())
        command = superlink_command(self.federation, insecure=self.insecure)
        read_token(token_file)  # a clear error now rather than from the SuperLink's log
        write_cli_connection(self.federation, self.insecure)
        if self.insecure:
            self.paths.insecure_marker.write_text(INSECURE_WARNING + "\n")
        else:
            self.paths.insecure_marker.unlink(missing_ok=True)
        write_private(self.paths.superexec_secret, secrets.token_bytes(32))
        env = flower_env(self.federation)
        with (self.paths.state / "superlink.out").open("a") as output:
            self.process = popen_ignoring_interrupt(
                command, cwd=self.paths.state, env=env, stdout=output, stderr=subprocess.STDOUT
            )
        try:
            wait_until_ready(
                self.federation, insecure=self.insecure, timeout=timeout, process=self.process, stop=self.stop_signal
            )
            with self.paths.serverapp_output.open("a") as output:
                self.executor = popen_ignoring_interrupt(
                    executor_command(self.federation, insecure=self.insecure, superlink_pid=self.process.pid),
                    cwd=self.paths.state,
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            if not self.insecure:
                register_nodes(self.federation, log)
        except BaseException:
            self.stop()
            raise
        log(
            f"coordinator listening on {self.federation.coordinator.address} "
            f"({'INSECURE' if self.insecure else 'TLS, node authentication'}, runs only by its operator); "
            f"state in {self.paths.state}"
        )

    def run(self, *, timeout: float = 60.0, log: Callable[[str], None] = print) -> int:
        """Start, serve until SIGTERM or Ctrl-C (or until a process fails), stop everything; the exit code."""
        self.stop_signal = StopSignal().install()
        try:
            self.start(timeout=timeout, log=log)
        except StopRequested:
            log("coordinator stopped before it was up")
            return 0
        return self.wait(log=log)

    def wait(self, log: Callable[[str], None] = print) -> int:
        """Serve until SIGTERM or Ctrl-C, or until the SuperLink or the executor exits; then stop both.

        Raises
        ------
        NodeError
            When the SuperLink or the executor stopped on its own (names its output file).
        """
        if self.process is None:
            return 0
        stop = self.stop_signal or StopSignal().install()
        self.stop_signal = stop
        failed: str | None = None
        while not stop.requested:
            if self.process.poll() is not None:
                output = self.paths.state / "superlink.out"
                failed = f"flower-superlink exited with code {self.process.returncode}; see {output}"
                break
            if self.executor is not None and self.executor.poll() is not None:
                failed = (
                    f"the ServerApp executor exited with code {self.executor.returncode}; "
                    f"see {self.paths.serverapp_output}"
                )
                break
            time.sleep(0.2)
        self.stop()
        if failed:
            raise NodeError(failed)
        log("coordinator stopped")
        return 0

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the executor (and its ServerApps) and the SuperLink: SIGTERM, SIGKILL after ``timeout`` s."""
        stop_processes([self.executor, self.process], grace=timeout)
