"""Privacy bookkeeping of inline nodes, with the node semantics of ``flowerbed.client.private_round``.

For each node of a private cohort, exactly as the ClientApp does it: the node's own config (plus
``FLOWERBED_SIM_NODE_CONFIG`` for simulated nodes) names its ledger and budget; the dataset is
fingerprinted; the run's plan is made once and stored in the ledger (a restarted or resumed run
reuses it); the budget is checked before training; the release is charged (durably) before the
reply is built; epsilon composes every release of the dataset with Opacus's accountant.

Only the arithmetic is shared differently: nodes of one cohort whose release histories are the
same (same plan, same rounds) share one accountant evaluation instead of one each.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowerbed.client.private_round import (
    NodePrivacy,
    dataset_fingerprint,
    node_privacy_config,
    run_plan,
)
from flowerbed.exception import PrivacyBudgetExceeded
from flowerbed.experiment import Experiment
from flowerbed.privacy.ledger import compose
from flowerbed.privacy.planner import DPPlan
from flowerbed.tasks.task import SiteData


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    return compose(history, delta, accountant)


@dataclass
class NodeRelease:
    """One node's privacy state for the round being trained."""

    privacy: NodePrivacy
    dataset: str
    plan: DPPlan
    site: str

    @property
    def test_seed(self) -> int | None:
        """The node's ``dp-test-seed`` (tests only)."""
        return self.privacy.test_seed


def prepare_release(node_config: Mapping[str, Any], site: SiteData, experiment: Experiment, run_id: str) -> NodeRelease:
    """The node's ledger, dataset and run plan; refuse now if the next round exceeds its budget.

    Raises
    ------
    PrivacyBudgetExceeded
        When the node's budget cannot cover one more round of the plan (nothing is trained).
    """
    config = node_privacy_config(node_config, site.name)
    privacy = NodePrivacy.from_node_config(config, run_id)
    dataset = dataset_fingerprint(site, config)
    plan = run_plan(privacy, dataset, run_id, experiment, site.num_train)
    if privacy.budget is not None:
        history = tuple(privacy.ledger.history(dataset))
        step = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        budget = privacy.budget
        projected = _epsilon((*history, step), budget.delta, budget.accountant)
        if projected > budget.epsilon:
            privacy.ledger.check(dataset, plan, budget, site=site.name)  # raises with the ledger's message
            raise PrivacyBudgetExceeded(f"site {site.name}: next round would spend {projected:.3g}")
    return NodeRelease(privacy=privacy, dataset=dataset, plan=plan, site=site.name)


def charge_release(release: NodeRelease, *, run_id: str, server_round: int, steps: int) -> tuple[float, float]:
    """Charge one round (durably, before the reply) and return (epsilon, delta) for the dataset.

    Raises
    ------
    PrivacyBudgetExceeded
        When another process spent the rest of the budget first (the update must be discarded).
    """
    privacy, plan = release.privacy, release.plan
    privacy.ledger.charge(
        dataset=release.dataset,
        run_id=run_id,
        round=server_round,
        plan=plan,
        steps=steps,
        site=release.site,
        budget=privacy.budget,
    )
    delta, accountant = privacy.delta(plan), privacy.accountant(plan)
    return _epsilon(tuple(privacy.ledger.history(release.dataset)), delta, accountant), delta
