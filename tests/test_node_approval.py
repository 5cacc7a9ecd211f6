"""Node-side task approval and the offline data check."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flowerbed.benchmarks.deployment_harness import HEART_DATA
from flowerbed.client.approval import approve_task, check_task_approved, revoke_task, task_source
from flowerbed.client.node import check_node_data
from flowerbed.exception import DataError, TaskError
from flowerbed.experiment import Experiment
from flowerbed.tasks.data.heart import SCHEMA

TASK = "approval_demo.tasks:task"


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed user task package ``approval_demo`` (two modules)."""
    package = tmp_path / "site" / "approval_demo"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("HIDDEN = 32\n")
    (package / "tasks.py").write_text(
        "from flowerbed.tasks.registry import resolve_task\ntask = resolve_task('tabular-logreg')\n"
    )
    monkeypatch.syspath_prepend(str(package.parent))
    yield package
    for name in [m for m in sys.modules if m.startswith("approval_demo")]:
        del sys.modules[name]


def _node(tmp_path: Path, site: str = "cleveland") -> dict:
    return {"data-path": "x.csv", "site": site, "approvals": str(tmp_path / "approved.json")}


def test_builtin_tasks_always_run(tmp_path: Path) -> None:
    check_task_approved("tabular-mlp", _node(tmp_path))
    with pytest.raises(TaskError, match="built in"):
        approve_task("tabular-mlp", tmp_path / "approved.json")


def test_user_task_needs_approval_of_its_current_source(tmp_path: Path, user_package: Path) -> None:
    node = _node(tmp_path)
    with pytest.raises(TaskError, match=r"task 'approval_demo.tasks:task' is not approved on this node \(cleveland\)"):
        check_task_approved(TASK, node)

    source = approve_task(TASK, tmp_path / "approved.json")
    assert {p.name for p in source.files} == {"__init__.py", "helpers.py", "tasks.py"}
    check_task_approved(TASK, node)

    # any module of the package changes: refused until approved again
    (user_package / "helpers.py").write_text("HIDDEN = 64\n")
    assert task_source(TASK).sha256 != source.sha256
    with pytest.raises(TaskError, match="changed since it was approved.*flowerbed node approve"):
        check_task_approved(TASK, node)
    approve_task(TASK, tmp_path / "approved.json")
    check_task_approved(TASK, node)

    # approvals are per node (file), and can be withdrawn
    with pytest.raises(TaskError, match="not approved"):
        check_task_approved(TASK, {**node, "approvals": str(tmp_path / "other.json")})
    assert revoke_task(TASK, tmp_path / "approved.json")
    with pytest.raises(TaskError, match="not approved"):
        check_task_approved(TASK, node)


def test_simulated_nodes_allow_user_tasks(tmp_path: Path) -> None:
    check_task_approved("not_installed.anywhere:task", {"partition-id": 0, "num-partitions": 4})
    with pytest.raises(TaskError, match="not approved"):
        check_task_approved("not_installed.anywhere:task", _node(tmp_path))
    with pytest.raises(TaskError, match="not installed"):
        approve_task("not_installed.anywhere:task", tmp_path / "approved.json")


def test_node_check_reads_the_hospital_file(tmp_path: Path) -> None:
    result = check_node_data(HEART_DATA / "processed.hungarian.data", "hungary", Experiment())
    assert result.num_train > 100 and result.num_test > 30
    assert result.num_features == SCHEMA.num_features and set(result.class_counts) == {0, 1}
    assert any("missing" in note for note in result.notes)


def test_node_check_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        check_node_data(tmp_path / "missing.data", "x", Experiment())
    broken = tmp_path / "broken.data"
    broken.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(DataError, match=str(broken)):
        check_node_data(broken, "x", Experiment())
    with pytest.raises(TaskError, match="not approved"):
        experiment = Experiment.model_validate({"task": {"name": "some_pkg.mod:task"}})
        check_node_data(HEART_DATA / "processed.va.data", "va", experiment, {"approvals": str(tmp_path / "a.json")})
