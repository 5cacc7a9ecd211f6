"""The ``flowerbed`` command: help everywhere, and clear one-line errors instead of tracebacks."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
import typer

from flowerbed.cli import _register, app

_register()


def all_command_paths() -> list[list[str]]:
    root = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(command: click.Command, prefix: list[str]) -> None:
        paths.append(prefix)
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*prefix, name])

    walk(root, [])
    return paths


@pytest.mark.parametrize("path", all_command_paths(), ids=lambda p: " ".join(p) or "flowerbed")
def test_every_command_has_help(path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowerbed.cli", *args], capture_output=True, text=True, timeout=120)


def test_missing_experiment_file_is_one_clear_error(tmp_path):
    result = run_cli("simulate", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert "missing.toml" in result.stderr and "file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_strategy_is_one_clear_error(tmp_path):
    result = run_cli("simulate", "--set", "strategy.name=FedMagic", "--set", "backend.name=inline", "-o", str(tmp_path))
    assert result.returncode == 2
    assert "strategy.name = 'FedMagic' is unknown" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_data_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,label\n1,2,0\n1,oops,1\n")
    result = run_cli(
        "simulate", "--set", "data.dataset=csv", "--set", f"data.path={str(bad)!r}", "--set",
        "data.partition.kind=iid", "--set", "backend.name=inline", "-o", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 2
    assert "bad.csv, line 3, column 'b': 'oops' is not a number" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_imports_no_heavy_library():
    """``flowerbed --help`` answers at once: neither torch, nor opacus, nor Ray is imported for it."""
    import subprocess
    import sys

    probe = (
        "import sys\nsys.argv = ['flowerbed', '--help']\nfrom flowerbed import cli\n"
        "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'opacus', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_flowers_log_lines_show_once():
    """Opacus's import gives the root logger a handler; Flower's lines (its deprecation banner) then showed twice."""
    probe = (
        "import logging\nlogging.basicConfig()  # what importing Opacus does\nfrom flwr.common.logger import log\n"
        "from flowerbed.process_control import flower_logs_once\n"
        "log(logging.WARNING, 'before the fix')\nflower_logs_once()\nlog(logging.WARNING, 'DEPRECATED FEATURE')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert output.count("before the fix") == 2, "the probe reproduces the doubled line"
    assert output.count("DEPRECATED FEATURE") == 1


def test_a_slow_engine_start_is_announced_before_it_starts(heart_experiment):
    from flowerbed.experiment import Experiment
    from flowerbed.simulations.simulate import backend_line

    assert Experiment().backend.name == "inline", "simulations run in this process unless they ask for Ray"
    assert backend_line(heart_experiment(), 4) is None, "in this process the first round starts at once"
    ray = backend_line(heart_experiment("backend.name='flower'"), 4)
    assert ray.startswith("starting Flower's simulation engine (Ray) for 4 virtual nodes")
    workers = backend_line(heart_experiment("backend.workers=2"), 4)
    assert workers.startswith("starting Ray with 2 workers for 4 virtual nodes")
