"""Hospital IT's node commands: ``node check``, ``node start``, ``node approve``.

Thin typer wrappers over ``flowerbed.client.node`` and ``flowerbed.client.approval``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from flowerbed.client.supernode_launcher import DEFAULT_POLL_INTERVAL, poll_interval_problem
from flowerbed.exception import NodeError

if TYPE_CHECKING:
    from flowerbed.client.data_report import DataReport

console = Console(highlight=False)

KitOption = Annotated[Path | None, typer.Option("--kit", help="The start-up kit folder from the coordinator.")]
DataOption = Annotated[Path, typer.Option("--data", help="This hospital's data file.")]


def _experiment(path: Path | None):
    from flowerbed.experiment import Experiment, load_experiment

    return load_experiment(path) if path else Experiment()


def node_check_command(
    data: DataOption,
    kit: KitOption = None,
    site: Annotated[str | None, typer.Option("--site", help="Site name (default: the kit's).")] = None,
    experiment: Annotated[
        Path | None,
        typer.Option("--experiment", help="Check against this experiment's data and task (default: built-in)."),
    ] = None,
    approvals: Annotated[Path | None, typer.Option("--approvals", help="Approved-tasks file.")] = None,
    ledger: Annotated[
        Path | None, typer.Option("--ledger", help="The node's privacy ledger: the report is written beside it.")
    ] = None,
    state: Annotated[
        Path | None, typer.Option("--state", help="Node state folder, where the report goes without --ledger.")
    ] = None,
    config: Annotated[
        list[str] | None,
        typer.Option("--config", help="Another node-config key, KEY=VALUE (e.g. csv-delimiter=';'); repeatable."),
    ] = None,
    write_shareable: Annotated[
        bool,
        typer.Option(
            "--write-shareable",
            help="Also write data-report.shareable.json: aggregate counts only, for you to send if you choose.",
        ),
    ] = False,
) -> None:
    """Check local data against the federation's data contract and the task, without any network access.

    Exits 1 when the data has a blocking problem; the report (Markdown and JSON) stays at the node.
    """
    from rich.markup import escape

    from flowerbed.client.data_report import DataCheckFailed, report_folder
    from flowerbed.client.node import check_node_data
    from flowerbed.kit import load_kit
    from flowerbed.tasks.data.contract import load_contract

    loaded = load_kit(kit) if kit else None
    name = site or (loaded.site if loaded else data.stem)
    contract = load_contract(loaded.contract) if loaded and loaded.contract else None
    extra = {**({"approvals": str(approvals)} if approvals else {}), **config_items(config or [])}
    folder = report_folder(
        ledger, state or ((loaded.folder / "state") if loaded else Path.cwd() / f"node-state-{name}")
    )
    _say(f"checking {escape(str(data))} for site [bold]{name}[/]; nothing is sent anywhere")
    try:
        result = check_node_data(data, name, _experiment(experiment), extra, contract=contract, report_dir=folder)
    except DataCheckFailed as failed:
        _print_report(failed.report)
        if write_shareable:
            _say(f"  shareable counts: {escape(str(failed.report.write_shareable(folder)))}")
        count = len(failed.report.blocking)
        _say(
            f"[red]refused[/]: {count} blocking problem{'s' if count != 1 else ''}; fix the export and check "
            f"again. Report: {escape(str(failed.paths[0]))} (and .json)"
        )
        raise typer.Exit(1) from None
    if result.report is not None:
        _print_report(result.report)
    classes = ", ".join(f"{label}: {count}" for label, count in result.class_counts.items())
    what = f"({result.dataset}, task {result.task})"
    _say(f"[green]ok[/] {escape(str(result.path))} for site [bold]{result.site}[/] {what}")
    _say(f"  {result.num_train} training rows, {result.num_test} test rows, {result.num_features} features")
    if classes:  # targets that are values have no label counts
        _say(f"  training labels: {classes}")
    for note in result.notes:
        _say(f"  note: {escape(note)}")
    if result.report_paths:
        _say(f"  report: {escape(str(result.report_paths[0]))} (and .json); it stays at this node")
    if write_shareable and result.report is not None:
        _say(f"  shareable counts: {escape(str(result.report.write_shareable(folder)))}")
    _say("  nothing was sent anywhere")


def _say(text: str) -> None:
    console.print(text, soft_wrap=True)


def _print_report(report: DataReport) -> None:
    """The report's problems on the terminal: grouped, counted, each with where and what to do."""
    from rich.markup import escape

    table = report.table
    _say(f"  data contract: {table.contract.ref}")
    if table.dialect is not None:
        _say(f"  read as: {escape(table.dialect.describe())}")
    how = "matched by name" if table.dialect and table.dialect.header else "by position"
    dropped = f"; dropped unread: {', '.join(table.dropped)}" if table.dropped else ""
    _say(f"  rows: {report.rows}; {len(table.matched)} columns {how}{escape(dropped)}")
    titles = {
        "error": "[red]errors[/] (the node refuses the data until they are fixed)",
        "warning": "[yellow]warnings[/] (the data is used; worth a look)",
        "note": "notes (what the node does with the data)",
    }
    for severity, title in titles.items():
        problems = [p for p in report.problems if p.severity == severity]
        if not problems:
            continue
        _say(f"  {title}")
        for problem in problems:
            _say(f"    {escape(problem.headline())}")
            where = f"{problem.where()}: " if problem.lines else ""
            _say(f"        {escape(where + problem.action)}")


def node_start_command(
    data: DataOption,
    kit: KitOption = None,
    ledger: Annotated[Path | None, typer.Option("--ledger", help="Privacy ledger (SQLite) for DP runs.")] = None,
    budget_epsilon: Annotated[
        float | None, typer.Option("--budget-epsilon", help="This hospital's total epsilon budget per dataset.")
    ] = None,
    budget_delta: Annotated[float | None, typer.Option("--budget-delta", help="Delta of the budget.")] = None,
    approvals: Annotated[Path | None, typer.Option("--approvals", help="Approved-tasks file.")] = None,
    state: Annotated[Path | None, typer.Option("--state", help="Node state folder (default: KIT/state).")] = None,
    runtime_port: Annotated[int, typer.Option("--runtime-port", help="Local Runtime API port.")] = 9094,
    connect_timeout: Annotated[
        float, typer.Option("--connect-timeout", help="Give up if the coordinator is unreachable this long (s).")
    ] = 600.0,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, no node authentication: a trial on one machine only.")
    ] = False,
    coordinator: Annotated[
        str | None, typer.Option("--coordinator", help="host:port (default: the kit's; required without a kit).")
    ] = None,
    site: Annotated[str | None, typer.Option("--site", help="Site name (default: the kit's).")] = None,
    config: Annotated[
        list[str] | None,
        typer.Option(
            "--config",
            help="Another node-config key, KEY=VALUE (e.g. require-secure-aggregation=true); repeatable.",
        ),
    ] = None,
    executor: Annotated[
        str,
        typer.Option(
            "--executor",
            help="warm: fork a pre-imported child per message; flower: a new process per message, as Flower "
            "does. Either runs only the installed flowerbed ClientApp.",
        ),
    ] = "warm",
    poll_interval: Annotated[
        float,
        typer.Option(
            "--poll-interval",
            help="Longest wait between asking the coordinator for work while a run is going on, s, 0.05 to 3 "
            "(an idle node waits 3 s; 0: Flower's own flower-supernode, which always waits 3 s).",
        ),
    ] = DEFAULT_POLL_INTERVAL,
) -> None:
    """Join the federation: a Flower SuperNode with this kit's CA and key, serving local data."""
    from flowerbed.client.node import Node, NodeSettings
    from flowerbed.kit import load_kit

    if executor not in ("warm", "flower"):
        raise NodeError(f"--executor {executor!r}: use 'warm' or 'flower'")
    if (problem := poll_interval_problem(poll_interval)) is not None:
        raise NodeError(problem)
    loaded = load_kit(kit) if kit else None
    if loaded is None and not insecure:
        raise NodeError("give --kit KIT (the folder the coordinator sent); only --insecure runs without one")
    address = coordinator or (loaded.coordinator if loaded else None)
    name = site or (loaded.site if loaded else None)
    if not address or not name:
        raise NodeError("without a kit, give --coordinator HOST:PORT and --site NAME")
    data = data.expanduser().resolve()
    if not data.exists():
        raise NodeError(f"--data {data}: no such file")
    state_dir = state or ((loaded.folder / "state") if loaded else Path.cwd() / f"node-state-{name}")
    extra = {
        "ledger": str(ledger.expanduser().resolve()) if ledger else None,
        "budget-epsilon": budget_epsilon,
        "budget-delta": budget_delta,
        "approvals": str(approvals.expanduser().resolve()) if approvals else None,
        "data-contract": str(loaded.contract) if loaded and loaded.contract else None,
        **config_items(config or []),
    }
    settings = NodeSettings(
        site=name,
        coordinator=address,
        data_path=data,
        state_dir=state_dir.expanduser().resolve(),
        kit=loaded,
        insecure=insecure,
        runtime_port=runtime_port,
        connect_timeout=connect_timeout,
        executor=executor,
        poll_interval=poll_interval or None,
        extra=extra,
    )
    from flowerbed.client.preflight import node_lock, preflight

    with node_lock(settings):  # a kit already in use is refused here, before anything connects
        preflight(settings)  # the node joins only with data that passes `node check`
        raise typer.Exit(Node(settings).run())


def config_items(items: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs as node-config entries (values read as TOML: numbers, booleans, else text)."""
    import tomllib

    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise NodeError(f"--config {item!r}: use KEY=VALUE, e.g. --config evaluation=refuse")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw.strip()
    return out


def node_approve_command(
    task: Annotated[str, typer.Argument(help="The user task, package.module:attr.")],
    approvals: Annotated[Path | None, typer.Option("--approvals", help="Approved-tasks file.")] = None,
    revoke: Annotated[bool, typer.Option("--revoke", help="Withdraw the approval instead.")] = False,
) -> None:
    """Allow a user task on this node: record the SHA-256 of its installed source."""
    from flowerbed.client.approval import approve_task, default_approvals_path, revoke_task

    path = approvals or default_approvals_path()
    if revoke:
        done = revoke_task(task, path)
        console.print(f"{'revoked' if done else 'was not approved:'} {task} ({path})")
        return
    source = approve_task(task, path)
    console.print(f"approved [bold]{task}[/]: sha256 {source.sha256}")
    for file in source.files:
        console.print(f"  {file}")
    console.print(f"recorded in {path}; any later change to these files needs a new approval")


def register_node_commands(node_app: typer.Typer) -> None:
    """Add ``check``, ``start`` and ``approve`` to the ``node`` group."""
    node_app.command("check")(node_check_command)
    node_app.command("start")(node_start_command)
    node_app.command("approve")(node_approve_command)
