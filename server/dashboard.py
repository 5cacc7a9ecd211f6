"""``flowerbed dashboard``: a read-only web page over run folders that follows runs as rounds finish.

It reads what the round loop writes (``experiment.json``, ``metrics.jsonl``, ``timings.jsonl``,
``summary.json``, ``STOP``) from simulation run folders (``runs/``) and from a coordinator's run
folders (``<state>/runs``, with ``runs.json`` for Flower's run ids), and shows every run's state with
the reason for any stop or refusal, its rounds, metric curves (global and per site; median and
quantile bands with many sites), the sites that took part or were left out and why, and epsilon per
site. The page (``dashboard_assets/``: HTML, CSS and a small script, no build step, nothing from
another host) polls a JSON API that answers as soon as a run folder changes (long polling).

Bound to a loopback address (the default, 127.0.0.1) it answers only requests addressed to this
machine's own names; bound anywhere else every request needs the operator's token
(``flowerbed.server.operator_auth``): ``Authorization: Bearer <token>``, or ``/?token=<token>``
once, which sets a cookie that holds a digest of the token, never the token itself.

Nothing is written and no other file is served: aggregated metrics, site names and refusal
reasons only, never a record of a patient.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer

from flowerbed.exception import ConfigError

ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
RUN_FILES = ("experiment.json", "metrics.jsonl", "summary.json")
COOKIE = "flowerbed_dashboard"
MAX_WAIT = 25.0  # longest long poll (seconds)
SITE_LINES = 10  # up to this many sites, one line each; above it, the median and quantile bands
SHOWN_NAMES = 30  # a round lists its participants by name up to this many
GLOBAL_GROUPS = (("evaluate", "federated"), ("central", "central"), ("validation", "validation"), ("train", "train"))
HIDDEN_SITE_METRICS = ("delta",)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or name) reaches only this machine."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of ``path``; a torn last line (a round being written) is left out."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.split("\n")[:-1]:
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _signature(folder: Path) -> tuple[Any, ...]:
    """What changes when the round loop writes: size and time of each run file, and the STOP file."""
    out: list[Any] = []
    for name in (*RUN_FILES, "timings.jsonl", "STOP"):
        try:
            stat = (folder / name).stat()
            out.append((stat.st_size, stat.st_mtime_ns))
        except FileNotFoundError:
            out.append(None)
    return tuple(out)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


# ---------------------------------------------------------------------------------------------
# one run folder, as the page shows it


@dataclass
class RunSource:
    """A run folder the dashboard shows, and Flower's run id where a coordinator submitted it."""

    folder: Path
    flower_run_id: int | None = None
    submitted_at: str | None = None
    deployed: bool = False


def run_state(folder: Path, summary: dict[str, Any], records: list[dict[str, Any]], now: float) -> tuple[str, str]:
    """A run's state and the reason, from its files alone.

    ``finished``, ``stopped`` (with the stop's reason), ``no progress`` (no round completed, and
    why), ``stopping`` (the operator asked), ``running``, ``not running`` (no summary and nothing
    written for longer than a round may take: it crashed or was killed; resume continues it),
    ``starting`` or ``submitted``.
    """
    if summary:
        stopped = summary.get("stopped")
        if not summary.get("rounds_completed"):
            why = stopped or _refusal_text(summary) or "no round completed"
            return "no progress", str(why)
        twice = "; ".join(
            f"round {r} trained twice at {', '.join(sites)} (interrupted after its training went out, then resumed)"
            for r, sites in (summary.get("retrained") or {}).items()
        )
        if stopped:
            return "stopped", "; ".join(filter(None, [str(stopped), twice]))
        done = f"{summary.get('rounds_completed')} of {summary.get('rounds_planned')} rounds"
        return "finished", "; ".join(filter(None, [done, twice]))
    if (folder / "STOP").exists():
        return "stopping", "the operator asked the run to stop; it stops before its next round"
    if not folder.is_dir():
        return "submitted", "the coordinator has not started the run yet (waiting for its ServerApp)"
    experiment = _read_json(folder / "experiment.json")
    timeout = float((experiment.get("train") or {}).get("round_timeout") or 600.0)
    written = max((p.stat().st_mtime for p in folder.iterdir() if p.name in (*RUN_FILES, "timings.jsonl")), default=0.0)
    if not written:
        return "starting", "the run folder has no experiment.json yet"
    idle = now - written
    last = records[-1]["round"] if records else 0
    if idle > 2 * timeout + 60:
        return (
            "not running",
            f"no summary and nothing written for {idle / 60:.0f} min after round {last}: the run crashed or was "
            "killed; `flowerbed resume RUN_DIR` (simulation) or `flowerbed run resume` (deployment) continues it",
        )
    return "running", f"round {last} done" if last else "waiting for the first round"


def _refusal_text(summary: dict[str, Any]) -> str:
    parts = []
    for key, label in (("budget_exhausted", "budget spent"), ("left_out", "left out"), ("excluded", "excluded")):
        for site, reason in (summary.get(key) or {}).items():
            parts.append(f"{site} ({label}): {reason}")
    if not parts:
        for site, reason in (summary.get("refused") or {}).items():
            parts.append(f"{site}: {reason}")
    return "; ".join(parts)


def _global_charts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    series: dict[str, dict[str, list[list[float]]]] = {}
    for record in records:
        for group, label in GLOBAL_GROUPS:
            for name, value in (record.get(group) or {}).items():
                number = _number(value)
                if number is not None and not name.endswith("num-examples"):
                    series.setdefault(name, {}).setdefault(label, []).append([record["round"], number])
    charts = [
        {"id": f"global-{name}", "title": name, "series": [{"label": k, "points": v} for k, v in groups.items()]}
        for name, groups in sorted(series.items(), key=lambda item: (item[0] not in ("accuracy", "loss"), item[0]))
    ]
    taken = [[r["round"], len(r.get("participants") or [])] for r in records]
    refused = [[r["round"], len(r.get("refused") or {})] for r in records]
    charts.append(
        {"id": "global-sites", "title": "sites per round", "integer": True, "series": [
            {"label": "took part", "points": taken}, {"label": "refused or missing", "points": refused}]}
    )  # fmt: skip
    return charts


def _site_charts(records: list[dict[str, Any]], epsilon_title: str) -> list[dict[str, Any]]:
    values: dict[str, dict[str, list[list[float]]]] = {}  # metric -> site -> points
    for record in records:
        for site, metrics in (record.get("sites") or {}).items():
            for name, value in (metrics or {}).items():
                number = _number(value)
                if number is None or name in HIDDEN_SITE_METRICS or name.endswith("num-examples"):
                    continue
                values.setdefault(name, {}).setdefault(site, []).append([record["round"], number])
    charts = []
    for name in sorted(values, key=lambda n: (n != "epsilon", n)):
        by_site = values[name]
        title = epsilon_title if name == "epsilon" else f"{name} per site"
        chart: dict[str, Any] = {
            "id": f"site-{name}",
            "title": title,
            "series": [],
            "bands": [],
            "zero": name == "epsilon",
        }
        if len(by_site) <= SITE_LINES:
            chart["series"] = [{"label": site, "points": pts} for site, pts in sorted(by_site.items())]
        else:
            chart.update(_bands(by_site))
        charts.append(chart)
    return charts


def _bands(by_site: dict[str, list[list[float]]]) -> dict[str, Any]:
    """Median, 25-75 % and 10-90 % bands over the sites that reported in each round."""
    per_round: dict[float, list[float]] = {}
    for points in by_site.values():
        for step, value in points:
            per_round.setdefault(step, []).append(value)
    rounds = sorted(per_round)
    ordered = {r: sorted(per_round[r]) for r in rounds}
    median = [[r, _quantile(ordered[r], 0.5)] for r in rounds]
    bands = []
    for low, high in ((0.1, 0.9), (0.25, 0.75)):
        bands.append(
            {
                "label": f"{round(low * 100)}-{round(high * 100)} % of sites",
                "low": [[r, _quantile(ordered[r], low)] for r in rounds],
                "high": [[r, _quantile(ordered[r], high)] for r in rounds],
            }
        )
    count = [[r, len(ordered[r])] for r in rounds]
    return {"series": [{"label": f"median of {len(by_site)} sites", "points": median}], "bands": bands, "counts": count}


def _sites_table(records: list[dict[str, Any]], summary: dict[str, Any]) -> list[dict[str, Any]]:
    sites: dict[str, dict[str, Any]] = {}

    def entry(site: str) -> dict[str, Any]:
        return sites.setdefault(site, {"site": site, "rounds": 0, "last_round": None, "status": "", "reason": ""})

    for record in records:
        for site in record.get("sampled") or []:
            entry(site)
        for site in record.get("participants") or []:
            row = entry(site)
            row["rounds"] += 1
            row["last_round"] = record["round"]
        codes = record.get("refused_codes") or {}
        for site, reason in (record.get("refused") or {}).items():
            row = entry(site)
            row["last_refusal"] = f"round {record['round']}: {reason}"
            if site in codes:
                row["code"] = codes[site]
        for site, metrics in (record.get("sites") or {}).items():
            if (eps := _number((metrics or {}).get("epsilon"))) is not None:
                entry(site)["epsilon"] = eps
    for site, values in ((summary.get("epsilon") or {}).get("per_site") or {}).items():
        if (eps := _number(values)) is not None:
            entry(site)["epsilon"] = eps
    for site, metrics in ((summary.get("final") or {}).get("sites") or {}).items():
        entry(site)["final"] = {k: v for k, v in (metrics or {}).items() if _number(v) is not None}
    ends = (("budget_exhausted", "budget spent"), ("left_out", "left out"), ("excluded", "did not take part"))
    for key, status in ends:
        for site, reason in (summary.get(key) or {}).items():
            row = entry(site)
            row["status"], row["reason"] = status, str(reason)
    for row in sites.values():
        if row["status"]:
            continue
        if row["rounds"] and row.get("last_refusal"):
            row["status"], row["reason"] = "took part, refused once or more", row["last_refusal"]
        elif row["rounds"]:
            row["status"] = "took part"
        elif row.get("last_refusal"):
            row["status"], row["reason"] = "refused", row["last_refusal"]
        else:
            row["status"] = "sampled, no reply yet"
    return sorted(sites.values(), key=lambda r: r["site"])


def _experiment_view(experiment: dict[str, Any]) -> dict[str, Any]:
    privacy = experiment.get("privacy") or {}
    return {
        "name": experiment.get("name"),
        "rounds": experiment.get("rounds"),
        "strategy": (experiment.get("strategy") or {}).get("name"),
        "task": (experiment.get("task") or {}).get("name"),
        "dataset": (experiment.get("data") or {}).get("dataset"),
        "clients_per_round": (experiment.get("train") or {}).get("clients_per_round"),
        "privacy": {k: privacy.get(k) for k in ("enabled", "target_epsilon", "noise_multiplier", "delta")},
        "secagg": bool((experiment.get("secagg") or {}).get("enabled")),
    }


def _round_rows(records: list[dict[str, Any]], timings: dict[int, float]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        metrics = {}
        for group, label in GLOBAL_GROUPS:
            for name, value in (record.get(group) or {}).items():
                if (number := _number(value)) is not None and not name.endswith("num-examples"):
                    metrics[f"{label} {name}"] = number
        participants = list(record.get("participants") or [])
        rows.append(
            {
                "round": record["round"],
                "sampled": len(record.get("sampled") or []),
                "took_part": len(participants),
                "participants": participants if len(participants) <= SHOWN_NAMES else [],
                "refused": record.get("refused") or {},
                "codes": record.get("refused_codes") or {},
                "metrics": metrics,
                "epsilon_max": _number(record.get("epsilon_max")),
                "retrained": list(record.get("retrained") or []),
                "time": timings.get(record["round"]),
            }
        )
    return rows


class RunView:
    """One run folder read into what the page shows; re-read only when its files change."""

    def __init__(self, run_id: str, source: RunSource) -> None:
        self.run_id = run_id
        self.source = source
        self._signature: tuple[Any, ...] | None = None
        self._overview: dict[str, Any] = {}
        self._detail: dict[str, Any] = {}
        self._records: list[dict[str, Any]] = []
        self._summary: dict[str, Any] = {}

    @property
    def version(self) -> str:
        """Changes whenever the run folder's files change (what long polls wait on)."""
        return hashlib.sha256(repr(_signature(self.source.folder)).encode()).hexdigest()[:16]

    def _refresh(self) -> None:
        folder = self.source.folder
        signature = _signature(folder)
        if signature == self._signature:  # only the clock moved: a quiet run may have stopped running
            state, reason = run_state(folder, self._summary, self._records, time.time())
            for view in (self._overview, self._detail):
                view.update(state=state, reason=reason)
            return
        experiment = _read_json(folder / "experiment.json")
        records = [r for r in _read_jsonl(folder / "metrics.jsonl") if isinstance(r.get("round"), int)]
        timings = {t["round"]: t.get("time") for t in _read_jsonl(folder / "timings.jsonl") if "round" in t}
        summary = _read_json(folder / "summary.json")
        self._records, self._summary = records, summary
        state, reason = run_state(folder, summary, records, time.time())
        simulated = (folder / "nodes").is_dir() and not self.source.deployed
        scope = "this run" if simulated else "at the node's ledger, all runs"
        epsilon_label = f"ε {scope}"
        written = [folder / n for n in (*RUN_FILES, "timings.jsonl") if (folder / n).exists()]
        self._overview = {
            "id": self.run_id,
            "name": folder.name,
            "folder": str(folder),
            "kind": "deployment" if self.source.deployed else "simulation",
            "flower_run_id": self.source.flower_run_id,
            "state": state,
            "reason": reason,
            "rounds_done": records[-1]["round"] if records else 0,
            "rounds": experiment.get("rounds") or summary.get("rounds_planned"),
            "strategy": (experiment.get("strategy") or {}).get("name"),
            "privacy": bool((experiment.get("privacy") or {}).get("enabled")),
            "updated": max((p.stat().st_mtime for p in written), default=None),
            "epsilon_max": _number(records[-1].get("epsilon_max")) if records else None,
        }
        self._detail = {
            **self._overview,
            "experiment": _experiment_view(experiment),
            "rounds_table": _round_rows(records, timings),
            "charts": _global_charts(records),
            "site_charts": _site_charts(records, f"ε per site, {scope}"),
            "sites": _sites_table(records, summary),
            "epsilon_label": epsilon_label,
            "epsilon_note": (
                "each site's epsilon as its node reported it; the simulation's virtual nodes keep a ledger of "
                "their own in this run folder, so it is this run's spend"
                if simulated
                else "each site's epsilon as its node reported it, "
                + str(
                    (summary.get("epsilon") or {}).get("scope")
                    or "cumulative at each node's ledger: every release of the site's dataset, this run's and "
                    "earlier runs'"
                )
            ),
            "summary": {
                k: summary.get(k)
                for k in (
                    "stopped",
                    "rounds_completed",
                    "model",
                    "final",
                    "refused",
                    "left_out",
                    "budget_exhausted",
                    "retrained",
                )
                if k in summary
            }
            | ({"excluded": summary["excluded"]} if summary.get("excluded") else {}),
        }
        self._signature = signature

    def overview(self) -> dict[str, Any]:
        """The run's line in the list."""
        self._refresh()
        return self._overview

    def detail(self) -> dict[str, Any]:
        """Everything the run's page shows."""
        self._refresh()
        return self._detail


# ---------------------------------------------------------------------------------------------
# finding run folders


class RunIndex:
    """The run folders under the dashboard's folders, found anew on every listing.

    Parameters
    ----------
    roots : list[Path]
        Folders of run folders (``runs/``, ``<state>/runs``) or run folders themselves.
    registry : Path, optional
        A coordinator's ``runs.json``: its runs are listed with Flower's run id, also before the
        ServerApp made their folder.
    """

    def __init__(self, roots: list[Path], registry: Path | None = None) -> None:
        self.roots = [Path(r) for r in roots]
        self.registry = registry
        self._views: dict[Path, RunView] = {}

    def sources(self) -> list[RunSource]:
        """Every run folder, a coordinator's submitted runs included."""
        found: dict[Path, RunSource] = {}
        if self.registry is not None:
            for entry in _read_json_list(self.registry):
                folder = Path(entry.get("run_dir", ""))
                if not folder.name:
                    continue
                resumes = entry.get("resumes") or []
                run_id = resumes[-1] if resumes else entry.get("flower_run_id")
                found[folder.resolve()] = RunSource(folder, run_id, entry.get("submitted_at"), deployed=True)
        for root in self.roots:
            candidates = [root] if _is_run_folder(root) else sorted(p for p in _children(root) if _is_run_folder(p))
            for folder in candidates:
                found.setdefault(folder.resolve(), RunSource(folder, deployed=False))
        return list(found.values())

    def views(self) -> dict[str, RunView]:
        """Run id (the folder's name, made unique) -> its view; newest first."""
        out: dict[str, RunView] = {}
        sources = self.sources()
        sources.sort(key=lambda s: (_started(s), s.folder.name), reverse=True)
        for source in sources:
            key = source.folder.resolve()
            run_id = source.folder.name
            n = 1
            while run_id in out:
                n += 1
                run_id = f"{source.folder.name}~{n}"
            view = self._views.get(key)
            if view is None or view.run_id != run_id:
                view = self._views[key] = RunView(run_id, source)
            view.source = source
            out[run_id] = view
        return out


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def _children(root: Path) -> list[Path]:
    try:
        return [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _is_run_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_FILES)


def _started(source: RunSource) -> float:
    for name in ("experiment.json", "metrics.jsonl", "summary.json"):
        try:
            return (source.folder / name).stat().st_mtime
        except FileNotFoundError:
            continue
    return time.time() if source.deployed else 0.0


# ---------------------------------------------------------------------------------------------
# the web app


def cookie_value(token: str) -> str:
    """What the browser keeps after ``/?token=``: a digest of the token, useless to ``flowerbed run``."""
    return hashlib.sha256(f"flowerbed-dashboard:{token}".encode()).hexdigest()


def make_app(index: RunIndex, *, token: str | None = None, loopback: bool = True, poll_seconds: float = 0.25) -> Any:
    """The dashboard's Starlette app (read-only: GET only).

    Parameters
    ----------
    index : RunIndex
        The run folders it shows.
    token : str, optional
        The operator's token; when given, every request must carry it (or the cookie it sets).
    loopback : bool (default: True)
        Served on a loopback address: only requests addressed to ``localhost``/``127.0.0.1``/``::1``
        are answered (a web page elsewhere cannot reach it by renaming itself).
    poll_seconds : float (default: 0.25)
        How often a long poll looks at the run folders.
    """
    import asyncio

    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
    from starlette.routing import Route

    from flowerbed.server.operator_auth import TokenCheck

    check = TokenCheck(token) if token else None
    expected_cookie = cookie_value(token) if token else ""
    headers = {
        "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }

    def refusal(status: int, why: str) -> Response:
        text = (
            f"{why}. This dashboard is served beyond this machine, so it answers only the coordinator's "
            "operator: open /?token=<operator token> once (provision/coordinator/operator.token, or "
            "<state>/operator.token with --insecure), or send 'Authorization: Bearer <operator token>'."
        )
        return PlainTextResponse(text, status_code=status, headers={**headers, "WWW-Authenticate": "Bearer"})

    def authorized(request: Request) -> Response | None:
        if check is None:
            return None
        presented = request.headers.get("authorization", "")
        if presented:
            scheme, _, value = presented.partition(" ")
            if scheme.lower() == "bearer" and check(value.strip()):
                return None
            return refusal(403, "the Authorization header does not carry the operator's token")
        cookie = request.cookies.get(COOKIE)
        if cookie:
            if TokenCheck(expected_cookie)(cookie):
                return None
            return refusal(403, "the dashboard's cookie is not valid for this operator token")
        return refusal(401, "no operator credential")

    def guarded(handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            refused = authorized(request)
            if refused is not None:
                return refused
            response = await handler(request)
            response.headers.update(headers)
            return response

        return endpoint

    async def page(request: Request) -> Response:
        if check is not None and "token" in request.query_params:
            if not check(request.query_params["token"]):
                return refusal(403, "the token in the address is not the operator's")
            response = RedirectResponse("/", status_code=303)
            secure = request.url.scheme == "https"
            response.set_cookie(COOKIE, expected_cookie, httponly=True, samesite="strict", secure=secure)
            response.headers.update(headers)
            return response
        refused = authorized(request)
        if refused is not None:
            return refused
        html = resources.files("flowerbed.server").joinpath("dashboard_assets", "index.html").read_text()
        return Response(html, media_type="text/html; charset=utf-8", headers=headers)

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return PlainTextResponse("not found", status_code=404)
        body = resources.files("flowerbed.server").joinpath("dashboard_assets", name).read_bytes()
        return Response(body, media_type=ASSETS[name])

    async def wait_for_change(request: Request, version: Any) -> None:
        since = request.query_params.get("since")
        try:
            wait = min(max(float(request.query_params.get("wait", "0")), 0.0), MAX_WAIT)
        except ValueError:
            wait = 0.0
        deadline = time.monotonic() + wait
        while since and since == version() and time.monotonic() < deadline:
            if await request.is_disconnected():
                return
            await asyncio.sleep(poll_seconds)

    def listing_version() -> str:
        views = index.views()
        text = "|".join(f"{k}:{v.version}" for k, v in views.items())
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    async def runs(request: Request) -> Response:
        await wait_for_change(request, listing_version)
        views = index.views()
        overviews = await asyncio.to_thread(lambda: [v.overview() for v in views.values()])
        return JSONResponse({"version": listing_version(), "runs": overviews, "now": time.time()})

    async def run(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        view = index.views().get(run_id)
        if view is None:
            return JSONResponse({"error": f"no run {run_id!r} in the dashboard's folders"}, status_code=404)
        await wait_for_change(request, lambda: view.version)
        version = view.version
        detail = await asyncio.to_thread(view.detail)
        return JSONResponse({**detail, "version": version, "now": time.time()})

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/assets/{name}", guarded(asset), methods=["GET"]),
        Route("/api/runs", guarded(runs), methods=["GET"]),
        Route("/api/runs/{run_id}", guarded(run), methods=["GET"]),
    ]
    middleware = []
    if loopback:
        hosts = ["localhost", "127.0.0.1", "::1", "[::1]"]
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=hosts))
    return Starlette(routes=routes, middleware=middleware)


def dashboard_sources(folders: list[Path], federation_file: Path | None) -> tuple[list[Path], Path | None, Path | None]:
    """The folders to show, the coordinator's ``runs.json`` and its operator token file (with ``-f``)."""
    roots = list(folders)
    registry = token_file = None
    if federation_file is not None:
        from flowerbed.server.coordinator import CoordinatorPaths, operator_token_file
        from flowerbed.server.federation_config import load_federation

        federation = load_federation(federation_file)
        roots.append(CoordinatorPaths(federation.state_dir).runs)
        registry = federation.state_dir / "runs.json"
        token_file = operator_token_file(federation)
    if not roots:
        roots = [Path("runs")]
        if not roots[0].is_dir():
            raise ConfigError(
                "flowerbed dashboard",
                ["no run folders to show: give a folder of runs (e.g. runs/), or -f federation.toml (a coordinator)"],
            )
    return roots, registry, token_file


def operator_token(host: str, token_file: Path | None) -> str | None:
    """The operator's token when ``host`` reaches beyond this machine (``None`` on loopback).

    Raises
    ------
    ConfigError
        When the dashboard would be served beyond loopback without the operator's token.
    """
    if is_loopback(host):
        return None
    from flowerbed.server.operator_auth import TOKEN_FILE_ENV, read_token

    path = token_file or (Path(os.environ[TOKEN_FILE_ENV]) if os.environ.get(TOKEN_FILE_ENV) else None)
    if path is None:
        raise ConfigError(
            "flowerbed dashboard",
            [
                f"--host {host} serves the dashboard beyond this machine, so only the operator may open it: give "
                "-f federation.toml (its operator token) or --token-file provision/coordinator/operator.token, "
                "or keep the default --host 127.0.0.1"
            ],
        )
    return read_token(path)


def dashboard_command(
    folders: Annotated[
        list[Path] | None,
        typer.Argument(help="Folders of run folders (default: ./runs), or run folders themselves."),
    ] = None,
    federation: Annotated[
        Path | None,
        typer.Option("--federation", "-f", help="Also show this coordinator's runs (and use its operator token)."),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to serve on; beyond loopback the operator's token is required.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to serve on.")] = 8050,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file",
            help="The operator token file (default: the federation's, or $FLOWERBED_OPERATOR_TOKEN_FILE).",
        ),
    ] = None,
    certfile: Annotated[Path | None, typer.Option("--certfile", help="TLS certificate (PEM) to serve HTTPS.")] = None,
    keyfile: Annotated[Path | None, typer.Option("--keyfile", help="TLS private key (PEM) of --certfile.")] = None,
) -> None:
    """Serve a read-only web page of runs: state, rounds, metric curves, sites, epsilon; live as rounds finish."""
    import uvicorn

    roots, registry, federation_token = dashboard_sources(list(folders or []), federation)
    token = operator_token(host, token_file or federation_token)
    if (certfile is None) != (keyfile is None):
        raise ConfigError("flowerbed dashboard", ["give both --certfile and --keyfile, or neither"])
    app = make_app(RunIndex(roots, registry), token=token, loopback=is_loopback(host))
    scheme = "https" if certfile else "http"
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"flowerbed dashboard: {scheme}://{shown}:{port}/  (read-only; {', '.join(map(str, roots))})")
    if token is not None and certfile is None:
        typer.echo(
            "WARNING: served beyond this machine without TLS: the operator's token and the page cross the network "
            "unencrypted; give --certfile/--keyfile, or keep --host 127.0.0.1 and use an SSH tunnel",
            err=True,
        )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        ws="none",
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
    )


def register(app: typer.Typer) -> None:
    """Add ``dashboard`` to the root app."""
    app.command("dashboard")(dashboard_command)
