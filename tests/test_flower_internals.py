"""Each assumption ``flowerbed.flower_internals`` makes about Flower still holds for the installed Flower.

A failure here means a Flower release changed an internal flowerbed relies on: the message says
which function of ``flowerbed/flower_internals.py`` to update.
"""

from __future__ import annotations

import importlib
import inspect

import flwr
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from flowerbed import flower_internals as fi


def _changed(what: str, function: str) -> str:
    return f"Flower {flwr.__version__} changed {what}: update flowerbed.flower_internals.{function}"


def test_the_installed_flower_is_the_series_flowerbed_was_written_for():
    assert flwr.__version__.startswith(fi.FLOWER_SERIES), _changed("its version", "FLOWER_SERIES")


@pytest.mark.parametrize(
    ("kind", "values"),
    [(ConfigRecord, {"name": "va", "rounds": [1, 2]}), (MetricRecord, {"num-examples": 3, "loss": 0.5})],
)
def test_records_filled_directly_equal_records_built_by_flower(kind, values):
    built = kind(dict(values))
    assert fi.record_data(built) == values, _changed("the storage behind records", "record_data")
    assert fi.filled(kind(), values) == built, _changed("record storage", "filled")


def test_typed_views_equal_flowers_own():
    content = RecordDict({"metrics": MetricRecord({"a": 1.0}), "site": ConfigRecord({"name": "x"})})
    view = fi.typed_view(content, MetricRecord, {"metrics": content["metrics"]})
    assert dict(view) == dict(content.metric_records), _changed("RecordDict's typed views", "typed_view")


def test_arrays_made_without_serializing_equal_flowers():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    reference = Array.from_numpy_ndarray(values)
    array = Array.__new__(Array)
    fi.init_numpy_array(array, str(values.dtype), values.shape)
    assert (array.dtype, tuple(array.shape), array.stype) == (
        reference.dtype,
        tuple(reference.shape),
        reference.stype,
    ), _changed("Array's metadata", "init_numpy_array")
    record = ArrayRecord()
    fi.record_data(record)["w"] = reference
    assert np.array_equal(record["w"].numpy(), values), _changed("ArrayRecord's storage", "record_data")


def test_an_in_process_run_can_make_and_number_messages():
    run = fi.in_process_run(7)
    assert run.run_id == 7, _changed("Run.create_empty", "in_process_run")
    fi.enter_task_identity(7, 11)
    message = Message(RecordDict(), dst_node_id=1, message_type="query")
    fi.set_message_id(message, "abc")
    assert message.metadata.message_id == "abc", _changed("Message metadata", "set_message_id")


def test_quick_fanout_builds_the_messages_flower_builds():
    from flwr.serverapp.strategy import FedAvg, FedProx

    fi.enter_task_identity(7, 11)
    content = RecordDict({"config": ConfigRecord({"lr": 0.1})})
    reference = FedAvg()._construct_messages(content, [3, 5, 9], "train")
    quick = FedProx()
    fi.quick_fanout(quick)
    assert "_construct_messages" in vars(quick), _changed("FedAvg._construct_messages", "quick_fanout")
    copies = quick._construct_messages(content, [3, 5, 9], "train")
    for ours, theirs in zip(copies, reference, strict=True):
        mine, flowers = ours.metadata.__dict__, theirs.metadata.__dict__
        assert mine.keys() == flowers.keys(), _changed("Message metadata", "quick_fanout")
        assert {k: v for k, v in mine.items() if k != "_created_at"} == {
            k: v for k, v in flowers.items() if k != "_created_at"
        }, _changed("Message metadata", "quick_fanout")
        assert ours.content is content and not ours.has_error(), _changed("Message storage", "quick_fanout")
    fi.set_message_id(copies[1], "x")
    assert copies[0].metadata.message_id == "" and copies[1].metadata.dst_node_id == 5  # copies do not alias
    assert quick._construct_messages(content, [], "train") == []
    fi.quick_fanout(custom := type("Custom", (FedAvg,), {"_construct_messages": lambda *a: []})())
    assert "_construct_messages" not in vars(custom)  # a class with its own construction keeps it


def test_the_superexec_loop_takes_an_executor_the_way_flowerbed_gives_it():
    from flwr.supercore.superexec import run_superexec as superexec

    assert callable(getattr(superexec, "get_executor", None)), _changed(
        "run_superexec.get_executor", "run_superexec_with"
    )
    params = inspect.signature(superexec.run_superexec).parameters
    for name in ("runtime_api_address", "insecure", "parent_pid", "runtime_dependency_install"):
        assert name in params, _changed(f"run_superexec's argument {name!r}", "run_superexec_with")
    fallback = fi.subprocess_executor()
    for method in ("launch", "reconcile", "get_eligible_capacity"):
        assert callable(getattr(fallback, method, None)), _changed(
            f"the executor protocol ({method})", "subprocess_executor"
        )
    assert fi.clientapp_task_type() is not None and fi.launch_accepted() is not None
    run_clientapp, certificates = fi.clientapp_runner()
    params = inspect.signature(run_clientapp).parameters
    for name in (
        "runtime_api_address",
        "token",
        "insecure",
        "certificates",
        "parent_pid",
        "runtime_dependency_install",
    ):
        assert name in params, _changed(f"run_clientapp's argument {name!r}", "clientapp_runner")
    assert certificates(None, True) is None


def test_control_api_errors_read_as_flowers():
    assert fi.flower_error_message("not json") is None


def test_the_superlink_takes_flowerbeds_control_api_authentication():
    from flwr.common.constant import NOOP_FLWR_AID
    from flwr.supercore.error import FlowerError
    from flwr.superlink.auth_plugin import ControlAuthnPlugin

    module = importlib.import_module("flwr.superlink.cli.flower_superlink")

    assert callable(getattr(module, "load_control_authn_plugin", None)), _changed(
        "where flower-superlink loads its Control API plugin", "run_superlink_with_authn"
    )
    source = inspect.getsource(module._parse_superlink_lifespan_config)
    assert "load_control_authn_plugin()" in source, _changed(
        "flower-superlink's plugin loading", "run_superlink_with_authn"
    )
    plugin = fi.operator_authn_plugin(lambda token: token == "right", "go away")
    assert isinstance(plugin, ControlAuthnPlugin), _changed("ControlAuthnPlugin", "operator_authn_plugin")
    from flwr.common.constant import ACCESS_TOKEN_KEY

    valid, account = plugin.validate_tokens_in_metadata([(ACCESS_TOKEN_KEY, "right")])
    assert valid and account.flwr_aid == NOOP_FLWR_AID, _changed("the Control API account", "operator_authn_plugin")
    for metadata in ([], [(ACCESS_TOKEN_KEY, "wrong")], [(ACCESS_TOKEN_KEY, "right"), (ACCESS_TOKEN_KEY, "right")]):
        with pytest.raises(FlowerError) as refused:
            plugin.validate_tokens_in_metadata(metadata)
        assert refused.value.public_details == "go away"
    from flwr.superlink.dependencies.account import AccountAccessDependency

    assert "validate_tokens_in_metadata" in inspect.getsource(AccountAccessDependency), _changed(
        "how the Control API checks a request", "operator_authn_plugin"
    )


def test_flowers_cli_sends_flowerbeds_operator_token():
    from flwr.cli import utils
    from flwr.cli.app import app
    from flwr.cli.auth_plugin import CliAuthPlugin
    from flwr.common.constant import ACCESS_TOKEN_KEY

    plugin = fi.operator_cli_auth_plugin("secret")
    assert isinstance(plugin, CliAuthPlugin)
    assert (ACCESS_TOKEN_KEY, "secret") in list(plugin.write_tokens_to_metadata([]))
    assert "auth_plugin" in inspect.signature(utils.init_http_client_from_connection).parameters, _changed(
        "init_http_client_from_connection's auth_plugin", "operator_cli_auth_plugin"
    )
    source = inspect.getsource(utils.init_http_client_from_connection)
    assert "load_cli_auth_plugin_from_connection(" in source and "CliAccountAuthHttpInterceptor" in source, _changed(
        "how the flwr CLI finds its auth plugin", "run_flwr_cli_with_auth"
    )
    assert callable(app), _changed("the flwr CLI app", "run_flwr_cli_with_auth")


def test_the_clientapp_runner_can_be_guarded(monkeypatch: pytest.MonkeyPatch):
    module = importlib.import_module("flwr.supernode.runtime.run_clientapp")

    source = inspect.getsource(module.run_clientapp)
    install, load = source.find("install_from_fab(fab.content"), source.find("get_load_client_app_fn(")
    assert 0 < install < load < source.find("client_app(message=message"), _changed(
        "run_clientapp's install-then-load order", "guard_clientapp_runtime"
    )
    assert source.find("pull_task_input(client)") < install, _changed("run_clientapp's inputs", "current_run_id")
    for name in ("install_from_fab", "get_load_client_app_fn", "log"):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test

    class Refused(Exception):
        pass

    seen = []

    def check(content: bytes, run_id: int | None) -> None:
        seen.append(content)
        if content == b"bad":
            raise Refused

    fi.guard_clientapp_runtime(check, lambda: "the installed app", Refused)
    with pytest.raises(Refused):
        module.install_from_fab(b"bad", skip_prompt=True)
    assert module.install_from_fab(b"good", skip_prompt=True) is None and seen == [b"bad", b"good"]
    assert module.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)("a/b", "1", "h") == (
        "the installed app"
    )
    module.log(40, "%s raised an exception", "ClientApp", exc_info=Refused())  # one line, no traceback


def test_the_serverapp_runner_can_be_guarded():
    from flwr.server.run_serverapp import run
    from flwr.supercore.logger import mirror_output_to_queue, restore_output

    module = importlib.import_module("flwr.superlink.runtime.run_serverapp")

    source = inspect.getsource(module.run_serverapp)
    install, load = source.find("install_from_fab(fab.content"), source.find("run_(")
    assert 0 < source.find("TaskIdentity.run_id =") < install < load, _changed(
        "run_serverapp's order (run id, install, load)", "run_guarded_serverapp"
    )
    assert all(callable(getattr(module, n, None)) for n in ("install_from_fab", "run_", "log", "run_serverapp"))
    assert "loaded_server_app" in inspect.signature(run).parameters, _changed(
        "run's loaded_server_app", "run_guarded_serverapp"
    )
    assert callable(mirror_output_to_queue) and callable(restore_output)
    assert fi.current_run_id() is None or isinstance(fi.current_run_id(), int)


def test_the_executors_take_only_their_own_task_type():
    from flwr.supercore.superexec import run_superexec as superexec

    params = inspect.signature(superexec.run_superexec).parameters
    for name in ("superexec_auth_secret", "root_certificates_path"):
        assert name in params, _changed(f"run_superexec's argument {name!r}", "run_superexec_with")
    assert fi.serverapp_task_type() != fi.clientapp_task_type()
    assert fi.launch_refused("no").status.value == "failed", _changed("LaunchResult.failed", "launch_refused")


def test_the_supernode_idle_sleep_can_be_capped():
    import time

    module = importlib.import_module("flwr.supernode.start_client_internal")
    assert module.time is time and "time.sleep(" in inspect.getsource(module), _changed(
        "the SuperNode's sleep", "cap_supernode_idle_sleep"
    )
