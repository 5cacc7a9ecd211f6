"""An in-process Grid: the ServerApp's messages go straight to ClientApp calls, no Ray, no copies.

Each virtual node has its own ``Context`` (node config with ``partition-id``, persistent state), as
on Flower's simulation engine, and runs the very same ClientApp. Messages are handled one after
another in this process; see ``inline_backend`` for the vectorized path.
"""

from __future__ import annotations

import gc
import itertools
import secrets
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from flowerbed.flower_internals import enter_task_identity, in_process_run, set_message_id
from flowerbed.server.reply_block import ReplyBlock

MessageHandler = Callable[[list[tuple[Message, Context]]], list[Message]]


class InlineGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process.

    Parameters
    ----------
    client_app : ClientApp
        The app every virtual node runs.
    num_nodes : int
        Virtual nodes; node ``i`` gets ``partition-id = i``.
    batch_handler : callable, optional
        Handles a whole batch of (message, context) pairs at once (e.g. vectorized training);
        returns one reply per pair or raises ``NotImplementedError`` to fall back to one call each.
    freeze_after_first : bool (default: False)
        ``gc.freeze()`` once the first exchange is answered; the caller must ``gc.unfreeze()``.
    """

    keeps_arrays_in_process = True  # messages never leave the process: the coordinator sends arrays in memory

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        batch_handler: MessageHandler | None = None,
        *,
        freeze_after_first: bool = False,
    ) -> None:
        self.client_app = client_app
        self.batch_handler = batch_handler
        self._freeze_pending = freeze_after_first
        self._run = in_process_run(secrets.randbits(63))
        enter_task_identity(self._run.run_id, secrets.randbits(63))
        self.contexts: dict[int, Context] = {}
        for partition_id in range(num_nodes):
            node_id = secrets.randbits(63)
            self.contexts[node_id] = Context(
                run_id=self._run.run_id,
                node_id=node_id,
                node_config={"partition-id": partition_id, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
        self._replies: dict[str, Message] = {}
        self._ids = itertools.count()  # message ids: this grid's prefix and a counter (unique, cheaper than uuid4)
        self._id_prefix = uuid4().hex

    def _next_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    def set_run(self, run) -> None:
        """Use ``run``'s identity."""
        self._run = run

    @property
    def run(self):
        """The run."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl=None):
        """Deprecated Flower helper, kept for strategies that still call it."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """Every virtual node."""
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Handle the messages now; their replies wait for ``pull_messages``."""
        pending: list[tuple[Message, Context]] = []
        for message in messages:
            set_message_id(message, self._next_id())
            pending.append((message, self.contexts[message.metadata.dst_node_id]))
        replies = None
        if self.batch_handler is not None and pending:
            try:
                replies = self.batch_handler(pending)
            except NotImplementedError:
                replies = None
        if replies is None:
            replies = [self.client_app(message, context) for message, context in pending]
        for (message, _), reply in zip(pending, replies, strict=True):
            self._replies[message.metadata.message_id] = reply
        self._freeze_once()
        return [message.metadata.message_id for message, _ in pending]

    def _freeze_once(self) -> None:
        """After the first exchange (discovery: every node has loaded its data), freeze what the run keeps.

        Full collections of the garbage collector then scan only what later rounds make (at 10,000
        nodes they took about 6 % of a round). Whoever asked for it (``run_inline``) unfreezes.
        """
        if self._freeze_pending:
            self._freeze_pending = False
            gc.collect()
            gc.freeze()

    def exchange_columnar(self, messages: Iterable[Message]) -> tuple[list[Message], list[ReplyBlock]]:
        """Handle the messages now; return the replies, with vectorized training replies as columns.

        A handler without a columnar form (or none at all) returns every reply as a message.
        """
        columnar = getattr(self.batch_handler, "columnar", None)
        if columnar is None:
            return self.send_and_receive(messages), []
        pending: list[tuple[Message, Context]] = []
        for message in messages:
            set_message_id(message, self._next_id())
            pending.append((message, self.contexts[message.metadata.dst_node_id]))
        answered = columnar(pending) if pending else ([], [])
        self._freeze_once()
        return answered

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to ``message_ids``."""
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Handle every message and return every reply (no polling, no waiting)."""
        return self.pull_messages(self.push_messages(messages))
