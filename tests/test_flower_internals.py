"""Each assumption ``flowerbed.flower_internals`` makes about Flower still holds for the installed Flower.

A failure here means a Flower release changed an internal flowerbed relies on: the message says
which function of ``flowerbed/flower_internals.py`` to update.
"""

from __future__ import annotations

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
