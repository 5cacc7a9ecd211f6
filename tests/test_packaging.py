"""The wheel: every folder is a ``flowerbed.*`` package, data ships, tests do not, nothing lands at the top level."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import ROOT

SUBPACKAGES = ("server", "client", "strategies", "privacy", "simulations", "tasks", "benchmarks")

CHECK = """
import importlib.util, sys, pathlib, flowerbed
site = pathlib.Path(flowerbed.__file__).parents[1]
assert 'site-packages' in str(site), site
for name in {names}:
    spec = importlib.util.find_spec('flowerbed.' + name)
    assert spec is not None and str(site) in spec.origin, (name, spec)
    assert not (site / name).exists(), 'top-level ' + name + ' in site-packages'
assert not (site / 'flowerbed' / 'tests').exists(), 'the tests are shipped'
data = site / 'flowerbed' / 'tasks' / 'data' / 'heart_disease'
assert len(list(data.glob('processed.*.data'))) == 4 and (data / 'README.md').is_file()
assert (site / 'flowerbed' / 'simulations' / 'experiments' / 'heart.toml').is_file()
print('ok')
"""


def test_wheel_installs_every_folder_under_flowerbed(tmp_path: Path):
    # A clean environment: no PYTHONPATH (Ray, for one, leaves it set) may reach the new venv.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        timeout=300,
        env=clean,
    )
    wheel = next(dist.glob("flowerbed-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.split("/")[0] in (*SUBPACKAGES, "tests")], (
        "a folder escaped the flowerbed package"
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120, env=clean)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        timeout=300,
        env=clean,
    )
    result = subprocess.run(
        [str(python), "-c", CHECK.format(names=SUBPACKAGES)],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
