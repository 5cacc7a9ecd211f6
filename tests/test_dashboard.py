"""``flowerbed dashboard``: a finished and a live run in a real headless browser, the operator's credential, states."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flowerbed.client.node_round import SIM_NODE_CONFIG_ENV
from flowerbed.exception import ConfigError
from flowerbed.server import checkpoint, run_folder
from flowerbed.server.dashboard import (
    COOKIE,
    RunIndex,
    cookie_value,
    is_loopback,
    make_app,
    operator_token,
)
from flowerbed.server.operator_auth import TOKEN_FILE_ENV, new_token

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str:
    """A headless-capable Chromium, or skip saying how to get one."""
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium on PATH (tried chromium, chromium-browser, google-chrome): apt-get install -y chromium")


def dump_dom(url: str, profile: Path, budget_ms: int) -> str:
    """The page's DOM after its scripts ran for ``budget_ms`` of the browser's virtual time."""
    command = [
        browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
        f"--virtual-time-budget={budget_ms}", "--dump-dom", url,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) in a thread; stop it on exit."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", ws="none", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        assert not thread.is_alive(), "the dashboard did not stop"


class FirstAnswer:
    """ASGI wrapper: notes what the first answer for one run said, and flags once it has been sent."""

    def __init__(self, app: Any, run_id: str) -> None:
        self.app = app
        self.path = f"/api/runs/{run_id}"
        self.sent = threading.Event()
        self.first: dict[str, Any] | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or self.sent.is_set():
            await self.app(scope, receive, send)
            return
        body: list[bytes] = []

        async def keep(message: dict) -> None:
            if message["type"] == "http.response.body":
                body.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, keep)
        self.first = json.loads(b"".join(body))
        self.sent.set()


def row(dom: str, site: str) -> str:
    match = re.search(rf'<tr[^>]*data-site="{site}"[^>]*>(.*?)</tr>', dom, re.S)
    assert match, f"site {site} is not in the sites table"
    return match.group(1)


def test_the_page_shows_a_finished_and_a_live_run(heart_experiment, tmp_path, monkeypatch):
    """Runs listed, curves drawn, epsilon per site, a refused site and its reason; a live run updates in place."""
    from flowerbed.simulations.simulate import simulate

    browser()
    # hungarian's node allows 0.01: under DP it refuses (budget), in a plain run it refuses by policy.
    monkeypatch.setenv(
        SIM_NODE_CONFIG_ENV, json.dumps({"*": {"dp-test-seed": 0}, "hungarian": {"budget-epsilon": 0.01}})
    )
    finished = simulate(
        heart_experiment("name='heart-dp'", "rounds=2", "privacy.enabled=true", "privacy.noise_multiplier=1.0"),
        quiet=True,
    )
    summary = run_folder.read_summary(finished)
    assert "hungarian" in summary["budget_exhausted"]

    live_experiment = heart_experiment("name='live'", "rounds=2")
    live = run_folder.new_run_dir(live_experiment)
    app = FirstAnswer(make_app(RunIndex([tmp_path / "runs"])), live.name)
    save = checkpoint.save_checkpoint

    def held_until_the_page_saw_round_one(run_dir: Path, state, **how):  # round 2's line follows its checkpoint
        if run_dir == live and state.round >= 2:
            app.sent.wait(timeout=60)
        return save(run_dir, state, **how)

    monkeypatch.setattr(checkpoint, "save_checkpoint", held_until_the_page_saw_round_one)
    outcome: dict[str, Any] = {}

    def run_live() -> None:
        try:
            simulate(live_experiment, quiet=True, run_dir=live)
        except BaseException as exc:
            outcome["error"] = exc

    simulation = threading.Thread(target=run_live, daemon=True)
    with serving(app) as url:
        simulation.start()
        try:
            deadline = time.monotonic() + 60
            while not run_folder.read_metrics(live):
                assert simulation.is_alive() and time.monotonic() < deadline, outcome.get("error", "no round 1")
                time.sleep(0.1)
            # The page loads with round 1 and polls again at 1 s of its virtual time; that long poll
            # (up to 15 s) holds the browser's clock until round 2 is written.
            dom = dump_dom(f"{url}/?every=1000&wait=15#run={live.name}", tmp_path / "profile", 1500)
        finally:
            app.sent.set()
            simulation.join(timeout=60)
        assert "error" not in outcome, outcome.get("error")
        assert app.first is not None and app.first["rounds_done"] == 1 and app.first["state"] == "running"
        runs = re.findall(r'<li[^>]*data-run="([^"]+)"', dom)
        assert set(runs) == {finished.name, live.name}
        panel = re.search(r'<section id="run"[^>]*>', dom).group(0)
        assert f'data-run="{live.name}"' in panel
        assert 'data-rounds="2"' in panel, "the page did not follow the live run to round 2 without a reload"
        assert int(re.search(r'data-updates="(\d+)"', panel).group(1)) >= 2
        assert re.search(r'<polyline points="[\d.]+,[\d.]+ [\d.]+,[\d.]+"', dom), "no metric curve drawn"
        assert "only trains with differential privacy" in row(dom, "hungarian")

        dom = dump_dom(f"{url}/?wait=0#run={finished.name}", tmp_path / "profile", 2500)
    panel = re.search(r'<section id="run"[^>]*>', dom).group(0)
    assert f'data-run="{finished.name}"' in panel and 'data-state="finished"' in panel
    assert re.search(r'<polyline points="[\d.]+,[\d.]+ [\d.]+,[\d.]+"[^>]*data-series="federated"', dom)
    assert "ε this run" in dom and "the simulation's virtual nodes keep a ledger of their own" in dom
    for site, value in summary["epsilon"]["per_site"].items():
        shown = re.search(r'class="num epsilon">([\d.]+)<', row(dom, site)).group(1)
        assert float(shown) == pytest.approx(value, rel=1e-3), site
    refused = row(dom, "hungarian")
    assert "budget spent" in refused and "BUDGET_EXHAUSTED" in refused
    assert "privacy budget exhausted" in refused
    assert re.search(r'data-chart="site-epsilon"', dom)


def test_beyond_loopback_only_the_operator_gets_in(tmp_path, monkeypatch):
    """Bound elsewhere than loopback, no request is answered without the operator's token."""
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    runs = tmp_path / "runs" / "r1"
    runs.mkdir(parents=True)
    (runs / "experiment.json").write_text(json.dumps({"name": "r1", "rounds": 1}))
    with pytest.raises(ConfigError, match="--host 0.0.0.0 serves the dashboard beyond this machine"):
        operator_token("0.0.0.0", None)
    assert operator_token("127.0.0.1", None) is None and is_loopback("::1") and not is_loopback("10.1.2.3")
    token_file = tmp_path / "operator.token"
    token_file.write_bytes(new_token())
    token_file.chmod(0o600)
    token = operator_token("0.0.0.0", token_file)

    app = make_app(RunIndex([tmp_path / "runs"]), token=token, loopback=is_loopback("0.0.0.0"))
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        for path in ("/", "/api/runs", "/api/runs/r1", "/assets/dashboard.js"):
            refused = client.get(path)
            assert refused.status_code == 401, path
            assert "r1" not in refused.text and "operator" in refused.text
        assert client.get("/api/runs", headers={"Authorization": "Bearer not-the-token"}).status_code == 403
        assert client.get("/?token=not-the-token").status_code == 403
        good = client.get("/api/runs", headers={"Authorization": f"Bearer {token}"})
        assert good.status_code == 200 and good.json()["runs"][0]["name"] == "r1"
        login = client.get(f"/?token={token}")
        assert login.status_code == 303 and login.headers["location"] == "/"
        assert client.cookies[COOKIE] == cookie_value(token) != token
        assert client.get("/api/runs").status_code == 200  # the cookie
        assert client.post("/api/runs").status_code == 405  # read-only

    with serving(make_app(RunIndex([tmp_path / "runs"]))) as url:
        assert httpx.get(f"{url}/api/runs", timeout=10).status_code == 200
        assert httpx.get(f"{url}/api/runs", headers={"Host": "elsewhere.example"}, timeout=10).status_code == 400

    env = {k: v for k, v in os.environ.items() if k != TOKEN_FILE_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "flowerbed.cli", "dashboard", str(tmp_path / "runs"), "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 2 and "--token-file" in result.stderr and "Traceback" not in result.stderr


def _write_run(folder: Path, *, records: list[dict], summary: dict | None = None, timeout: float = 600) -> Path:
    folder.mkdir(parents=True)
    (folder / "experiment.json").write_text(
        json.dumps({"name": folder.name, "rounds": 3, "train": {"round_timeout": timeout}})
    )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _record(n: int, sites: dict[str, dict], refused: dict | None = None) -> dict:
    return {
        "round": n, "sampled": sorted(sites) + sorted(refused or {}), "participants": sorted(sites),
        "refused": refused or {}, "refused_codes": {}, "train": {}, "evaluate": {"accuracy": 0.5 + n / 10},
        "central": {}, "sites": sites, "epsilon_max": None,
    }  # fmt: skip


def test_states_reasons_and_bands_from_the_files(tmp_path):
    """Why a run made no progress, a crashed run, a stop on request, a submitted run, and many sites as bands."""
    root = tmp_path / "runs"
    spent = "round 1: node va: privacy budget exhausted: spent 2.9 of 3"
    _write_run(
        root / "none",
        records=[],
        summary={"rounds_completed": 0, "rounds_planned": 3, "stopped": None, "budget_exhausted": {"va": spent}},
    )
    crashed = _write_run(root / "crashed", records=[_record(1, {"a": {"train-loss": 1.0}})], timeout=1)
    old = time.time() - 3600
    for name in ("experiment.json", "metrics.jsonl"):
        os.utime(crashed / name, (old, old))
    stopping = _write_run(root / "stopping", records=[_record(1, {"a": {"train-loss": 1.0}})])
    (stopping / "STOP").write_text("")
    many = {f"site-{i:02d}": {"eval-accuracy": i / 20, "epsilon": 1.0 + i / 10} for i in range(12)}
    _write_run(root / "many", records=[_record(1, many), _record(2, many)])
    registry = tmp_path / "state" / "runs.json"
    registry.parent.mkdir()
    waiting = tmp_path / "state" / "runs" / "queued-1"
    registry.write_text(json.dumps([{"flower_run_id": 7, "name": "queued-1", "run_dir": str(waiting), "resumes": []}]))

    views = RunIndex([root], registry).views()
    state = {k: (v.overview()["state"], v.overview()["reason"]) for k, v in views.items()}
    assert state["none"] == ("no progress", f"va (budget spent): {spent}")
    assert state["crashed"][0] == "not running" and "flowerbed resume" in state["crashed"][1]
    assert state["stopping"][0] == "stopping"
    assert state["queued-1"][0] == "submitted" and views["queued-1"].overview()["flower_run_id"] == 7
    assert state["many"] == ("running", "round 2 done")

    detail = views["many"].detail()
    charts = {c["id"]: c for c in detail["site_charts"]}
    accuracy = charts["site-eval-accuracy"]
    assert [s["label"] for s in accuracy["series"]] == ["median of 12 sites"]
    assert [b["label"] for b in accuracy["bands"]] == ["10-90 % of sites", "25-75 % of sites"]
    low, high = accuracy["bands"][1]["low"][0][1], accuracy["bands"][1]["high"][0][1]
    assert low < accuracy["series"][0]["points"][0][1] < high
    assert charts["site-epsilon"]["title"].startswith("ε")
    assert {r["site"]: r["epsilon"] for r in detail["sites"]}["site-11"] == pytest.approx(2.1)
    assert detail["sites"][0]["status"] == "took part"
