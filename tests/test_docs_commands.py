"""Every ``flowerbed`` command in the README's and docs' code blocks exists as written, and the cheap ones run.

Each command line is parsed as a shell would (continuations, ``&&``, comments): its subcommands must
exist, its ``--help`` must answer and every option it uses must be one the command takes. Those that
need no servers and little time run for real: a partition, and a hospital's first steps on the
documented federation file (provision, then ``node check`` of a kit against a bundled file).
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import click
import click.testing
import pytest
import typer
from typer.testing import CliRunner

from flowerbed.cli import _register, app

from .conftest import HEART_DATA, ROOT

_register()
ROOT_COMMAND = typer.main.get_command(app)  # built once: typer builds it again on every invoke
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console", ""}
FENCE = re.compile(r"^\s*```(\w*)\s*$")


def doc_commands() -> list[tuple[str, list[str]]]:
    """(``file:line``, argv after ``flowerbed``) of every ``flowerbed`` command in a shell code block."""
    found = []
    for doc in DOCS:
        block: str | None = None
        pending, start = "", 0
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            fence = FENCE.match(line)
            if fence:
                block = None if block is not None else fence.group(1)
                continue
            if block not in SHELL_BLOCKS:
                continue
            text = line.strip()
            if not pending:  # a console block's commands follow a prompt; the rest is their output
                if block == "console" and not text.startswith("$ "):
                    continue
                text, start = text.removeprefix("$ "), number
                if not re.search(r"(^|&&|;)\s*flowerbed\s", text):
                    continue
            text = f"{pending} {text}".strip() if pending else text
            if text.endswith("\\"):
                pending = text[:-1].strip()
                continue
            pending = ""
            words = shlex.split(text, comments=True)
            segment: list[str] = []
            for word in [*words, "&&"]:
                if word in ("&&", ";", "||"):
                    if segment[:1] == ["flowerbed"]:
                        found.append((f"{doc.relative_to(ROOT)}:{start}", segment[1:]))
                    segment = []
                else:
                    segment.append(word)
    return found


COMMANDS = doc_commands()


def resolve(argv: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """The command ``argv`` names, its path of subcommands, and the rest of the words."""
    command: click.Command = ROOT_COMMAND
    path: list[str] = []
    rest = list(argv)
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        path.append(rest[0])
        command = command.commands[rest.pop(0)]
    return command, path, rest


def test_the_docs_hold_commands() -> None:
    places = {where.split(":")[0] for where, _ in COMMANDS}
    assert {"README.md", "docs/deployment.md", "docs/simulation.md"} <= places
    assert len(COMMANDS) >= 25


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[f"{w} {' '.join(a[:2])}" for w, a in COMMANDS])
def test_every_documented_command_exists_as_written(where: str, argv: list[str]) -> None:
    command, path, rest = resolve(argv)
    assert not isinstance(command, click.Group), f"{where}: `flowerbed {' '.join(argv)}` names no command"
    result = click.testing.CliRunner().invoke(ROOT_COMMAND, [*path, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output, f"{where}: {result.output}"
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    used = {word.split("=")[0] for word in rest if word.startswith("-") and word != "-"}
    assert used <= options, f"{where}: `flowerbed {' '.join(path)}` has no option {sorted(used - options)}"
    for word in rest:  # files of this repository that a command names exist
        if word.startswith(("simulations/", "docs/", "tasks/")):
            assert (ROOT / word).exists(), f"{where}: {word} does not exist"


def test_no_doc_names_an_experiment_file_that_does_not_exist() -> None:
    for doc in DOCS:
        stale = re.findall(r"(?<![\w/])experiments/heart\.toml", doc.read_text())
        assert not stale, f"{doc.name}: experiments/heart.toml is simulations/experiments/heart.toml"


def _documented(doc: str, prefix: str) -> list[str]:
    """The first command of ``doc`` that starts with ``prefix``."""
    (argv,) = [argv for where, argv in COMMANDS if where.startswith(doc) and " ".join(argv).startswith(prefix)][:1]
    return argv


def test_the_documented_partition_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    partition = _documented("docs/simulation.md", "partition simulations/experiments/digits_dirichlet.toml")
    result = CliRunner().invoke(app, partition)
    assert result.exit_code == 0, result.output
    assert "digits" in result.output


def test_a_hospitals_first_steps_run_as_documented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/deployment.md's federation file, provisioned; then a kit checks a bundled file, offline."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    (federation,) = [b for b in re.findall(r"```toml\n(.*?)```", text, re.S) if b.startswith("# federation.toml")]
    (tmp_path / "federation.toml").write_text(federation)
    monkeypatch.chdir(tmp_path)
    provision = CliRunner().invoke(app, _documented("docs/deployment.md", "provision federation.toml"))
    assert provision.exit_code == 0, provision.output
    output = tomllib.loads(federation)["output"]
    kit = tmp_path / output / "kits" / "cleveland"
    places = {"/opt/flowerbed/kit": str(kit), "/data/heart.csv": str(HEART_DATA / "processed.cleveland.data")}
    documented = _documented("docs/deployment.md", "node check --kit /opt/flowerbed/kit")
    check = [places.get(word, word) for word in documented]
    result = CliRunner().invoke(app, check)
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and "nothing was sent anywhere" in result.output
    status = CliRunner().invoke(app, _documented("docs/deployment.md", "run status -f federation.toml"))
    assert status.exit_code != 0 and "no runs were started on this coordinator" in str(status.exception)
