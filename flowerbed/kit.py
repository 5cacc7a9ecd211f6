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
        The node's private authentication key (OpenSSH format).
    """

    folder: Path
    site: str
    federation: str
    coordinator: str
    ca_cert: Path
    node_key: Path


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
    )
    for path in (kit.ca_cert, kit.node_key):
        if not path.is_file():
            raise NodeError(f"{path}: missing from the kit; ask the coordinator for a new kit")
    if os.name == "posix" and kit.node_key.stat().st_mode & 0o077:
        raise NodeError(f"{kit.node_key}: private key is readable by other users; run chmod 600 {kit.node_key}")
    return kit
