"""``flower-supernode`` with a shorter idle poll.

Flower 1.42's SuperNode asks the SuperLink for a new message, and when there is none it sleeps
three seconds (``time.sleep(3)`` in ``flwr.supernode.start_client_internal``); while its ClientApp
works it checks for the reply every half second. Each message therefore waits 1.5 s on average
before the node even sees it, twice per round (train, evaluate). This launcher runs Flower's own
``flower_supernode`` entry point unchanged, except that sleeps inside that one module are capped
at ``--poll-interval`` seconds. A hospital node costs the coordinator a few more small requests
per second; nothing else changes. If Flower renames the module's ``time`` import, the cap simply
stops applying.

    python -m flowerbed.client.supernode_launcher --poll-interval 0.25 -- <flower-supernode args>
"""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

from flowerbed.process_control import quiet_main

DEFAULT_POLL_INTERVAL = 0.25


def capped_time(poll_interval: float) -> SimpleNamespace:
    """A stand-in for the ``time`` module whose ``sleep`` never exceeds ``poll_interval``."""
    names = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    names["sleep"] = lambda seconds: time.sleep(min(float(seconds), poll_interval))
    return SimpleNamespace(**names)


def main(argv: list[str] | None = None) -> None:
    """Parse ``--poll-interval``, then hand the remaining arguments to Flower's SuperNode."""
    args = list(sys.argv[1:] if argv is None else argv)
    poll_interval = DEFAULT_POLL_INTERVAL
    if args[:1] == ["--poll-interval"]:
        poll_interval = float(args[1])
        args = args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not 0 < poll_interval <= 3:
        raise SystemExit("--poll-interval must be in (0, 3] seconds")

    from flwr.supernode.cli.flower_supernode import flower_supernode

    from flowerbed import flower_internals

    flower_internals.cap_supernode_idle_sleep(capped_time(poll_interval))
    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    quiet_main(main)
