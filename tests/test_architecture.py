"""The architecture holds: dependencies point one way, no import cycles, one home for each rule.

Layers, lowest first (a module may import its own package and any lower layer, nothing else):

    flowerbed (root: experiment, protocol, exception, weights, kit, ...)
    tasks, privacy, strategies
    client, server
    simulations
    benchmarks, flowerbed.cli (entry points)

Every ``import`` counts, also those inside functions: a late import hides a cycle, it does not
remove it. The tests are not part of the graph, and nothing in it may import them.
"""

from __future__ import annotations

import ast
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGES = ("flowerbed", "tasks", "privacy", "strategies", "client", "server", "simulations", "benchmarks")
LAYER = {
    "root": 0,
    "tasks": 1,
    "privacy": 1,
    "strategies": 1,
    "client": 2,
    "server": 2,
    "simulations": 3,
    "benchmarks": 4,
    "entry": 4,
}
ENTRY_POINTS = {"flowerbed.cli"}


def _modules() -> dict[str, Path]:
    modules = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            prefix = ["flowerbed"] if folder == "flowerbed" else ["flowerbed", folder]
            modules[".".join(prefix + parts)] = path
    return modules


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if (
                    target.startswith("flowerbed.tests")
                    or target.startswith("tests.")
                    or (target in modules and target != name)
                ):
                    edges[name].add(target)
    return edges


def _package(module: str) -> str:
    if module in ENTRY_POINTS:
        return "entry"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "root"


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: every group of modules that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in list(edges):
        if v not in index:
            visit(v)
    return groups


def wrong_way_edges(edges: dict[str, set[str]]) -> list[str]:
    """Every import that points up the layers or sideways into another package of the same layer."""
    bad = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            if target.startswith(("flowerbed.tests", "tests.")):
                bad.append(f"{source} -> {target} (nothing outside tests/ imports the tests)")
                continue
            a, b = _package(source), _package(target)
            if a != b and LAYER[b] >= LAYER[a]:
                bad.append(f"{source} -> {target} ({a} may not import {b})")
    return bad


def test_dependencies_point_one_way():
    assert wrong_way_edges(_edges(_modules())) == []


def test_no_import_cycles():
    assert _strongly_connected(_edges(_modules())) == []


def test_the_checks_catch_what_they_are_for():
    edges = {
        "flowerbed.server.federation": {"flowerbed.simulations.scenarios"},
        "flowerbed.client.app": {"flowerbed.client.secagg_handlers"},
        "flowerbed.client.secagg_handlers": {"flowerbed.client.app"},
        "flowerbed.benchmarks.deployment_overhead": {"flowerbed.tests.deployment_harness"},
        "flowerbed.tasks.task": {"flowerbed.privacy.dp_sgd"},
    }
    bad = wrong_way_edges(edges)
    assert len(bad) == 3 and all(" -> " in b for b in bad)
    assert _strongly_connected(edges) == [["flowerbed.client.app", "flowerbed.client.secagg_handlers"]]


def _grep(pattern: str) -> list[str]:
    """``file:line`` of every line of the package's source matching ``pattern``.

    The benchmarks are left out: the one that measures Flower's own SecAgg+ drives Flower's
    modules directly, as the reference it is compared with.
    """
    hits = []
    for name, path in _modules().items():
        if name.startswith("flowerbed.benchmarks"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line):
                hits.append(f"{path.relative_to(ROOT)}:{number}")
    return hits


@pytest.mark.parametrize(
    ("what", "pattern", "home"),
    [
        ("the budget refusal", r"privacy budget exhausted", "privacy/ledger.py"),
        ("the plain-training refusal", r"only trains with differential privacy", "client/node_round.py"),
        ("the simulated ledger's path", r"ledger\.sqlite\"", "client/node_round.py"),
        (
            "a change to Opacus",
            r"^\s*(opacus|prvs|rdp_analysis|prv_analysis)\.[\w.]+\s*=[^=]|^\s*rdp\._\w+\s*=|setattr\((opacus|prvs|rdp|rdp_analysis|prv_analysis)\b",
            None,
        ),
        (
            "Flower's private internals",
            r"__dict__\[\"_data\"\]|_SyncedDict|\"_message_id\"|get_executor =|flwr\.supercore",
            "flowerbed/flower_internals.py",
        ),
    ],
)
def test_each_rule_has_one_home(what: str, pattern: str, home: str | None):
    hits = _grep(pattern)
    outside = [h for h in hits if home is None or not h.startswith(home + ":")]
    assert outside == [], f"{what} written outside {home or 'flowerbed'}: {outside}"
    if home is not None:
        assert hits, f"{what} not found in {home}: the test looks for the wrong thing"


def test_the_tests_are_not_shipped():
    text = (ROOT / "pyproject.toml").read_text()
    assert "flowerbed.tests" not in text
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False).stdout
    if tracked:  # in a git checkout: no module outside tests/ names the tests package
        assert not _grep(r"from (flowerbed\.)?tests|import (flowerbed\.)?tests")
