"""The coordinator operator's commands: ``provision``, ``coordinator start``, ``run ...``.

Thin typer wrappers over ``flowerbed.server.provisioning``, ``flowerbed.server.coordinator`` and
``flowerbed.server.run_control``; the library functions are what tests call.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from flowerbed.server.federation_config import FederationConfig

console = Console(highlight=False)

#: ``flowerbed report``'s writer (run folders -> files written), given by the CLI root for ``run collect``.
ReportWriter = Callable[[Sequence[Path]], list[Path]]
_report_writer: ReportWriter | None = None

FederationOption = Annotated[
    Path,
    typer.Option(
        "--federation",
        "-f",
        help="The federation file (default: $FLOWERBED_FEDERATION, else ./federation.toml).",
    ),
]


def _federation(path: Path | None) -> FederationConfig:
    """The federation file of a ``run`` command; from here on SIGTERM stops the command like Ctrl-C."""
    from flowerbed.process_control import sigterm_as_interrupt
    from flowerbed.server.federation_config import load_federation

    sigterm_as_interrupt()
    default = os.environ.get("FLOWERBED_FEDERATION", "federation.toml")
    return load_federation(path or Path(default))


def provision_command(
    federation_file: Annotated[Path, typer.Argument(help="The federation file (federation.toml).")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace existing node keys and the coordinator certificate.")
    ] = False,
    site: Annotated[
        list[str] | None, typer.Option("--site", help="Only (re)make this site's kit (repeatable).")
    ] = None,
    add_site: Annotated[
        str | None, typer.Option("--add-site", help="Add a hospital to the file and make its kit.")
    ] = None,
    contact: Annotated[str, typer.Option("--contact", help="With --add-site: who runs the node.")] = "",
    ca_days: Annotated[int | None, typer.Option("--ca-days", min=1, help="CA validity (days).")] = None,
    server_days: Annotated[
        int | None, typer.Option("--server-days", min=1, help="Coordinator certificate validity (days).")
    ] = None,
    wheel: Annotated[
        Path | None,
        typer.Option(
            "--wheel",
            help="Put flowerbed's wheel in every kit (hospitals install it without a package index): a .whl file, "
            "or flowerbed's source folder to build it from.",
        ),
    ] = None,
) -> None:
    """Make the federation's CA, the coordinator's TLS certificate and one start-up kit per hospital."""
    from flowerbed.server.federation_config import append_site, load_federation
    from flowerbed.server.provisioning import provision

    sites = list(site) if site else None
    if add_site:
        if append_site(federation_file, add_site, contact):
            console.print(f"added site [bold]{add_site}[/] to {federation_file}")
        sites = [*(sites or []), add_site]
    federation = load_federation(federation_file)
    if wheel is not None and wheel.is_dir():
        console.print(f"building flowerbed's wheel from {wheel} (pip wheel --no-deps) ...")
    report = provision(federation, sites=sites, force=force, ca_days=ca_days, server_days=server_days, wheel=wheel)
    root = federation.output_dir
    for path in report.created:
        console.print(f"  created {path.relative_to(root)}")
    if report.kept:
        console.print(f"  kept {len(report.kept)} existing keys and certificates (use --force to replace them)")
    for name, kit in report.kits.items():
        console.print(f"kit for [bold]{name}[/]: {kit}  (send this folder to the hospital's IT)")
    if report.wheel is not None:
        console.print(f"every kit carries {report.wheel.name}: its README says how to install it")
    console.print(f"coordinator files: {root / 'coordinator'}; keep {root / 'ca' / 'ca.key'} offline")


def coordinator_start_command(
    federation_file: Annotated[Path, typer.Argument(help="The federation file (federation.toml).")],
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, no node authentication: a trial on one machine only.")
    ] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the SuperLink.")] = 60.0,
) -> None:
    """Start the coordinator (Flower SuperLink with TLS, node authentication, persistent state)."""
    from flowerbed.server.coordinator import Coordinator
    from flowerbed.server.federation_config import load_federation

    coordinator = Coordinator(load_federation(federation_file), insecure=insecure)
    raise typer.Exit(coordinator.run(timeout=timeout, log=console.print))


def run_start_command(
    experiment: Annotated[Path, typer.Argument(help="The experiment file (.toml).")],
    federation: FederationOption = None,  # type: ignore[assignment]
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="Override a key, e.g. --set rounds=3 (repeatable).")
    ] = None,
    nodes: Annotated[
        int | None, typer.Option("--nodes", min=1, help="Hospitals to wait for (default: the federation's sites).")
    ] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Follow the run's log.")] = False,
) -> None:
    """Start a federated run of an experiment on the coordinator."""
    from flowerbed.server.run_control import start_run

    record = start_run(_federation(federation), experiment, overrides=set_, expected_nodes=nodes, stream=stream)
    console.print(f"started run [bold]{record.name}[/] (Flower run {record.flower_run_id}); folder {record.run_dir}")


def run_status_command(
    run: Annotated[str | None, typer.Argument(help="Flower run id or run folder name (default: latest).")] = None,
    federation: FederationOption = None,  # type: ignore[assignment]
    output_format: Annotated[str, typer.Option("--format", help="default or json")] = "default",
) -> None:
    """Show a run's round, the sites that took part, metrics and epsilon per site."""
    from flowerbed.server.run_control import run_status

    status = run_status(_federation(federation), run)
    if output_format == "json":
        print(json.dumps(status, indent=2))
        return
    render_status(status)


def render_status(status: dict) -> None:
    """``run status``'s human form: state and reason first, then rounds, sites, metrics and epsilon."""
    from rich.markup import escape

    rounds = f"{status['rounds_done']}/{status['rounds'] or '?'}"
    console.print(f"run [bold]{status['name']}[/] (Flower run {status['flower_run_id']}): {status['status']}")
    console.print(f"  {escape(status['reason'])}")
    console.print(f"  rounds done: {rounds}{'  (finished)' if status['finished'] else ''}")
    for label, reasons in (
        ("privacy budget spent", status["budget_exhausted"]),
        ("left the run", status["left_out"]),
        ("did not take part", status["excluded"]),
    ):
        for site, reason in (reasons or {}).items():
            console.print(f"  [red]{label}[/] {escape(site)}: {escape(str(reason))}")
    for number, sites in (status["retrained"] or {}).items():
        console.print(
            f"  [yellow]round {number} trained twice[/] at {escape(', '.join(sites))}: the run was interrupted after "
            "its training went out, then resumed; each of these sites' ledgers charged both"
        )
    console.print(f"  last round's sites: {escape(', '.join(status['participants'])) or '-'}")
    for site, reason in (status["refused"] or {}).items():
        console.print(f"  [red]refused[/] {escape(site)}: {escape(str(reason))}")
    for kind, values in status["metrics"].items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, int | float))
        console.print(f"  {kind}: {shown}")
    if status["epsilon"]:
        eps = ", ".join(f"{site} {value:.3f}" for site, value in status["epsilon"].items())
        console.print(f"  epsilon per site: {escape(eps)} (max {max(status['epsilon'].values()):.3f})")
        console.print(f"    ({escape(status['epsilon_scope'])}; `flowerbed node budget` at each node shows this run's)")
    console.print(f"  folder: {status['run_dir']}")


def run_logs_command(
    run: Annotated[str | None, typer.Argument(help="Flower run id or run folder name (default: latest).")] = None,
    federation: FederationOption = None,  # type: ignore[assignment]
    follow: Annotated[bool, typer.Option("--follow", "-F", help="Stream until the run ends.")] = False,
) -> None:
    """Print a run's log (the ServerApp's output)."""
    from flowerbed.server.run_control import stream_logs

    raise typer.Exit(stream_logs(_federation(federation), run, follow=follow))


def run_stop_command(
    run: Annotated[str | None, typer.Argument(help="Flower run id or run folder name (default: latest).")] = None,
    federation: FederationOption = None,  # type: ignore[assignment]
    now: Annotated[
        bool,
        typer.Option(
            "--now", help="Stop at once, also mid-round: resume then trains that round again (charged twice)."
        ),
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=0, help="Seconds to wait for the round in progress (default: 2 round timeouts)."),
    ] = None,
) -> None:
    """Stop a run after its round in progress; finished rounds stay checkpointed (`flowerbed run resume` continues)."""
    from flowerbed.server.run_control import stop_run

    record = stop_run(_federation(federation), run, now=now, timeout=timeout, log=console.print)
    console.print(f"stopped run {record.name}")


def run_resume_command(
    run: Annotated[str | None, typer.Argument(help="Flower run id or run folder name (default: latest).")] = None,
    federation: FederationOption = None,  # type: ignore[assignment]
    stream: Annotated[bool, typer.Option("--stream", help="Follow the run's log.")] = False,
) -> None:
    """Continue a run from its last checkpoint (after a stop or a coordinator restart)."""
    from flowerbed.server.run_control import latest_flower_run_id, resume_run

    record = resume_run(_federation(federation), run, stream=stream)
    console.print(f"resumed run {record.name} as Flower run {latest_flower_run_id(record)}")


def run_collect_command(
    destination: Annotated[Path, typer.Argument(help="A new folder, or a file ending in .tar.gz.")],
    run: Annotated[str | None, typer.Option("--run", help="Flower run id or folder name (default: latest).")] = None,
    federation: FederationOption = None,  # type: ignore[assignment]
) -> None:
    """Copy a run folder (final model, metrics, summary, report: plots) off the coordinator."""
    from flowerbed.server.run_control import collect_run

    path, report = collect_run(_federation(federation), run, destination, report=_report_writer)
    if report:
        console.print(f"report: {', '.join(p.name for p in report)}")
    console.print(f"run folder copied to {path}")


coordinator_app = typer.Typer(help="Coordinator operator: run the federation's SuperLink.", no_args_is_help=True)
coordinator_app.command("start")(coordinator_start_command)

run_app = typer.Typer(help="Coordinator operator: start, watch, stop, resume and collect runs.", no_args_is_help=True)
run_app.command("start")(run_start_command)
run_app.command("status")(run_status_command)
run_app.command("logs")(run_logs_command)
run_app.command("stop")(run_stop_command)
run_app.command("resume")(run_resume_command)
run_app.command("collect")(run_collect_command)


def register_deploy(app: typer.Typer, report: ReportWriter | None = None) -> None:
    """Add ``provision``, ``coordinator`` and ``run`` to the root app; ``report`` draws ``run collect``'s report."""
    global _report_writer
    _report_writer = report
    app.command("provision")(provision_command)
    app.add_typer(coordinator_app, name="coordinator")
    app.add_typer(run_app, name="run")
