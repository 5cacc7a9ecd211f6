"""The operator's credential: only the coordinator's operator starts, lists and stops runs.

Flower 1.42's SuperLink serves the hospitals' Fleet API, the operators' Control API and the
ServerApp's Runtime API on one port, and its open-source build authenticates Control API calls
only through an external OpenID Connect provider. flowerbed uses Flower's own plugin interface for
that check (``ControlAuthnPlugin``) with a plugin of its own: a bearer token made by ``flowerbed
provision`` (``provision/coordinator/operator.token``, mode 0600, never part of a hospital kit),
compared in constant time. ``flowerbed run ...`` sends it on every call through Flower's CLI
(``python -m flowerbed.server.operator_cli``); anyone else, including a hospital holding its kit,
is refused with ``REFUSAL``.

A coordinator started with ``--insecure`` (a trial on one machine) keeps its token in its state
folder instead (``<state>/operator.token``), made when it starts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from flowerbed.exception import ConfigError

TOKEN_FILE_ENV = "FLOWERBED_OPERATOR_TOKEN_FILE"
REFUSAL = (
    "this coordinator starts, lists and stops runs only for its operator: the request carried no valid "
    "operator token. Hospital kits and the CA certificate do not grant it; the operator runs "
    "`flowerbed run ...` on the coordinator, which sends provision/coordinator/operator.token"
)


def new_token() -> bytes:
    """A fresh operator token (256 random bits, URL-safe text, one line)."""
    return (secrets.token_urlsafe(32) + "\n").encode()


def read_token(path: Path) -> str:
    """The operator token in ``path``.

    Raises
    ------
    ConfigError
        When the file is missing, empty or readable by other users (names the fix).
    """
    if not path.is_file():
        raise ConfigError(
            str(path),
            ["the operator token is missing: run `flowerbed provision FEDERATION.toml` (it adds what is missing)"],
        )
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise ConfigError(str(path), [f"the operator token is readable by other users: run chmod 600 {path}"])
    token = path.read_text().strip()
    if not token:
        raise ConfigError(str(path), ["the operator token is empty: delete the file and run `flowerbed provision`"])
    return token


class TokenCheck:
    """Whether a presented bearer token is the operator's, compared in constant time."""

    def __init__(self, token: str) -> None:
        self._digest = hashlib.sha256(token.encode()).digest()

    def __call__(self, presented: str | None) -> bool:
        """``True`` only for the operator's token."""
        digest = hashlib.sha256((presented or "").encode()).digest()
        return hmac.compare_digest(digest, self._digest) and presented is not None
