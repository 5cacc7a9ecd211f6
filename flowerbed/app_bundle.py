"""What a Flower app bundle (FAB) must look like for flowerbed's coordinator and nodes to run it.

A flowerbed run ships no code: the coordinator runs its own installed ``flowerbed.server.app:app``
and every hospital its own installed ``flowerbed.client.app:app``. A bundle therefore holds only
``pyproject.toml`` (whose ``[tool.flwr.app.components]`` name exactly those two apps and whose
``[project] dependencies`` are empty), plain configuration files, and Flower's ``.info/CONTENT``
manifest. Anything else, a ``.py`` file, a compiled module, a ``.pth`` file, a link, a path that
leaves the bundle, is refused before Flower installs or imports anything from it.

The coordinator's ServerApp process (``flowerbed.server.serverapp_executor``) and the node's
ClientApp processes (``flowerbed.client.warm_executor``) both call ``check_app_bundle``.
"""

from __future__ import annotations

import io
import stat
import tomllib
import zipfile
from pathlib import PurePosixPath

COMPONENTS = {"serverapp": "flowerbed.server.app:app", "clientapp": "flowerbed.client.app:app"}
CONFIG_SUFFIXES = frozenset({".toml", ".md", ".txt", ".json", ".jsonl", ".yaml", ".yml"})
CONFIG_NAMES = frozenset({"LICENSE", ".info/CONTENT"})
MAX_FILES = 64
MAX_UNPACKED_BYTES = 4 * 1024 * 1024


class AppBundleRefused(Exception):
    """A run's app bundle names or carries code other than the installed flowerbed.

    Parameters
    ----------
    run_id : int | None
        The Flower run the bundle belongs to (``None`` when unknown).
    problems : list[str]
        One line per reason.
    """

    def __init__(self, run_id: int | None, problems: list[str]) -> None:
        self.run_id = run_id
        self.problems = list(problems)
        run = f"run {run_id}" if run_id is not None else "a run"
        super().__init__(
            f"refused {run}: its app bundle {'; '.join(self.problems)}. flowerbed runs only its own installed "
            f"apps ({COMPONENTS['serverapp']}, {COMPONENTS['clientapp']}); submit runs with `flowerbed run start`"
        )


def bundle_problems(content: bytes) -> list[str]:
    """Every reason ``content`` is not a code-free flowerbed bundle (empty: it is one)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except (zipfile.BadZipFile, ValueError) as exc:
        return [f"is not a readable zip archive ({exc})"]
    with archive:
        members = archive.infolist()
        problems = _member_problems(members)
        pyproject = [m for m in members if m.filename == "pyproject.toml"]
        if len(pyproject) != 1 or pyproject[0].file_size > MAX_UNPACKED_BYTES:
            return [*problems, "has no pyproject.toml"] if not pyproject else problems
        try:
            config = tomllib.loads(archive.read(pyproject[0]).decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            return [*problems, f"has a pyproject.toml that is not valid TOML ({exc})"]
    return [*_config_problems(config), *problems]


def check_app_bundle(content: bytes, run_id: int | None = None) -> None:
    """Raise ``AppBundleRefused`` unless ``content`` is a code-free flowerbed bundle."""
    problems = bundle_problems(content)
    if problems:
        raise AppBundleRefused(run_id, problems)


def _member_problems(members: list[zipfile.ZipInfo]) -> list[str]:
    problems: list[str] = []
    if len(members) > MAX_FILES:
        problems.append(f"has {len(members)} files (at most {MAX_FILES})")
    if sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
        problems.append(f"unpacks to more than {MAX_UNPACKED_BYTES} bytes")
    seen: set[str] = set()
    for member in members:
        name = member.filename
        path = PurePosixPath(name)
        if name in seen:
            problems.append(f"holds {name!r} twice")
        seen.add(name)
        if member.is_dir():
            continue
        if path.is_absolute() or ".." in path.parts or "\\" in name or ":" in name:
            problems.append(f"has a file outside the bundle: {name!r}")
        elif stat.S_ISLNK(member.external_attr >> 16):
            problems.append(f"carries a link: {name!r}")
        elif name not in CONFIG_NAMES and path.suffix.lower() not in CONFIG_SUFFIXES:
            problems.append(f"carries a code file: {name!r}")
    return problems


def _config_problems(config: dict) -> list[str]:
    problems: list[str] = []
    app = config.get("tool", {}).get("flwr", {}).get("app", {})
    components = app.get("components") if isinstance(app, dict) else None
    if components != COMPONENTS:
        problems.append(f"names other code: [tool.flwr.app.components] is {components!r}, not {COMPONENTS!r}")
    project = config.get("project", {})
    dependencies = project.get("dependencies", []) if isinstance(project, dict) else None
    if dependencies:
        problems.append(f"asks for packages to install: [project] dependencies = {dependencies!r}")
    return problems
