"""Send messages and collect their replies, polling briskly.

Flower's deployment grid waits 3 s between polls in ``Grid.send_and_receive``; a round has at least
two exchanges, so that alone adds seconds to every round. Here the first poll comes after 50 ms and
the interval doubles up to 0.25 s; a poll that brings replies sets it back to 50 ms, since the other
nodes' replies tend to follow closely. A long round costs four small requests a second.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_POLL = 0.05
MAX_POLL = 0.25


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Push ``messages`` and return the replies that arrive within ``timeout`` seconds."""
    pending = set(grid.push_messages(list(messages)))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    interval = FIRST_POLL
    while pending:
        arrived = 0
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            arrived += 1
        if not pending or time.monotonic() >= deadline:
            break
        interval = FIRST_POLL if arrived else interval
        time.sleep(min(interval, max(deadline - time.monotonic(), 0.0)))
        interval = min(interval * 2, MAX_POLL)
    return replies
