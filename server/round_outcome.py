"""What one exchange of a round is about: the chosen nodes, and the replies sorted into accepted and refused."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid


class NodeSubset:
    """A view of a ``Grid`` that exposes only the chosen nodes, so a strategy samples exactly them."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid = grid
        self._node_ids = sorted(node_ids)

    def get_node_ids(self) -> list[int]:
        """The chosen nodes, sorted."""
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@dataclass
class RoundOutcome:
    """Replies of one exchange: accepted (sorted by site), refused (site -> reason) and the refusals' codes."""

    accepted: list[tuple[str, Message]] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)  # site -> the node's ErrorCode, for node refusals
