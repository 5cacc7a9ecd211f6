"""Flower's ``flwr`` command, carrying the operator's token on every Control API call.

``flowerbed run ...`` runs ``flwr run``, ``flwr ls``, ``flwr log`` and ``flwr stop`` through this
module; the token file is named by ``$FLOWERBED_OPERATOR_TOKEN_FILE`` (never the command line)::

    FLOWERBED_OPERATOR_TOKEN_FILE=provision/coordinator/operator.token \\
        python -m flowerbed.server.operator_cli ls flowerbed
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flowerbed import flower_internals
from flowerbed.exception import FlowerbedError
from flowerbed.process_control import quiet_main
from flowerbed.server.operator_auth import TOKEN_FILE_ENV, read_token


def main(argv: list[str] | None = None) -> None:
    """Run ``flwr ARGV`` as the operator."""
    path = os.environ.get(TOKEN_FILE_ENV)
    if not path:
        raise SystemExit(f"flowerbed: set {TOKEN_FILE_ENV} to the operator token file")
    try:
        token = read_token(Path(path))
    except FlowerbedError as exc:
        raise SystemExit(f"flowerbed: {exc}") from None
    plugin = flower_internals.operator_cli_auth_plugin(token)
    flower_internals.run_flwr_cli_with_auth(plugin, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    quiet_main(main)
