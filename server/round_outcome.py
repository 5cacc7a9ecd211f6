"""What one exchange of a round is about: the chosen nodes, and the replies sorted into accepted and refused."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from flowerbed.server.reply_block import ReplyBlock


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
    blocks: list[ReplyBlock] = field(default_factory=list)  # accepted training replies as columns

    @property
    def count(self) -> int:
        """Accepted replies, as messages and in blocks."""
        return len(self.accepted) + sum(len(b) for b in self.blocks)

    def participants(self) -> list[str]:
        """The sites whose replies were accepted, sorted."""
        return sorted([site for site, _ in self.accepted] + [site for b in self.blocks for site in b.sites])

    def for_strategy(self) -> list[Message]:
        """What the strategy aggregates: each accepted message, and one equivalent reply per block."""
        return [m for _, m in self.accepted] + [b.equivalent_reply() for b in self.blocks if len(b)]
