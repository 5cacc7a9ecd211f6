"""Each side keeps its own promises against an attacker, on real processes on 127.0.0.1.

- Only the operator starts, lists and stops runs: an outsider holding the CA certificate, or a
  hospital's whole kit, is refused by the coordinator (``flwr ls``, ``flwr run``, raw HTTP), and
  nobody but the coordinator's own executor can take a run's task from the Runtime API.
- Nodes and the coordinator run only their installed flowerbed: a run whose app bundle names other
  code or carries code is refused by the coordinator (even when the operator's token submits it)
  and by every node (when a malicious coordinator sends it), and the attacker's code never runs:
  the marker file it writes on import never appears.
- SIGTERM stops ``flowerbed coordinator start``, ``flowerbed node start`` and ``flowerbed run logs
  --follow`` within 10 s, with every process they started, and without a traceback.
- ``flowerbed node start --insecure`` against a TLS coordinator fails at once with what to do.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from flwr.cli.build import build_fab_from_disk

from flowerbed.app_bundle import AppBundleRefused, bundle_problems, check_app_bundle
from flowerbed.benchmarks.deployment_harness import (
    HEART_DATA,
    HEART_TOML,
    Deployment,
    free_port,
    wait_for,
    write_federation,
)
from flowerbed.process_control import descendants
from flowerbed.server.coordinator import CoordinatorPaths
from flowerbed.server.federation_config import load_federation
from flowerbed.server.operator_auth import REFUSAL, TokenCheck
from flowerbed.server.provisioning import ProvisionPaths, provision
from flowerbed.server.run_control import app_dir, flwr_command, operator_env

SITES = ["cleveland", "hungary"]
FLWR = str(Path(sys.executable).with_name("flwr"))
STOP_SECONDS = 10.0

ATTACKER_PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "helpful-app"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "attacker"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"
"""

ATTACKER_SERVER = """\
import json, os, time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

Path({markers!r}, f"server-code-ran-{{os.getpid()}}").write_text("the attacker's ServerApp ran")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.time() + 90
    nodes = []
    while time.time() < deadline and len(nodes) < {expected}:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    content = RecordDict({{"config": ConfigRecord({{"send": "data-path"}})}})
    messages = [Message(content, dst_node_id=node, message_type="query") for node in nodes]
    replies = grid.send_and_receive(messages, timeout=90)
    found = [{{"error": r.error.reason if r.has_error() else None}} for r in replies]
    Path({replies!r}).write_text(json.dumps(found))
"""

ATTACKER_CLIENT = """\
import os
from pathlib import Path

from flwr.clientapp import ClientApp

Path({markers!r}, f"client-code-ran-{{os.getpid()}}").write_text("the attacker's ClientApp ran")
app = ClientApp()
"""


def _attacker_app(folder: Path, markers: Path, replies: Path, *, own_components: bool, expected: int = 2) -> Path:
    """An app folder that carries code; its components are the attacker's own or flowerbed's."""
    folder.mkdir(parents=True)
    components = (
        {"serverapp": "flowerbed.server.app:app", "clientapp": "flowerbed.client.app:app"}
        if own_components
        else {"serverapp": "attacker_server:app", "clientapp": "attacker_client:app"}
    )
    (folder / "pyproject.toml").write_text(ATTACKER_PYPROJECT.format(**components))
    (folder / "attacker_server.py").write_text(
        ATTACKER_SERVER.format(markers=str(markers), replies=str(replies), expected=expected)
    )
    (folder / "attacker_client.py").write_text(ATTACKER_CLIENT.format(markers=str(markers)))
    return folder


def _outsider_home(folder: Path, address: str, ca: Path) -> dict[str, str]:
    """A Flower CLI home whose only connection is the coordinator, trusting ``ca``."""
    (folder / "config.toml").parent.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(
        f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
    )
    return dict(os.environ, FLWR_HOME=str(folder), FLWR_TELEMETRY_ENABLED="0")


def _cli(command: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> tuple[int, str]:
    import subprocess

    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    return result.returncode, result.stdout + result.stderr


def _no_traceback(*logs: Path) -> None:
    for log in logs:
        text = log.read_text() if log.is_file() else ""
        assert "Traceback" not in text, f"{log.name} has a traceback:\n{text[-3000:]}"


# ------------------------------------------------------------------------------- no processes


def _zip(files: dict[str, bytes], link: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def test_only_a_code_free_flowerbed_bundle_passes(tmp_path: Path) -> None:
    federation = load_federation(write_federation(tmp_path, SITES, free_port()))
    own = build_fab_from_disk(app_dir(federation))
    assert bundle_problems(own) == []  # what `flowerbed run start` submits
    pyproject = (app_dir(federation) / "pyproject.toml").read_bytes()

    foreign = build_fab_from_disk(_attacker_app(tmp_path / "a", tmp_path, tmp_path / "r", own_components=False))
    problems = " ".join(bundle_problems(foreign))
    assert "names other code" in problems and "carries a code file: 'attacker_server.py'" in problems
    carried = build_fab_from_disk(_attacker_app(tmp_path / "b", tmp_path, tmp_path / "r", own_components=True))
    assert bundle_problems(carried) == [
        "carries a code file: 'attacker_client.py'",
        "carries a code file: 'attacker_server.py'",
    ]
    for files, reason in [
        ({"pyproject.toml": pyproject, "evil.pth": b"import os"}, "carries a code file: 'evil.pth'"),
        ({"pyproject.toml": pyproject, "m.cpython-311.so": b"\x7fELF"}, "carries a code file"),
        ({"pyproject.toml": pyproject, "../../.bashrc.toml": b"x = 1"}, "a file outside the bundle"),
        ({"pyproject.toml": pyproject.replace(b"dependencies = []", b'dependencies = ["evil"]')}, "packages"),
        ({"README.md": b"no pyproject"}, "has no pyproject.toml"),
    ]:
        assert reason in " ".join(bundle_problems(_zip(files))), files
    assert "carries a link" in " ".join(bundle_problems(_zip({"pyproject.toml": pyproject}, link="x.toml")))
    assert "not a readable zip" in bundle_problems(b"not a zip")[0]
    with pytest.raises(AppBundleRefused, match="refused run 7: its app bundle names other code"):
        check_app_bundle(foreign, 7)


def test_the_operator_token_is_private_and_never_in_a_kit(tmp_path: Path) -> None:
    federation = load_federation(write_federation(tmp_path, SITES, free_port()))
    provision(federation)
    paths = ProvisionPaths(federation.output_dir)
    token = paths.operator_token.read_text().strip()
    assert paths.operator_token.parent == paths.coordinator and len(token) >= 40
    assert stat.S_IMODE(paths.operator_token.stat().st_mode) == 0o600
    for site in SITES:
        for file in paths.kit(site).rglob("*"):
            assert file.name != "operator.token" and token not in file.read_text(errors="replace"), file
    provision(federation, force=True)  # re-provisioning keeps the operator's token
    assert paths.operator_token.read_text().strip() == token
    check = TokenCheck(token)
    assert check(token) and not check(None) and not check("") and not check(token[:-1])


def test_the_node_tells_a_tls_coordinator_from_a_plain_one(tmp_path: Path) -> None:
    import socket
    import ssl
    import threading

    from flowerbed.client.node import probe_tls

    federation = load_federation(write_federation(tmp_path, SITES, free_port()))
    provision(federation)
    paths = ProvisionPaths(federation.output_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(paths.server_cert, paths.server_key)

    def serve(server: socket.socket, tls: bool) -> None:
        with server:
            connection, _ = server.accept()
            with connection:
                if tls:
                    with context.wrap_socket(connection, server_side=True) as wrapped:
                        wrapped.recv(1)
                else:
                    connection.recv(1024)
                    connection.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

    for tls in (True, False):
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        thread = threading.Thread(target=serve, args=(server, tls), daemon=True)
        thread.start()
        assert probe_tls(f"127.0.0.1:{port}") is tls
        thread.join(timeout=5)
    assert probe_tls(f"127.0.0.1:{free_port()}") is None  # nobody listens: left to the node's retries


# ---------------------------------------------------------------------------- real processes


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_only_the_operator_runs_and_the_coordinator_runs_only_flowerbed(tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    federation_file = write_federation(tmp_path, SITES, port)
    federation = load_federation(federation_file)
    provision(federation)
    kits = federation.output_dir / "kits"
    markers = tmp_path / "markers"
    markers.mkdir()
    foreign = _attacker_app(tmp_path / "foreign-app", markers, tmp_path / "replies.json", own_components=False)
    carried = _attacker_app(tmp_path / "carried-app", markers, tmp_path / "replies.json", own_components=True)
    state = CoordinatorPaths(federation.state_dir)

    with Deployment(tmp_path) as d:
        d.start_coordinator(federation_file)

        # an outsider who holds only the CA certificate, and one who holds a hospital's whole kit
        ca_only = tmp_path / "outsider" / "ca.pem"
        ca_only.parent.mkdir()
        ca_only.write_bytes((kits / "cleveland" / "ca.pem").read_bytes())
        for home, ca in (
            (tmp_path / "outsider" / "flwr", ca_only),
            (tmp_path / "hospital" / "flwr", kits / "hungary" / "ca.pem"),
        ):
            env = _outsider_home(home, address, ca)
            for args in (["ls", "target", "--format", "json"], ["run", str(foreign), "target", "--format", "json"]):
                _, output = _cli([FLWR, *args], env, tmp_path)
                reply = json.loads(output[output.index("{") :])
                assert reply["success"] is False and REFUSAL in reply["error-message"], output
        kit = kits / "hungary"
        verify = str(kit / "ca.pem")
        for headers in ({}, {"Authorization": f"Bearer {(kit / 'node.pub').read_text().strip()}"}):
            reply = httpx.post(f"https://{address}/v1/control/list-runs", headers=headers, verify=verify, timeout=10)
            assert reply.status_code == 403 and REFUSAL in reply.text, reply.text
        # the Runtime API: only the coordinator's own executor (SuperExec secret) may take a run's task
        assert _take_a_task(address, kit / "ca.pem") == "refused: 401"

        # the operator's own run commands work: a run that waits for nine hospitals
        started = d.run(["run", "start", str(HEART_TOML), "-f", str(federation_file), "--nodes", "9"])
        assert started.returncode == 0, started.stdout + started.stderr
        wait_for(lambda: d.status(federation_file)["status"] == "running", 120, f"the run to start\n{d.tail()}")

        # a bundle that carries code is refused by the coordinator even with the operator's token
        for app, name in ((foreign, "other code"), (carried, "carried code")):
            code, output = _cli(
                [*flwr_command("run", str(app), "flowerbed", "--format", "json")], operator_env(federation), tmp_path
            )
            assert code == 0, output
            run_id = json.loads(output[output.index("{") :])["run-id"]
            line = f"flowerbed coordinator: refused run {run_id}: its app bundle"
            wait_for(
                lambda line=line: line in state.serverapp_output.read_text(), 90, f"the refusal of {name}\n{d.tail()}"
            )

            def run_status(run_id: int = run_id) -> str:
                _, listed = _cli(
                    [*flwr_command("ls", "flowerbed", "--run-id", str(run_id), "--format", "json")],
                    operator_env(federation),
                    tmp_path,
                )
                return json.loads(listed[listed.index("{") :])["runs"][0]["status"]

            # the refusal is logged before the SuperLink records the run's end: wait for the record
            wait_for(lambda f=run_status: f().startswith("finished"), 60, f"{name}'s run to end\n{d.tail()}")
            assert run_status().startswith("finished:failed"), run_status()

        # SIGTERM: `flowerbed run logs --follow`, then `--insecure` against TLS, then the coordinator
        logs = d.spawn("logs", ["run", "logs", "--follow", "-f", str(federation_file)])
        wait_for(lambda: descendants(logs.pid), 60, f"`flowerbed run logs` to start `flwr log`\n{d.tail()}")
        time.sleep(3)  # the stream is open
        elapsed, left = d.sigterm("logs")
        print(f"`flowerbed run logs --follow` stopped {elapsed:.1f} s after SIGTERM")
        assert elapsed < STOP_SECONDS and not left, (elapsed, left, d.tail())
        _no_traceback(d.log("logs"))

        insecure = d.spawn(
            "node-insecure",
            [
                *("node", "start", "--insecure", "--coordinator", address, "--site", "cleveland"),
                *("--data", str(HEART_DATA / "processed.cleveland.data"), "--state", str(tmp_path / "insecure-state")),
            ],
        )
        began = time.monotonic()
        wait_for(lambda: insecure.poll() is not None, 30, "--insecure against TLS to give up")
        print(f"`flowerbed node start --insecure` against TLS gave up after {time.monotonic() - began:.1f} s")
        assert time.monotonic() - began < 20 and insecure.returncode != 0
        assert "uses TLS" in d.log("node-insecure").read_text() and "--kit" in d.log("node-insecure").read_text()

        elapsed, left = d.sigterm("coordinator")
        print(f"`flowerbed coordinator start` stopped {elapsed:.1f} s after SIGTERM")
        assert elapsed < STOP_SECONDS and not left, (elapsed, left, d.tail())
        _no_traceback(d.log("coordinator"), state.state / "superlink.out", state.serverapp_output)
        assert not d.leftovers(), d.leftovers()
    assert list(markers.iterdir()) == [], "the attacker's code ran on the coordinator"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nodes_run_only_their_installed_flowerbed(tmp_path: Path) -> None:
    """A malicious coordinator (plain Flower, its own code) sends its run to two flowerbed nodes."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    markers = tmp_path / "markers"
    markers.mkdir()
    replies = tmp_path / "replies.json"
    app = _attacker_app(tmp_path / "attacker-app", markers, replies, own_components=False)
    home = tmp_path / "attacker-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "attacker"\n\n[superlink.attacker]\naddress = "{address}"\ninsecure = true\n'
    )
    bin_dir = str(Path(sys.executable).parent)
    attacker_env = dict(
        os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", PATH=f"{bin_dir}:{os.environ.get('PATH', '')}"
    )

    with Deployment(tmp_path) as d:
        d.markers.add(f"127.0.0.1:{port}")
        superlink = [str(Path(bin_dir) / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)]
        d.spawn_command("attacker", [*superlink, "--disable-runtime-dependency-installation"], env=attacker_env)
        wait_for(lambda: _health(address), 60, f"the attacker's SuperLink\n{d.tail()}")
        for site, executor in (("cleveland", "warm"), ("hungary", "flower")):
            d.start_node(
                site,
                "--insecure",
                "--coordinator",
                address,
                "--site",
                site,
                "--state",
                str(tmp_path / f"state-{site}"),
                "--runtime-port",
                str(free_port()),
                "--executor",
                executor,
            )
        code, output = _cli([FLWR, "run", str(app), "attacker", "--format", "json"], attacker_env, tmp_path)
        assert code == 0, output
        run_id = json.loads(output[output.index("{") :])["run-id"]
        wait_for(lambda: replies.is_file(), 200, f"the attacker's replies\n{d.tail()}")

        errors = [r["error"] for r in json.loads(replies.read_text())]
        assert len(errors) == 2 and all(e and f"refused run {run_id}" in e for e in errors), errors
        for site in ("cleveland", "hungary"):
            log = d.log(f"node-{site}").read_text()
            assert f"flowerbed node: refused run {run_id}: its app bundle names other code" in log, log
        assert not any(p.name.startswith("client-code-ran") for p in markers.iterdir()), "attacker code ran on a node"

        for site in ("cleveland", "hungary"):
            elapsed, left = d.sigterm(f"node-{site}")
            print(f"`flowerbed node start` ({site}) stopped {elapsed:.1f} s after SIGTERM")
            assert elapsed < STOP_SECONDS and not left, (site, elapsed, left, d.tail())
            _no_traceback(d.log(f"node-{site}"))


def _take_a_task(address: str, ca: Path) -> str:
    """Ask the coordinator's Runtime API for a ServerApp task, as Flower's SuperExec does (no secret)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=False,
        root_certificates=ca.read_bytes(),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )
    try:
        reply = client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-serverapp"]))
    except httpx.HTTPStatusError as exc:
        return f"refused: {exc.response.status_code}"
    finally:
        client.close()
    return f"answered with task token {reply.token!r}"


def _health(address: str) -> bool:
    try:
        return httpx.get(f"http://{address}/health", timeout=2).status_code < 500
    except httpx.HTTPError:
        return False
