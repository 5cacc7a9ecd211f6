"""Progress displays for the round loop: a rich terminal view, or Flower's log (deployments)."""

from __future__ import annotations

from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common.logger import log
from rich.console import Console

from flowerbed.experiment import Experiment

SHOWN = ("train-loss", "loss", "accuracy")


def round_line(record: dict[str, Any], total_rounds: int, elapsed: float) -> str:
    """One human line per round: the main metrics, sites, refusals and epsilon."""
    parts = [f"round {record['round']:>3}/{total_rounds}"]
    if "train-loss" in record["train"]:
        parts.append(f"train-loss {record['train']['train-loss']:.4f}")
    for label, group in (("fed", record.get("evaluate", {})), ("central", record.get("central", {}))):
        if "accuracy" in group:
            parts.append(f"{label}-acc {group['accuracy']:.3f}")
    parts.append(f"sites {len(record['participants'])}/{len(record['sampled'])}")
    if record.get("epsilon_max") is not None:
        parts.append(f"eps-max {record['epsilon_max']:.3f}")
    if record["refused"]:
        parts.append(f"refused {len(record['refused'])}")
    parts.append(f"{elapsed:.1f}s")
    return "  ".join(parts)


class ConsoleReporter:
    """Per-round progress on the terminal (rich)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)

    def run_started(self, experiment: Experiment, run_dir: Path, first_round: int) -> None:
        """Say what runs and where it writes."""
        verb = "resuming at round" if first_round > 1 else "starting"
        self.console.print(
            f"[bold]{experiment.name}[/]: {verb} {first_round if first_round > 1 else ''}"
            f" | {experiment.strategy.name} | {experiment.rounds} rounds | run folder {run_dir}"
        )

    def round_finished(self, record: dict[str, Any], total_rounds: int, elapsed: float) -> None:
        """Print the round's line and any refusals."""
        self.console.print(round_line(record, total_rounds, elapsed))
        for site, reason in record["refused"].items():
            self.console.print(f"  [yellow]{site}[/]: {reason}")

    def note(self, text: str) -> None:
        """Print a notice."""
        self.console.print(f"[yellow]{text}[/]")

    def run_finished(self, summary: dict[str, Any]) -> None:
        """Say how the run ended."""
        if summary.get("stopped"):
            self.console.print(f"[yellow]run stopped: {summary['stopped']}[/]")


class LogReporter:
    """Progress through Flower's logger (what the SuperLink's ``flwr log`` shows)."""

    def run_started(self, experiment: Experiment, run_dir: Path, first_round: int) -> None:
        """Log the start."""
        log(
            INFO,
            "flowerbed %s: round %d of %d, run folder %s",
            experiment.name,
            first_round,
            experiment.rounds,
            run_dir,
        )

    def round_finished(self, record: dict[str, Any], total_rounds: int, elapsed: float) -> None:
        """Log the round's line."""
        log(INFO, "flowerbed %s", round_line(record, total_rounds, elapsed))
        for site, reason in record["refused"].items():
            log(INFO, "flowerbed   %s: %s", site, reason)

    def note(self, text: str) -> None:
        """Log a notice."""
        log(INFO, "flowerbed %s", text)

    def run_finished(self, summary: dict[str, Any]) -> None:
        """Log how the run ended."""
        log(INFO, "flowerbed run finished: %s rounds, stopped=%s", summary["rounds_completed"], summary["stopped"])
