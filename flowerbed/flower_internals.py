"""Every use of Flower's private or internal API, in one place.

flowerbed builds on Flower's public Message API. A few speed-ups and one executor need more: the
storage behind Flower's records (filled directly, without per-item checks, for values flowerbed
made itself), a message's id and an in-process run identity (for the inline grid), Flower's
SuperExec loop with flowerbed's own executors (the node's warm executor, the coordinator's
ServerApp executor), the trust boundary (the operator-token plugin the SuperLink and the ``flwr``
CLI use, Flower's ServerApp and ClientApp runners made to check a run's bundle and run only the
installed flowerbed), and shorter versions of Flower's fixed waits on a round's path (the
SuperNode's idle poll and reply check, the SuperExec loop's poll, the retry of an object that is
not there yet). They are all here, so a Flower release that changes them breaks
one module, and ``tests/test_flower_internals.py`` says which assumption no longer holds. Written
against Flower 1.42.

Flower is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import importlib
import sys
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


def quick_fanout(strategy: Any) -> None:
    """Let a Flower strategy build its per-node copies of one message by copying the first.

    ``FedAvg._construct_messages`` builds one ``Message`` per node around the same content (about
    13 µs each); the copies here share that content and the first message's metadata with their
    own destination (about 2.5 µs). Set on this instance only, and only where the class keeps
    FedAvg's own method.
    """
    from flwr.app import Message
    from flwr.app.metadata import Metadata
    from flwr.serverapp.strategy import FedAvg

    if getattr(type(strategy), "_construct_messages", None) is not FedAvg._construct_messages:
        return

    def construct(record: Any, node_ids: list[int], message_type: str) -> list[Any]:
        if not node_ids:
            return []
        first = Message(content=record, message_type=message_type, dst_node_id=node_ids[0])
        fields = first.metadata.__dict__
        out = [first]
        for node_id in node_ids[1:]:
            metadata = Metadata.__new__(Metadata)
            metadata.__dict__.update(fields, _dst_node_id=node_id)
            message = Message.__new__(Message)
            message.__dict__.update(first.__dict__, _metadata=metadata)
            out.append(message)
        return out

    strategy._construct_messages = construct


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


# ---------------------------------------------------------------- operator authentication


def operator_authn_plugin(check: Callable[[str | None], bool], refusal: str) -> Any:
    """A SuperLink Control API authentication plugin that admits one bearer token.

    ``check`` gets the bearer token of a request (``None`` without one) and says whether it is the
    operator's. Flower's own ``ControlAuthenticationMiddleware`` calls the plugin before every
    Control API handler; a refused request gets ``refusal`` back (HTTP 403). The operator is
    Flower's single account of a SuperLink without a federation manager.
    """
    from flwr.common.constant import ACCESS_TOKEN_KEY, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.supercore.auth.typing import AccountInfo
    from flwr.supercore.error import ApiErrorCode, FlowerError
    from flwr.superlink.auth_plugin import ControlAuthnPlugin

    class OperatorTokenPlugin(ControlAuthnPlugin):
        def __init__(self) -> None:
            pass

        def get_login_details(self) -> None:
            return None

        def validate_tokens_in_metadata(self, metadata: Any) -> tuple[bool, Any]:
            tokens = [v for k, v in metadata if k == ACCESS_TOKEN_KEY]
            token = tokens[0] if len(tokens) == 1 else None
            if isinstance(token, bytes):
                token = token.decode("utf-8", errors="replace")
            if check(token):
                return True, AccountInfo(flwr_aid=NOOP_FLWR_AID, account_name=NOOP_ACCOUNT_NAME)
            raise FlowerError(ApiErrorCode.NO_PERMISSIONS, refusal, public_details=refusal)

        def get_auth_tokens(self, device_code: str) -> None:
            raise FlowerError(ApiErrorCode.NO_ACCOUNT_AUTH, refusal, public_details=refusal)

        def refresh_tokens(self, metadata: Any) -> tuple[None, None]:
            return None, None

    return OperatorTokenPlugin()


def run_superlink_with_authn(plugin: Any, argv: list[str]) -> None:
    """Flower's ``flower-superlink`` with ``argv``, authenticating Control API calls with ``plugin``."""
    import sys

    module = importlib.import_module("flwr.superlink.cli.flower_superlink")

    module.load_control_authn_plugin = lambda: plugin
    sys.argv = ["flower-superlink", *argv]
    module.flower_superlink()


def operator_cli_auth_plugin(token: str) -> Any:
    """A Flower CLI authentication plugin that sends ``token`` as the bearer token of every Control API call."""
    from flwr.cli.auth_plugin import CliAuthPlugin
    from flwr.common.constant import ACCESS_TOKEN_KEY

    class OperatorTokenCliPlugin(CliAuthPlugin):
        def __init__(self, host: str = "") -> None:
            self.host = host

        @staticmethod
        def login(login_details: Any, control_client: Any) -> Any:
            raise RuntimeError("the operator's token is made by `flowerbed provision`; there is no login")

        def store_tokens(self, credentials: Any) -> None:
            pass

        def load_tokens(self) -> None:
            pass

        def write_tokens_to_metadata(self, metadata: Any) -> Any:
            return [*metadata, (ACCESS_TOKEN_KEY, token)]

    return OperatorTokenCliPlugin()


def run_flwr_cli_with_auth(plugin: Any, argv: list[str]) -> None:
    """Flower's ``flwr`` command with ``argv``, every Control API call authenticated by ``plugin``."""
    from flwr.cli import app as cli
    from flwr.cli import utils

    utils.load_cli_auth_plugin_from_connection = lambda *_, **__: plugin
    cli.app(args=argv, prog_name="flwr")


# ------------------------------------------------------------- only flowerbed's own apps run


def serverapp_task_type() -> Any:
    """The task type of a ServerApp run."""
    from flwr.supercore.constant import TaskType

    return TaskType.SERVER_APP


def launch_refused(reason: str) -> Any:
    """The result an executor returns for a task it will not start."""
    from flwr.supercore.superexec.executor.types import LaunchResult

    return LaunchResult.failed(reason)


def current_run_id() -> int | None:
    """The Flower run of the task this process runs (``None`` before it is known)."""
    from flwr.supercore.task_identity import TaskIdentity

    try:
        return int(TaskIdentity.run_id)
    except RuntimeError:
        return None


def _quiet_refusals(module: Any, refusal: type[BaseException]) -> None:
    """Make ``module``'s Flower logger print a refusal as one line, without its traceback."""
    original = module.log

    def log(level: int, msg: str, *args: Any, **kwargs: Any) -> None:
        if isinstance(kwargs.get("exc_info"), refusal):
            kwargs["exc_info"] = None
        original(level, msg, *args, **kwargs)

    module.log = log


def guard_clientapp_runtime(
    check: Callable[[bytes, int | None], None], load_client_app: Callable[[], Any], refusal: type[BaseException]
) -> None:
    """Make Flower's ``run_clientapp`` (in this process) run only the app ``load_client_app`` returns.

    Before anything of a run's bundle is unpacked, ``check(fab_content, run_id)`` sees it and raises
    ``refusal`` to refuse; the node then replies with an error. The bundle is never installed and
    nothing is imported from it: the app is the node's installed one.
    """
    module = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    def install_from_fab(fab_content: bytes, *_: Any, **__: Any) -> None:
        check(fab_content, current_run_id())

    module.install_from_fab = install_from_fab
    module.get_load_client_app_fn = lambda *_, **__: lambda *_a, **_k: load_client_app()
    _quiet_refusals(module, refusal)


def run_guarded_serverapp(
    check: Callable[[bytes, int | None], None],
    load_server_app: Callable[[], Any],
    refusal: type[BaseException],
    *,
    runtime_api_address: str,
    token: str,
    insecure: bool,
    root_certificates_path: str | None,
    parent_pid: int | None,
) -> None:
    """Flower's ``flwr-serverapp`` for one run, running only the app ``load_server_app`` returns.

    ``check(fab_content, run_id)`` sees the run's bundle before Flower installs it and raises
    ``refusal`` to refuse (the run then fails with that reason). The bundle's own component
    reference is never imported: Flower runs the coordinator's installed app.
    """
    from queue import Queue

    from flwr.supercore.logger import mirror_output_to_queue, restore_output
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    module = importlib.import_module("flwr.superlink.runtime.run_serverapp")

    install = module.install_from_fab
    run = module.run_

    def install_from_fab(fab_content: bytes, *args: Any, **kwargs: Any) -> Any:
        check(fab_content, current_run_id())
        return install(fab_content, *args, **kwargs)

    def run_installed(grid: Any, context: Any, server_app_dir: str, **_: Any) -> Any:
        return run(grid=grid, context=context, server_app_dir=server_app_dir, loaded_server_app=load_server_app())

    module.install_from_fab = install_from_fab
    module.run_ = run_installed
    _quiet_refusals(module, refusal)
    quicken_object_pulls("flwr.superlink.grid.http_grid")  # replies are pulled as soon as they are whole
    log_queue: Queue[str | None] = Queue()
    mirror_output_to_queue(log_queue)
    try:
        module.run_serverapp(
            runtime_api_address=runtime_api_address,
            log_queue=log_queue,
            token=token,
            insecure=insecure,
            certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
            parent_pid=parent_pid,
            runtime_dependency_install=False,
        )
    finally:
        restore_output()


# ----------------------------------------------------------------------------- deployment grid


def is_network_grid(grid: Any) -> bool:
    """Whether ``grid`` is Flower's deployment grid (messages through a SuperLink), not an in-process one.

    Raises
    ------
    RuntimeError
        When Flower no longer has its deployment grid where flowerbed looks for it.
    """
    module = sys.modules.get(_HTTP_GRID_MODULE)
    if module is None:  # never imported in this process, so ``grid`` is not one (importing it takes seconds)
        return False
    http_grid = getattr(module, "HttpGrid", None)
    if http_grid is None:
        raise RuntimeError(
            f"Flower {_flower_version()} moved its deployment grid ({_HTTP_GRID_MODULE}.HttpGrid): "
            "update flowerbed.flower_internals.is_network_grid"
        )
    return isinstance(grid, http_grid)


_HTTP_GRID_MODULE = "flwr.superlink.grid.http_grid"


# ------------------------------------------------------------------- fixed waits on a round's path


def cap_supernode_idle_sleep(capped_time: Any) -> None:
    """Make Flower's SuperNode loop use ``capped_time`` (a stand-in ``time`` module) for its sleeps.

    The loop's sleeps are its idle poll (``time.sleep(3)`` when the SuperLink has no message), its
    check for the ClientApp's reply and its wait for a reply's objects (``time.sleep(0.5)``).

    Raises
    ------
    RuntimeError
        When the SuperNode loop no longer sleeps through its module's ``time``.
    """
    import inspect

    module = importlib.import_module("flwr.supernode.start_client_internal")
    if not callable(getattr(getattr(module, "time", None), "sleep", None)) or "time.sleep(3)" not in inspect.getsource(
        module
    ):
        raise RuntimeError(
            f"Flower {_flower_version()} changed the SuperNode loop (flwr.supernode.start_client_internal): "
            "its idle poll can no longer be capped; update flowerbed.flower_internals.cap_supernode_idle_sleep"
        )
    module.time = capped_time


def on_message_stored(callback: Callable[[], None]) -> None:
    """Call ``callback`` each time Flower's SuperNode has pulled a message and its objects into its state.

    The message's task is then ready for the node's executor.

    Raises
    ------
    RuntimeError
        When the SuperNode loop no longer stores messages through ``_pull_and_store_message``.
    """
    import inspect

    module = importlib.import_module("flwr.supernode.start_client_internal")
    pull = getattr(module, "_pull_and_store_message", None)
    if not callable(pull) or "run_id = _pull_and_store_message(" not in inspect.getsource(module):
        raise RuntimeError(
            f"Flower {_flower_version()} changed how the SuperNode stores a message "
            "(flwr.supernode.start_client_internal._pull_and_store_message): update "
            "flowerbed.flower_internals.on_message_stored"
        )

    def pull_and_store(*args: Any, **kwargs: Any) -> int | None:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            callback()
        return run_id

    module._pull_and_store_message = pull_and_store


def superexec_wait(sleep: Callable[[float], None]) -> None:
    """Make Flower's SuperExec loop wait between two task polls with ``sleep`` (it gets Flower's interval).

    Raises
    ------
    RuntimeError
        When the loop no longer sleeps ``time.sleep(task_poll_interval)`` through its module's ``time``.
    """
    import inspect
    import time

    module = importlib.import_module("flwr.supercore.superexec.run_superexec")
    if getattr(module, "time", None) is not time or "time.sleep(task_poll_interval)" not in inspect.getsource(module):
        raise RuntimeError(
            f"Flower {_flower_version()} changed the SuperExec loop's wait (flwr.supercore.superexec.run_superexec): "
            "update flowerbed.flower_internals.superexec_wait"
        )
    module.time = time_with_sleep(sleep)


def time_with_sleep(sleep: Callable[[float], None]) -> Any:
    """A stand-in for the ``time`` module (every public name of it) whose ``sleep`` is ``sleep``."""
    import time
    from types import SimpleNamespace

    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    return SimpleNamespace(**{**names, "sleep": sleep})


#: Where Flower pulls a message's objects with ``pull_objects``' retry: (module, function).
OBJECT_PULLERS = (
    ("flwr.supernode.start_client_internal", "pull_objects"),  # the SuperNode, from the SuperLink
    ("flwr.supernode.runtime.run_clientapp", "pull_and_inflate_object_from_tree"),  # the ClientApp, from its node
    ("flwr.superlink.grid.http_grid", "pull_objects"),  # the ServerApp, replies from the SuperLink
)


def quicken_object_pulls(*modules: str, initial_backoff: float = 0.05, backoff_cap: float = 1.0) -> None:
    """Make Flower retry an object that is not there yet after ``initial_backoff`` s, doubling up to ``backoff_cap``.

    The number of tries per object is left unlimited, so that Flower's limit on the whole pull's
    time (two hours) still decides when to give up, as with its own back-off.

    A message becomes visible before its objects: the SuperLink hands a node a message (and the
    ServerApp a reply), and a node hands its executor a task, while the objects are still being
    pushed. Flower's puller then waits 1 s, 2 s, 4 s ... (up to 10 s) before asking again, which on
    loopback is most of an exchange. ``modules`` picks pullers of ``OBJECT_PULLERS`` (default: all).

    Raises
    ------
    RuntimeError
        When a puller is gone, no longer called by that name, or no longer takes the back-off and
        limit keywords.
    """
    import functools
    import inspect

    for module_name, name in OBJECT_PULLERS:
        if modules and module_name not in modules:
            continue
        module = importlib.import_module(module_name)
        original = getattr(module, name, None)
        original = getattr(original, "func", original)  # applied before: replace it, never stack
        params = inspect.signature(original).parameters if callable(original) else {}
        called = f"{name}(" in inspect.getsource(module)
        if not called or not {"initial_backoff", "backoff_cap", "max_tries_per_object", "max_time"} <= params.keys():
            raise RuntimeError(
                f"Flower {_flower_version()} changed {module_name}.{name} (its pull retry): "
                "update flowerbed.flower_internals.quicken_object_pulls"
            )
        quick = functools.partial(
            original, initial_backoff=initial_backoff, backoff_cap=backoff_cap, max_tries_per_object=None
        )
        setattr(module, name, quick)


def _flower_version() -> str:
    import flwr

    return str(flwr.__version__)
