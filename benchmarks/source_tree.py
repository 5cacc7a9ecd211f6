"""Run a benchmark's "before" system from another flowerbed source tree (``--before-src DIR``).

``DIR`` is a checkout of an earlier revision, for instance ``git archive REV | tar -x -C DIR``; its
processes import it through ``PYTHONPATH``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path


def source_tree_path(src: Path, folder: Path) -> Path:
    """A folder to put on ``PYTHONPATH`` so that ``import flowerbed`` imports the source tree ``src``.

    The package's layout comes from ``src/pyproject.toml`` (``[tool.setuptools.package-dir]``),
    built with symbolic links.
    """
    mapping = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    root = folder / "before-src"
    package = root / "flowerbed"
    package.mkdir(parents=True)
    for entry in (src / mapping["flowerbed"]).iterdir():
        (package / entry.name).symlink_to(entry.resolve())
    for name, where in mapping.items():
        parts = name.split(".")[1:]
        if len(parts) == 1 and not (package / parts[0]).exists():
            (package / parts[0]).symlink_to((src / where).resolve(), target_is_directory=True)
    return root
