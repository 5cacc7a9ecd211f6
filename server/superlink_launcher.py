"""``flower-superlink`` whose Control API admits only the coordinator's operator.

Runs Flower's own ``flower-superlink`` entry point unchanged except for one part: the Control API
authentication plugin, which Flower's open-source build leaves open (``NoOp``), is flowerbed's
operator-token check (``flowerbed.server.operator_auth``). Hospitals' Fleet API (TLS and node
authentication) and the Runtime API (SuperExec authentication) are Flower's as they are.
``flowerbed coordinator start`` starts it::

    python -m flowerbed.server.superlink_launcher --operator-token-file F --parent-pid PID -- <flower-superlink args>

With ``--parent-pid`` the SuperLink stops (as on SIGTERM) when that process is gone.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from flowerbed import flower_internals
from flowerbed.exception import FlowerbedError
from flowerbed.process_control import quiet_main, watch_parent
from flowerbed.server.operator_auth import REFUSAL, TokenCheck, read_token


def main(argv: list[str] | None = None) -> None:
    """Parse the launcher's options, then run Flower's SuperLink with the remaining arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    split = args.index("--") if "--" in args else len(args)
    parser = argparse.ArgumentParser(description="flower-superlink with operator authentication")
    parser.add_argument("--operator-token-file", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    options = parser.parse_args(args[:split])
    try:
        token = read_token(options.operator_token_file)
    except FlowerbedError as exc:
        raise SystemExit(f"flowerbed superlink: {exc}") from None
    if options.parent_pid is not None:
        watch_parent(options.parent_pid, lambda: os.kill(os.getpid(), signal.SIGTERM))
    plugin = flower_internals.operator_authn_plugin(TokenCheck(token), REFUSAL)
    flower_internals.run_superlink_with_authn(plugin, args[split + 1 :])


if __name__ == "__main__":
    quiet_main(main)
