"""Every use of Flower's private or internal API, in one place.

flowerbed builds on Flower's public Message API. A few speed-ups and one executor need more: the
storage behind Flower's records (filled directly, without per-item checks, for values flowerbed
made itself), a message's id and an in-process run identity (for the inline grid), and Flower's
SuperExec loop with flowerbed's own executor (the node's warm executor). They are all here, so a
Flower release that changes them breaks one module, and ``tests/test_flower_internals.py`` says
which assumption no longer holds. Written against Flower 1.42.

Flower is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

FLOWER_SERIES = "1.42"

T = TypeVar("T")


# ------------------------------------------------------------------------------------- records


def record_data(record: Any) -> dict:
    """The mapping behind a Flower record (``ArrayRecord``, ``ConfigRecord``, ``MetricRecord``, ``RecordDict``)."""
    return record.__dict__["_data"]


def filled(record: T, items: Mapping) -> T:
    """``record`` with ``items`` put straight into its storage (no per-item type checks)."""
    record_data(record).update(items)
    return record


def typed_view(owner: Any, kind: type, items: Mapping) -> Any:
    """The synchronized view ``RecordDict.<kind>_records`` builds, filled with ``items`` without re-inserting them."""
    from flwr.app.message.recorddict import _SyncedDict

    view = _SyncedDict[kind](owner, kind)  # type: ignore[valid-type]
    record_data(view).update(items)
    return view


def init_numpy_array(array: Any, dtype: str, shape: tuple[int, ...]) -> None:
    """Set an ``Array``'s metadata as ``Array.from_numpy_ndarray`` would, without serializing its values."""
    from flwr.common.constant import SType

    array.__dict__.update(dtype=dtype, shape=shape, stype=SType.NUMPY)


def set_message_id(message: Any, message_id: str) -> None:
    """Give a message the id a SuperLink would (an in-process grid has none)."""
    message.metadata.__dict__["_message_id"] = message_id


# ------------------------------------------------------------------------ in-process run identity


def in_process_run(run_id: int) -> Any:
    """An empty Flower ``Run`` with this id, as a ServerApp outside a SuperLink needs."""
    from flwr.supercore.run import Run

    return Run.create_empty(run_id=run_id)


def enter_task_identity(run_id: int, task_id: int) -> None:
    """Make this process the SuperLink's side of run ``run_id`` (messages created here need it)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = run_id
    TaskIdentity.task_id = task_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID


# ----------------------------------------------------------------------------- SuperExec loop


def run_superexec_with(executor: Any, **kwargs: Any) -> None:
    """Flower's SuperExec loop (``run_superexec``) with ``executor`` in place of the one it would pick."""
    from flwr.supercore.superexec import run_superexec as superexec

    superexec.get_executor = lambda *_, **__: executor
    superexec.run_superexec(**kwargs)


def subprocess_executor() -> Any:
    """Flower's standard executor, which starts a new process per task."""
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    return SubprocessExecutor()


def clientapp_task_type() -> Any:
    """The task type of a ClientApp message."""
    from flwr.supercore.constant import TaskType

    return TaskType.CLIENT_APP


def launch_accepted() -> Any:
    """The result an executor returns for a task it started."""
    from flwr.supercore.superexec.executor.types import LaunchResult

    return LaunchResult.accepted()


def clientapp_runner() -> tuple[Callable[..., None], Callable[[str | None, bool], Any]]:
    """Flower's ``run_clientapp`` and its root-certificate resolver."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    return run_clientapp, validate_and_resolve_root_certificates


# --------------------------------------------------------------------------------- Control API


def flower_error_message(text: str) -> str | None:
    """The message of a Flower Control API error body (JSON), if it is one."""
    from flwr.supercore.error import FlowerError

    error = FlowerError.from_json(text)
    return None if error is None else error.message
