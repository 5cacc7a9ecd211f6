"""Model selection on the federated validation metric: the best round so far, and early stopping.

Both are functions of the run's history (``metrics.jsonl`` records), so a resumed run picks up
exactly where the crashed one stood, with nothing more to checkpoint than the best weights; a
round loop keeps them up to date record by record (``SelectionProgress``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flowerbed.exception import ConfigError
from flowerbed.experiment import Experiment
from flowerbed.tasks.task import Task

#: What a DP evaluation release carries (noisy counts): the only metrics a DP run can select on.
DP_RELEASED = ("loss", "accuracy")


@dataclass(frozen=True)
class Selection:
    """How rounds are ranked on validation, and when the run stops.

    Parameters
    ----------
    metric : str
        A key of the validation replies (``loss``, ``accuracy`` or a task metric).
    greater_is_better : bool
        Direction of ``metric``.
    patience : int | None
        Validations without improvement after which the run stops (``None``: never).
    min_delta : float
        The least change that counts as an improvement.
    """

    metric: str
    greater_is_better: bool
    patience: int | None = None
    min_delta: float = 0.0

    def improves(self, value: float, best: float | None) -> bool:
        """Whether ``value`` beats ``best`` by more than ``min_delta``."""
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        return value > best + self.min_delta if self.greater_is_better else value < best - self.min_delta


def selection_for(experiment: Experiment, task: Task) -> Selection | None:
    """The run's selection rule, or ``None`` when its nodes hold no validation split.

    Raises
    ------
    ConfigError
        When a DP run would select on a metric that DP evaluation releases do not carry.
    """
    if experiment.data.validation_fraction <= 0:
        return None
    stopping = experiment.train.early_stopping
    metric = (stopping.metric if stopping else None) or task.primary_metric
    mode = stopping.mode if stopping else "auto"
    if mode == "auto":
        greater = False if metric == "loss" else (task.greater_is_better if metric == task.primary_metric else True)
    else:
        greater = mode == "max"
    if experiment.privacy.enabled and metric not in DP_RELEASED:
        raise ConfigError(
            "experiment (train.early_stopping.metric)",
            [
                f"a DP run's validation releases carry only {', '.join(DP_RELEASED)}, not {metric!r}: set "
                "train.early_stopping.metric = 'loss' (or 'accuracy')"
            ],
        )
    return Selection(metric, greater, stopping.patience if stopping else None, stopping.min_delta if stopping else 0.0)


def validation_value(record: dict[str, Any], metric: str) -> float | None:
    """A round's federated validation value of ``metric`` (``None`` where the round did not validate)."""
    value = record.get("validation", {}).get(metric)
    return None if value is None else float(value)


def best_round(history: Sequence[dict[str, Any]], selection: Selection) -> tuple[int, float] | None:
    """The round whose validation value last improved on every earlier one, with that value."""
    return SelectionProgress.of(history, selection).best


def stop_reason(history: Sequence[dict[str, Any]], selection: Selection) -> str | None:
    """Why the run stops early: ``patience`` validations in a row without improvement; else ``None``."""
    return SelectionProgress.of(history, selection).stop_reason()


@dataclass
class SelectionProgress:
    """``best_round`` and ``stop_reason`` of a growing history, kept up to date one record at a time.

    A round loop calls ``observe`` once per record instead of scanning its whole history every round.
    """

    selection: Selection
    best: tuple[int, float] | None = None  # (round, value)
    since: int = 0  # validations since the best without improvement

    @classmethod
    def of(cls, history: Sequence[dict[str, Any]], selection: Selection) -> SelectionProgress:
        """The progress after every record of ``history``."""
        progress = cls(selection)
        for record in history:
            progress.observe(record)
        return progress

    def observe(self, record: dict[str, Any]) -> bool:
        """Take the next record into account; whether its round is the new best."""
        value = validation_value(record, self.selection.metric)
        if value is None:
            return False
        if self.selection.improves(value, self.best[1] if self.best else None):
            self.best, self.since = (int(record["round"]), value), 0
            return True
        self.since += 1
        return False

    def stop_reason(self) -> str | None:
        """Why the run stops early: ``patience`` validations in a row without improvement; else ``None``."""
        selection = self.selection
        if selection.patience is None or self.since < selection.patience:
            return None
        best = self.best
        best_text = f"best {best[1]:.6g} at round {best[0]}" if best is not None else "no finite value yet"
        return (
            f"early stopping: validation {selection.metric} has not improved by more than {selection.min_delta:g} "
            f"in {self.since} validations; {best_text}"
        )
