"""A hospital's start-up kit: its layout, and how a node reads and checks it.

``flowerbed provision`` (the operator's side, ``flowerbed.server.provisioning``) writes kits;
``flowerbed node`` (the hospital's side) reads them. This module is the one both agree on.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from flowerbed.exception import NodeError

KIT_FILE = "kit.toml"


@dataclass(frozen=True)
class NodeKit:
    """A hospital's start-up kit, as read by ``flowerbed node``.

    Parameters
    ----------
    folder : Path
        The kit's folder.
    site : str
        The hospital's site name (the node reports it in every reply).
    federation : str
        The federation's name.
    coordinator : str
        The coordinator's address, ``host:port``.
    ca_cert : Path
        The CA certificate that the coordinator's TLS certificate must chain to.
    node_key : Path
        The node's private authentication key (OpenSSH format); it also signs the node's
        secure-aggregation keys.
    node_cert : Path | None (default: None)
        The federation CA's certificate for the node key, naming the site: the node's identity in
        secure aggregation (``None``: a kit provisioned before node certificates existed).
    contract : Path | None (default: None)
        The federation's data contract (``contract.json``), when its federation file names one:
        the node reads its data only as this contract says.
    """

    folder: Path
    site: str
    federation: str
    coordinator: str
    ca_cert: Path
    node_key: Path
    node_cert: Path | None = None
    contract: Path | None = None


# ---------------------------------------------------------------------------------------------
# keys and certificates


def load_kit(folder: str | Path) -> NodeKit:
    """Read and check a start-up kit folder.

    Raises
    ------
    NodeError
        Naming the kit file that is missing or malformed and what to do.
    """
    folder = Path(folder).expanduser().resolve()
    kit_file = folder / KIT_FILE
    if not kit_file.is_file():
        raise NodeError(f"{folder}: not a start-up kit ({KIT_FILE} missing); use the folder the coordinator sent")
    try:
        data = tomllib.loads(kit_file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise NodeError(f"{kit_file}: not valid TOML: {exc}") from None
    missing = [k for k in ("site", "coordinator", "ca", "node_key") if not isinstance(data.get(k), str)]
    if missing:
        raise NodeError(f"{kit_file}: missing {', '.join(missing)}; ask the coordinator for a new kit")
    kit = NodeKit(
        folder=folder,
        site=data["site"],
        federation=str(data.get("federation", "")),
        coordinator=data["coordinator"],
        ca_cert=folder / data["ca"],
        node_key=folder / data["node_key"],
        node_cert=folder / data["node_cert"] if isinstance(data.get("node_cert"), str) else None,
        contract=folder / data["contract"] if isinstance(data.get("contract"), str) else None,
    )
    for path in (kit.ca_cert, kit.node_key, *(p for p in (kit.node_cert, kit.contract) if p)):
        if not path.is_file():
            raise NodeError(f"{path}: missing from the kit; ask the coordinator for a new kit")
    if os.name == "posix" and kit.node_key.stat().st_mode & 0o077:
        raise NodeError(f"{kit.node_key}: private key is readable by other users; run chmod 600 {kit.node_key}")
    return kit
