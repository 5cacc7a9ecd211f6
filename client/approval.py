"""Node-side task approval: a hospital's node runs only the tasks the hospital allows.

flowerbed's built-in tasks always run. A user task (``package.module:attr``) runs on a deployed
node only after the hospital's IT reviewed its source and ran ``flowerbed node approve TASK``,
which records the SHA-256 of the task's installed source (every ``.py`` file of its top-level
package). The check re-hashes the source on every message, so a task edited after approval is
refused until it is approved again. The source is the node's own installed copy: the coordinator
ships no code (the Flower app bundle ``flowerbed run`` submits holds only configuration).

Approvals live in a JSON file: the node config's ``approvals`` key, else
``$FLOWERBED_HOME/approved-tasks.json``, else ``~/.flowerbed/approved-tasks.json``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowerbed.exception import TaskError, TaskNotApproved
from flowerbed.tasks.registry import is_builtin

APPROVALS_KEY = "approvals"


@dataclass(frozen=True)
class TaskSource:
    """The installed source of a user task, and its digest."""

    name: str
    files: tuple[Path, ...]
    sha256: str


def default_approvals_path() -> Path:
    """Where approvals are kept when the node config does not say."""
    home = os.environ.get("FLOWERBED_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".flowerbed"
    return base / "approved-tasks.json"


def approvals_path(node_config: Mapping[str, Any] | None) -> Path:
    """The approvals file for a node (its config's ``approvals`` key, else the default)."""
    if node_config and node_config.get(APPROVALS_KEY):
        return Path(str(node_config[APPROVALS_KEY])).expanduser()
    return default_approvals_path()


def task_source(task_name: str) -> TaskSource:
    """Find and hash the installed source of ``package.module:attr`` without importing it.

    Raises
    ------
    TaskError
        If the name is not ``package.module:attr`` or its module is not installed.
    """
    module_name, sep, attr = task_name.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"task {task_name!r}: a user task is named package.module:attr")
    top = module_name.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise TaskError(f"task {task_name!r}: module {top!r} is not installed on this node")
    if spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        files = tuple(sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts))
    else:
        root = Path(spec.origin).parent
        files = (Path(spec.origin),)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(file.read_bytes() + b"\0")
    return TaskSource(name=task_name, files=files, sha256=digest.hexdigest())


def read_approvals(path: Path) -> dict[str, dict[str, Any]]:
    """The approvals file's entries (task name -> record); empty when there is no file."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TaskError(f"{path}: approvals file is not valid JSON ({exc}); fix or delete it") from None
    return dict(data.get("tasks", {}))


def approve_task(task_name: str, path: Path | None = None, *, approved_by: str = "") -> TaskSource:
    """Record the SHA-256 of a user task's installed source as approved on this node."""
    if is_builtin(task_name):
        raise TaskError(f"task {task_name!r} is built in and always allowed; nothing to approve")
    source = task_source(task_name)
    path = path or default_approvals_path()
    tasks = read_approvals(path)
    tasks[task_name] = {
        "sha256": source.sha256,
        "files": [str(f) for f in source.files],
        "approved_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "approved_by": approved_by or os.environ.get("USER", ""),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"tasks": tasks}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return source


def revoke_task(task_name: str, path: Path | None = None) -> bool:
    """Remove a task's approval; False if it was not approved."""
    path = path or default_approvals_path()
    tasks = read_approvals(path)
    if tasks.pop(task_name, None) is None:
        return False
    path.write_text(json.dumps({"tasks": tasks}, indent=2, sort_keys=True) + "\n")
    return True


def check_task_approved(task_name: str, node_config: Mapping[str, Any] | None) -> None:
    """Allow built-in tasks, and user tasks whose installed source matches an approval.

    Simulated nodes (a ``partition-id`` and no ``data-path``) run on the researcher's own
    machine and allow every task, unless their config names an ``approvals`` file.

    Raises
    ------
    TaskNotApproved
        If the node was asked to run a user task it has not approved, or whose source changed
        since it was approved; the message names the task, the site and the command to run
        (the node's error reply adds ``node <site>:`` in front).
    """
    if is_builtin(task_name):
        return
    config = node_config or {}
    if "partition-id" in config and "data-path" not in config and not config.get(APPROVALS_KEY):
        return
    site = config.get("site", "this node")
    path = approvals_path(config)
    record = read_approvals(path).get(task_name)
    if record is None:
        raise TaskNotApproved(
            f"task {task_name!r} is not approved on this node ({site}). Built-in tasks run by "
            f"default; the hospital's IT must review the task's source and run "
            f"`flowerbed node approve {task_name}` (approvals: {path})"
        )
    current = task_source(task_name).sha256
    if current != record.get("sha256"):
        raise TaskNotApproved(
            f"task {task_name!r} changed since it was approved on this node ({site}; approved sha256 "
            f"{str(record.get('sha256'))[:12]}..., installed {current[:12]}...); review it and run "
            f"`flowerbed node approve {task_name}` again"
        )
