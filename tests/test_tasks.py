"""Tasks: built-ins, user tasks by reference, devices, and the same initial weights everywhere."""

from __future__ import annotations

import pytest
import torch

from flowerbed.exception import ConfigError, TaskError
from flowerbed.privacy.dp_sgd import make_private_compatible
from flowerbed.server.run_folder import read_summary
from flowerbed.simulations.simulate import simulate
from flowerbed.tasks import DataSchema, resolve_device, resolve_task

TABULAR = DataSchema("tabular", (22,), 2)
IMAGE = DataSchema("image", (1, 8, 8), 10)


@pytest.mark.parametrize(
    ("name", "schema"), [("tabular-logreg", TABULAR), ("tabular-mlp", TABULAR), ("image-cnn", IMAGE)]
)
def test_builtin_models_map_inputs_to_class_logits(name, schema):
    model = resolve_task(name).build_model(schema, seed=0)
    assert model(torch.zeros(5, *schema.input_shape)).shape == (5, schema.num_classes)


def test_same_seed_same_initial_weights():
    task = resolve_task("tabular-mlp", {"hidden": [16, 8]})
    a, b = task.build_model(TABULAR, seed=3), task.build_model(TABULAR, seed=3)
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), key
    assert not torch.equal(task.build_model(TABULAR, seed=4)[1].weight, a[1].weight)


def test_unknown_task_and_bad_args_are_named():
    with pytest.raises(TaskError, match="task.name = 'resnet' is unknown"):
        resolve_task("resnet")
    with pytest.raises(TaskError, match="task.args for 'tabular-mlp' are invalid"):
        resolve_task("tabular-mlp", {"depth": 3})
    with pytest.raises(TaskError, match="cannot be imported"):
        resolve_task("no_such_module:task")


def test_user_task_by_reference_trains_in_a_federation(heart_experiment):
    name = "tests.user_task_example:wide_mlp"
    task = resolve_task(name, {"width": 12})
    assert task.build_model(TABULAR)[1].out_features == 12
    run_dir = simulate(heart_experiment(f"task.name={name!r}", "task.args={width=12}", "rounds=2"), quiet=True)
    assert read_summary(run_dir)["rounds_completed"] == 2


def test_device_is_cuda_when_available_else_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is visible here"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu-please")


def test_private_models_replace_batchnorm_the_same_way_everywhere():
    from torch import nn

    from flowerbed.tasks import Task

    def with_batchnorm(schema: DataSchema) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)
        )

    task = Task(name="bn", model_fn=with_batchnorm, kinds=("image",))
    server = make_private_compatible(task.build_model(IMAGE, seed=1))
    node = make_private_compatible(task.build_model(IMAGE))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in server.modules())
    assert server.state_dict().keys() == node.state_dict().keys()
    node.load_state_dict(server.state_dict())
    assert any(isinstance(m, nn.BatchNorm2d) for m in task.build_model(IMAGE).modules())
