"""``flower-supernode`` without Flower's fixed waits on a round's path.

Flower 1.42's SuperNode asks the SuperLink for a new message, and when there is none it sleeps
three seconds (``time.sleep(3)`` in ``flwr.supernode.start_client_internal``): a message waits
1.5 s on average before the node even sees it, twice per round (train, evaluate). While its
ClientApp works it checks its own state for the reply every half second, and it pulls a message's
objects with a retry that waits 1 s, then 2 s, ... when the SuperLink hands out the message before
its objects are all there. This launcher runs Flower's own ``flower_supernode`` entry point
unchanged, except that

- the idle poll sleeps at most ``--poll-interval`` seconds (a node costs the coordinator a few
  small requests per second);
- the local checks for a reply sleep at most ``LOCAL_WAIT`` seconds (nothing leaves the node);
- an object that is not there yet is asked for again after 50 ms, doubling up to 1 s;
- with ``--wake-file PATH``, each message the node has pulled (with its objects) appends a byte to
  ``PATH``: the node's executor watches that file instead of asking the node for work every 50 ms
  (``flowerbed.client.warm_executor``).

If Flower changes any of these, the launcher fails at start-up naming what changed
(``flowerbed.flower_internals``); ``flowerbed node start --poll-interval 0`` runs Flower's
``flower-supernode`` as it is.

    python -m flowerbed.client.supernode_launcher --poll-interval 0.2 --wake-file W -- <flower-supernode args>
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from flowerbed.process_control import quiet_main

DEFAULT_POLL_INTERVAL = 0.2
LOCAL_WAIT = 0.05
IDLE_SLEEP = 1.0  # Flower sleeps this long or longer only when the SuperLink had nothing


def capped_time(poll_interval: float, local_wait: float = LOCAL_WAIT) -> SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep`` waits at most ``poll_interval`` seconds.

    Sleeps shorter than ``IDLE_SLEEP`` (the node's checks of its own state) wait at most
    ``min(poll_interval, local_wait)``.
    """
    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}

    def sleep(seconds: float) -> None:
        seconds = float(seconds)
        cap = poll_interval if seconds >= IDLE_SLEEP else min(poll_interval, local_wait)
        time.sleep(min(seconds, cap))

    names["sleep"] = sleep
    return SimpleNamespace(**names)


def wake_file_writer(path: Path) -> Callable[[], None]:
    """What tells the node's executor that a message is ready: one byte appended to ``path``."""

    def wake() -> None:
        try:
            with path.open("ab") as handle:
                handle.write(b".")
        except OSError:  # the executor falls back to polling
            pass

    return wake


def parse_args(argv: list[str]) -> tuple[float, Path | None, list[str]]:
    """``--poll-interval S`` and ``--wake-file PATH`` (both optional), then ``--`` and Flower's arguments."""
    ours, flower = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else ([], argv)
    poll_interval, wake_file = DEFAULT_POLL_INTERVAL, None
    while ours:
        if len(ours) < 2 or ours[0] not in ("--poll-interval", "--wake-file"):
            raise SystemExit(f"supernode_launcher: unexpected {ours[0]!r}; use --poll-interval S, --wake-file PATH, --")
        if ours[0] == "--poll-interval":
            poll_interval = float(ours[1])
        else:
            wake_file = Path(ours[1])
        ours = ours[2:]
    if not 0 < poll_interval <= 3:
        raise SystemExit("--poll-interval must be in (0, 3] seconds")
    return poll_interval, wake_file, flower


def main(argv: list[str] | None = None) -> None:
    """Parse our options, then hand the remaining arguments to Flower's SuperNode."""
    poll_interval, wake_file, args = parse_args(list(sys.argv[1:] if argv is None else argv))

    from flwr.supernode.cli.flower_supernode import flower_supernode

    from flowerbed import flower_internals

    flower_internals.cap_supernode_idle_sleep(capped_time(poll_interval))
    flower_internals.quicken_object_pulls("flwr.supernode.start_client_internal")
    if wake_file is not None:
        flower_internals.on_message_stored(wake_file_writer(wake_file))
    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    quiet_main(main)
