"""``flower-supernode`` without Flower's fixed waits on a round's path.

Flower 1.42's SuperNode asks the SuperLink for a new message, and when there is none it sleeps
three seconds (``time.sleep(3)`` in ``flwr.supernode.start_client_internal``): a message waits
1.5 s on average before the node even sees it, twice per round (train, evaluate). While its
ClientApp works it checks its own state for the reply every half second, and it pulls a message's
objects with a retry that waits 1 s, then 2 s, ... when the SuperLink hands out the message before
its objects are all there. This launcher runs Flower's own ``flower_supernode`` entry point
unchanged, except that

- while a run is going on (a message in the last two minutes), the idle poll sleeps at most
  ``--poll-interval`` seconds (a node costs the coordinator a few small requests per second); an
  idle node polls as Flower's does, every 3 s;
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
MIN_POLL_INTERVAL = 0.05
MAX_POLL_INTERVAL = 3.0
LOCAL_WAIT = 0.05
IDLE_SLEEP = 1.0  # Flower sleeps this long or longer only when the SuperLink had nothing
ACTIVE_FOR = 120.0  # seconds after the node's last message during which it polls at --poll-interval


def poll_interval_problem(value: float) -> str | None:
    """Why ``value`` is not a usable ``--poll-interval`` (``None`` if it is; 0 means Flower's own wait)."""
    if value == 0 or MIN_POLL_INTERVAL <= value <= MAX_POLL_INTERVAL:
        return None
    return (
        f"--poll-interval {value:g}: use 0 (Flower's own 3 s wait) or {MIN_POLL_INTERVAL:g} to "
        f"{MAX_POLL_INTERVAL:g} seconds"
    )


class Activity:
    """When the node last pulled a message: a run is going on while that is recent."""

    def __init__(self) -> None:
        self.last = -float("inf")

    def note(self) -> None:
        """A message was pulled just now."""
        self.last = time.monotonic()

    def recent(self, window: float) -> bool:
        """Whether a message was pulled in the last ``window`` seconds."""
        return time.monotonic() - self.last < window


def capped_time(
    poll_interval: float,
    local_wait: float = LOCAL_WAIT,
    activity: Activity | None = None,
    active_for: float = ACTIVE_FOR,
) -> SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep`` waits at most ``poll_interval`` seconds.

    Sleeps shorter than ``IDLE_SLEEP`` (the node's checks of its own state) wait at most
    ``min(poll_interval, local_wait)``. With ``activity``, the idle poll is capped only while a
    message came in the last ``active_for`` seconds: an idle node asks the coordinator as seldom as
    Flower's own does, and a node in a run asks briskly.
    """
    from flowerbed.flower_internals import time_with_sleep

    def sleep(seconds: float) -> None:
        seconds = float(seconds)
        if seconds < IDLE_SLEEP:
            cap = min(poll_interval, local_wait)
        elif activity is None or activity.recent(active_for):
            cap = poll_interval
        else:
            cap = seconds
        time.sleep(min(seconds, cap))

    return time_with_sleep(sleep)


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
            try:
                poll_interval = float(ours[1])
            except ValueError:
                raise SystemExit(f"--poll-interval {ours[1]!r}: give a number of seconds") from None
        else:
            wake_file = Path(ours[1])
        ours = ours[2:]
    problem = poll_interval_problem(poll_interval)
    if problem is not None or poll_interval == 0:
        raise SystemExit(problem or "--poll-interval 0: run flower-supernode itself for Flower's own wait")
    return poll_interval, wake_file, flower


def main(argv: list[str] | None = None) -> None:
    """Parse our options, then hand the remaining arguments to Flower's SuperNode."""
    poll_interval, wake_file, args = parse_args(list(sys.argv[1:] if argv is None else argv))

    from flwr.supernode.cli.flower_supernode import flower_supernode

    from flowerbed import flower_internals

    activity = Activity()
    wake = wake_file_writer(wake_file) if wake_file is not None else None

    def message_stored() -> None:
        activity.note()
        if wake is not None:
            wake()

    flower_internals.cap_supernode_idle_sleep(capped_time(poll_interval, activity=activity))
    flower_internals.quicken_object_pulls("flwr.supernode.start_client_internal")
    flower_internals.on_message_stored(message_stored)
    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    quiet_main(main)
