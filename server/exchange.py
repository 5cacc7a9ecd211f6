"""Send messages and collect their replies, polling briskly.

Flower's deployment grid waits 3 s between polls in ``Grid.send_and_receive``; a round has at least
two exchanges, so that alone adds seconds to every round. Here the first poll comes after 50 ms and
the interval doubles up to 0.25 s; a poll that brings replies sets it back to 50 ms, since the other
nodes' replies tend to follow closely. A long round costs four small requests a second.

Over the network (Flower's deployment grid) each message's content travels packed, as one envelope
record where it is small enough (``flowerbed.packed_arrays``): a message's objects each cost the
SuperLink a request.
A reply that does not unpack becomes an error reply naming its node.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Error, Message
from flwr.serverapp import Grid

from flowerbed import flower_internals
from flowerbed.packed_arrays import PackError, pack_content, unpack_content
from flowerbed.protocol import ErrorCode

FIRST_POLL = 0.05
MAX_POLL = 0.25


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Push ``messages`` and return the replies that arrive within ``timeout`` seconds."""
    messages = list(messages)
    packed = flower_internals.is_network_grid(grid)
    originals = [message.content for message in messages] if packed else []
    try:
        for message, content in zip(messages, originals, strict=False):
            message.content, _ = pack_content(content)
        ids = list(grid.push_messages(messages))
    finally:  # the caller's messages keep their own content
        for message, content in zip(messages, originals, strict=False):
            message.content = content
    sent = {i: m for i, m in zip(ids, messages, strict=False) if i}  # Flower returns no id for a refused push
    pending = set(sent)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    interval = FIRST_POLL
    while pending:
        arrived = 0
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(unpacked(reply, sent.get(reply.metadata.reply_to_message_id)) if packed else reply)
            arrived += 1
        if not pending or time.monotonic() >= deadline:
            break
        interval = FIRST_POLL if arrived else interval
        time.sleep(min(interval, max(deadline - time.monotonic(), 0.0)))
        interval = min(interval * 2, MAX_POLL)
    return replies


def unpacked(reply: Message, request: Message | None) -> Message:
    """``reply`` with its packed content unpacked; an error reply naming its node when it does not unpack."""
    if reply.has_error() or request is None:  # no request of ours: the reply is left for the checks to refuse
        return reply
    try:
        reply.content, _ = unpack_content(reply.content)
    except Exception as exc:  # whatever a node sends, the round goes on without its reply
        detail = str(exc) if isinstance(exc, PackError) else f"{type(exc).__name__} while reading them"
        reason = f"node {reply.metadata.src_node_id}: its reply's arrays do not unpack: {detail}"
        return Message(Error(code=int(ErrorCode.NODE_ERROR), reason=reason), reply_to=request)
    return reply
