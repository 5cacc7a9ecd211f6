"""Before a node joins: its data passes ``node check``'s check, and its kit is not already in use.

``flowerbed node start`` runs both before it connects:

- ``node_lock`` holds the kit (a lock file in its folder, or its ``kit.toml`` where the folder is
  read-only) and the node's state folder for as long as the node runs; a second node started with
  the same kit, or the same state folder, on this machine is refused at once, naming the running
  node's process. (A node with the same kit on another machine is refused by the coordinator; see
  ``flowerbed.client.node.explain_exit``.)
- ``preflight`` reads the data exactly as ``flowerbed node check`` does, against the kit's data
  contract, and writes the data-quality report beside the ledger (or in the state folder). A node
  whose data has a blocking problem does not join; the message names the report.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TextIO

from flowerbed.client.data_report import DataCheckFailed, report_folder
from flowerbed.client.node import DataCheck, NodeSettings, check_node_data
from flowerbed.exception import NodeError
from flowerbed.kit import KIT_FILE
from flowerbed.tasks.data.contract import load_contract

LOCK_FILE = "node.lock"
KIT_LOCK_FILE = ".node.lock"
SHOWN_PROBLEMS = 10


def _holder(path: Path) -> str:
    """The process id a lock file names (``unknown`` when it names none)."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _open_lock(path: Path, fallback: Path | None) -> tuple[IO[str], bool]:
    """The lock file opened for writing its holder's pid, else (a read-only kit) the fallback opened to read."""
    try:
        return path.open("a+"), True
    except OSError:
        if fallback is None:
            raise
        return fallback.open("r"), False


@contextlib.contextmanager
def node_lock(settings: NodeSettings) -> Iterator[None]:
    """Hold the kit and the state folder while the node runs.

    Raises
    ------
    NodeError
        Another node on this machine already runs with this kit or this state folder.
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    if os.name != "posix":  # no advisory locks: the coordinator still refuses a second node of a kit
        yield
        return
    import fcntl

    targets: list[tuple[str, Path, Path | None]] = [("state", settings.state_dir / LOCK_FILE, None)]
    if settings.kit is not None:
        targets.insert(0, ("kit", settings.kit.folder / KIT_LOCK_FILE, settings.kit.folder / KIT_FILE))
    handles: list[IO[str]] = []
    try:
        for what, path, fallback in targets:
            handle, writable = _open_lock(path, fallback)
            handles.append(handle)
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _holder(path)
                if what == "kit":
                    raise NodeError(
                        f"node {settings.site}: the kit {path.parent} is already in use by a node running on this "
                        f"machine (process {pid}); a kit joins the federation once. Stop that node first (or, for "
                        "another site, use that site's kit)."
                    ) from None
                raise NodeError(
                    f"node {settings.site}: the state folder {settings.state_dir} is already in use by a node running "
                    f"on this machine (process {pid}); stop it, or give this node its own --state."
                ) from None
            if writable:
                handle.truncate(0)
                handle.write(f"{os.getpid()}\n")
                handle.flush()
        yield
    finally:
        for handle in handles:
            handle.close()


def preflight(settings: NodeSettings, out: TextIO | None = None) -> DataCheck:
    """Check the node's data as ``flowerbed node check`` does; write the report; refuse blocking problems.

    One line saying what was read goes to ``out`` (default: standard output).

    Raises
    ------
    NodeError
        The data has a blocking problem (the message lists them and names the report), or the
        data file cannot be read.
    """
    config = settings.node_config()
    extra = {k: v for k, v in config.items() if k not in ("data-path", "site")}
    contract = load_contract(settings.kit.contract) if settings.kit and settings.kit.contract else None
    folder = report_folder(config.get("ledger"), settings.state_dir)
    try:
        check = check_node_data(settings.data_path, settings.site, None, extra, contract=contract, report_dir=folder)
    except DataCheckFailed as failed:
        blocking = failed.report.blocking
        lines = "\n".join(f"  - {p.headline()}: {p.action}" for p in blocking[:SHOWN_PROBLEMS])
        more = f"\n  ... and {len(blocking) - SHOWN_PROBLEMS} more" if len(blocking) > SHOWN_PROBLEMS else ""
        report = failed.paths[0] if failed.paths else folder
        raise NodeError(
            f"node {settings.site}: its data ({settings.data_path}) did not pass the pre-flight check, so the node "
            f"does not join. {len(blocking)} blocking problem{'s' if len(blocking) != 1 else ''}:\n{lines}{more}\n"
            f"Report: {report}. Fix the export, check it with `flowerbed node check`, then start the node again."
        ) from None
    if check.report is not None:
        report = check.report
        where = f"; report: {check.report_paths[0]}" if check.report_paths else ""
        warnings = report.count("warning")
        print(
            f"pre-flight: {settings.data_path} fits {report.table.contract.ref}: {report.rows} rows "
            f"({check.num_train} training, {check.num_test} test), {warnings} warning{'s' if warnings != 1 else ''}"
            f"{where}",
            file=out or sys.stdout,
            flush=True,
        )
    return check
