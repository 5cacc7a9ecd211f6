"""Reading and validating TOML configuration files, with errors that name the file and the key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from flowerbed.exception import ConfigError

Model = TypeVar("Model", bound=BaseModel)


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; ``what`` says which file is expected (``an experiment .toml``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"file not found (give the path to {what})"])
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), [f"not valid TOML: {exc}"]) from None


def format_error(err: Any, docs: str) -> str:
    """One line for one pydantic error: the dotted key, the value, and what is allowed."""
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key (check the spelling; see {docs})"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if isinstance(value, dict | list):
        return f"{loc}: {msg}"
    return f"{loc} = {value!r}: {msg}"


def validate(model: type[Model], data: dict[str, Any], source: str, docs: str) -> Model:
    """``model.model_validate(data)``, every problem gathered into one ``ConfigError``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [format_error(e, docs) for e in exc.errors()]) from None


def find_file(value: str | Path) -> Path:
    """A file named by an absolute path, or relative to the working directory, else to flowerbed itself.

    flowerbed's own files (``simulations/experiments/heart.toml``) are found this way wherever the
    process runs, from a checkout or an installed wheel. Not found anywhere: ``value`` as given.
    """
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return path
    package = Path(__file__).resolve().parent  # an installed wheel: .../flowerbed; a checkout: <repo>/flowerbed
    return next((c for c in (package / path, package.parent / path) if c.is_file()), path)
