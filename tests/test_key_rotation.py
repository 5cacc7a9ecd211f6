"""Key rotation and revocation against a real SuperLink (TLS, node authentication) on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowerbed.benchmarks.deployment_harness import free_port, write_federation
from flowerbed.server.coordinator import Coordinator, CoordinatorPaths, _ControlClient, register_nodes
from flowerbed.server.federation_config import load_federation
from flowerbed.server.provisioning import provision

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _node_ids(federation) -> set[int]:
    from flwr.proto.control_pb2 import ListNodesRequest

    control = _ControlClient(federation, insecure=False)
    try:
        nodes = control.client.ListNodes(ListNodesRequest()).nodes_info
    finally:
        control.close()
    return {int(n.node_id) for n in nodes if not n.unregistered_at and n.status != "unregistered"}


def test_rotated_and_removed_keys_are_revoked(tmp_path: Path) -> None:
    path = write_federation(tmp_path, ["cleveland", "hungary"], free_port())
    federation = load_federation(path)
    provision(federation)
    coordinator = Coordinator(federation)
    messages: list[str] = []
    try:
        coordinator.start(timeout=120, log=messages.append)
        first = json.loads(CoordinatorPaths(federation.state_dir).registry.read_text())
        assert {s: e["node_id"] for s, e in first.items()}.keys() == {"cleveland", "hungary"}
        assert {e["node_id"] for e in first.values()} <= _node_ids(federation)

        # idempotent: registering again changes nothing
        assert register_nodes(federation, messages.append) == {s: e["node_id"] for s, e in first.items()}
        assert "site cleveland: key already registered" in messages

        # rotate cleveland's key: the new key is registered, the old node id is revoked
        provision(federation, sites=["cleveland"], force=True)
        rotated = register_nodes(federation, messages.append)
        assert rotated["cleveland"] != first["cleveland"]["node_id"]
        assert rotated["hungary"] == first["hungary"]["node_id"]
        live = _node_ids(federation)
        assert rotated["cleveland"] in live and first["cleveland"]["node_id"] not in live

        # a hospital leaves the federation file: its key is revoked
        path.write_text(path.read_text().replace('[[sites]]\nname = "hungary"\n', ""))
        remaining = register_nodes(load_federation(path), messages.append)
        assert set(remaining) == {"cleveland"}
        assert rotated["hungary"] not in _node_ids(federation)
        assert any("hungary is no longer in the federation file" in m for m in messages)
    finally:
        coordinator.stop()
