"""What travels between the coordinator and the nodes: message keys and node error codes.

The coordinator recognises a node's refusal by its code, never by its text: the text is for
people, written once where the refusal is made.

| code | name | the node refused because |
|---:|---|---|
| 4000 | ``NODE_ERROR`` | anything else (a node-side problem the hospital can fix) |
| 4001 | ``CONFIG`` | its own node config is invalid (unknown key, bad value) |
| 4002 | ``TASK_NOT_APPROVED`` | the run's task is not approved at this node |
| 4003 | ``DATA`` | its local data is missing, unreadable or unfit for the request |
| 4004 | ``POLICY`` | the request breaks the node's policy (e.g. plain training on a node with a budget) |
| 4005 | ``BUDGET_EXHAUSTED`` | the next release would exceed the node's privacy budget |
| 4006 | ``SECURE_AGGREGATION`` | a secure-aggregation stage failed a check |
"""

from __future__ import annotations

from enum import IntEnum

#: Keys of the ``"config"`` record that carry the run to the nodes (see docs/architecture.md).
EXPERIMENT_KEY = "flowerbed.experiment"
RUN_ID_KEY = "flowerbed.run-id"
#: Set by Flower's FedProx in the train config: the proximal term's weight, applied at every node.
PROXIMAL_MU_KEY = "proximal-mu"
#: SCAFFOLD: the global control variate travels to the nodes in an ArrayRecord under
#: ``SCAFFOLD_CONTROL``; a node's change of its own control variate comes back under
#: ``SCAFFOLD_DELTA``, every array named ``SCAFFOLD_PREFIX + parameter``.
SCAFFOLD_CONTROL = "scaffold-control"
SCAFFOLD_DELTA = "scaffold-delta"
SCAFFOLD_PREFIX = "scaffold/"
#: The number of sites the coordinator discovered (SCAFFOLD scales its control update by it).
SITES_KEY = "flowerbed.sites"
#: Which split an evaluation message asks for: "test" (the default) or "validation".
EVALUATE_SPLIT_KEY = "evaluate-split"
#: An evaluation message with this key set to true asks for the clinical statistics; the reply
#: carries them as JSON text in a ``ConfigRecord`` under ``CLINICAL_RECORD`` (key ``statistics``).
EVALUATE_CLINICAL_KEY = "evaluate-clinical"
CLINICAL_RECORD = "clinical"
#: The secure train phase: its stages' message types start with this; their payload travels in a
#: ``ConfigRecord`` under ``SECAGG_PAYLOAD``, a node's masked update in an ``ArrayRecord`` under
#: ``SECAGG_MASKED`` as the array ``SECAGG_MASKED_ARRAY``.
SECAGG_ACTION_PREFIX = "train.secagg_"
SECAGG_PAYLOAD = "secagg"
SECAGG_MASKED = "secagg-masked"
SECAGG_MASKED_ARRAY = "masked"
#: Record keys of a reply: the site's name (a ``ConfigRecord``) beside Flower's ``arrays``/``metrics``.
SITE_RECORD = "site"
#: What the ``epsilon`` of a DP reply counts (the node composes its ledger, see privacy/ledger.py).
EPSILON_SCOPE = "cumulative at each node's ledger: every release of the site's dataset, this run's and earlier runs'"


class ErrorCode(IntEnum):
    """The code of a node's error reply (``flwr.app.Error.code``)."""

    NODE_ERROR = 4000
    CONFIG = 4001
    TASK_NOT_APPROVED = 4002
    DATA = 4003
    POLICY = 4004
    BUDGET_EXHAUSTED = 4005
    SECURE_AGGREGATION = 4006


#: Refusals that will not change during a run: the coordinator leaves the site out of later rounds.
PERSISTENT_REFUSALS = frozenset(
    {ErrorCode.CONFIG, ErrorCode.TASK_NOT_APPROVED, ErrorCode.POLICY, ErrorCode.BUDGET_EXHAUSTED}
)


def error_name(code: int) -> str:
    """A code's name (``BUDGET_EXHAUSTED``), or the number for a code flowerbed does not define."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)
