"""Errors that flowerbed raises for bad input: each names the file, field or node and the fix.

Each class carries the ``ErrorCode`` a node replies with when it refuses for that reason
(``flowerbed.protocol``), so the coordinator tells refusals apart by code, never by text.
"""

from __future__ import annotations

from flowerbed.protocol import ErrorCode


class FlowerbedError(Exception):
    """Base class: a problem the user can fix, reported without a traceback by the CLI."""

    code: ErrorCode = ErrorCode.NODE_ERROR


class ConfigError(FlowerbedError):
    """An experiment, federation or node configuration file is invalid.

    Parameters
    ----------
    source : str
        The file (or other origin) the configuration came from.
    problems : list[str]
        One line per problem, each naming the key, the value and what is allowed.
    """

    code = ErrorCode.CONFIG

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        bullets = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: invalid configuration\n{bullets}")


class DataError(FlowerbedError):
    """Local data is missing or does not match the task's schema (names the file and the row)."""

    code = ErrorCode.DATA


class TaskError(FlowerbedError):
    """A task reference cannot be resolved or the task is not allowed on this node."""


class TaskNotApproved(TaskError):
    """The task is a user task this node has not approved (or whose source changed since)."""

    code = ErrorCode.TASK_NOT_APPROVED


class NodeError(FlowerbedError):
    """A node's configuration points nowhere or the node cannot serve a request."""


class PolicyRefusal(FlowerbedError):
    """The request breaks the node's own policy (e.g. plain training on a node with a budget)."""

    code = ErrorCode.POLICY


class PrivacyBudgetExceeded(FlowerbedError):
    """A training plan would spend more epsilon than the node's budget allows."""

    code = ErrorCode.BUDGET_EXHAUSTED


class RunError(FlowerbedError):
    """A federated run cannot continue (too few nodes, no valid replies, no checkpoint to resume)."""


class SecureAggregationError(RunError):
    """A secure-aggregation round cannot go on: too few nodes left, or a message failed a check.

    The message names the node, the stage and what to change; nothing is unmasked after it.
    """

    code = ErrorCode.SECURE_AGGREGATION
