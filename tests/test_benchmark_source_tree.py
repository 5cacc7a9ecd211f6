"""A benchmark's "before" system imports the source tree it is given, laid out as the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from flowerbed.benchmarks.source_tree import source_tree_path


def test_a_source_tree_imports_as_flowerbed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "flowerbed").mkdir(parents=True)
    (src / "server").mkdir()
    (src / "flowerbed" / "__init__.py").write_text("WHERE = 'before'\n")
    (src / "server" / "__init__.py").write_text("")
    (src / "server" / "exchange.py").write_text("POLL = 'old'\n")
    (src / "pyproject.toml").write_text(
        '[tool.setuptools.package-dir]\n"flowerbed" = "flowerbed"\n"flowerbed.server" = "server"\n'
    )
    root = source_tree_path(src, tmp_path / "run")
    out = subprocess.run(
        [sys.executable, "-c", "import flowerbed, flowerbed.server.exchange as e; print(flowerbed.WHERE, e.POLL)"],
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert out.stdout.split() == ["before", "old"]
