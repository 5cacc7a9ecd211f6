"""Privacy bookkeeping of inline nodes: the run's DP plan per node and what each release costs.

The plan is made once per run at each node with ``flowerbed.privacy.planner.make_plan`` (noise for
``rounds x local steps``, never re-derived per round). Every round a node trains privately is one
release, charged before its reply is built:

- a node whose config names a ``ledger`` charges that ``PrivacyLedger`` (dataset fingerprint, run,
  round, plan), against the budget of its node config, and reports epsilon over ALL releases of
  the dataset, across runs;
- a virtual node without a ledger keeps its releases of this run in its own ``Context.state``, and
  reports epsilon composed over them with Opacus's accountant at the plan's delta.
"""

from __future__ import annotations

import functools

from flwr.app import ConfigRecord, Context

from flowerbed.experiment import Experiment
from flowerbed.privacy.ledger import Budget, PrivacyLedger, compose, fingerprint_arrays
from flowerbed.privacy.planner import DPPlan, make_plan
from flowerbed.tasks.task import SiteData

STATE_KEY = "flowerbed.dp-releases"


@functools.lru_cache(maxsize=4096)
def _plan(n: int, batch_size: int, local_epochs: int, rounds: int, privacy_json: tuple) -> DPPlan:
    max_grad_norm, target_epsilon, noise_multiplier, delta, accountant = privacy_json
    return make_plan(
        n=n,
        batch_size=batch_size,
        local_epochs=local_epochs,
        rounds=rounds,
        max_grad_norm=max_grad_norm,
        target_epsilon=target_epsilon,
        noise_multiplier=noise_multiplier,
        delta=delta,
        accountant=accountant,
    )


def node_plan(experiment: Experiment, n: int) -> DPPlan:
    """The run's DP plan for a node with ``n`` training rows (cached: sites of one size share it)."""
    p = experiment.privacy
    key = (p.max_grad_norm, p.target_epsilon, p.noise_multiplier, p.delta, p.accountant)
    t = experiment.train
    return _plan(n, t.batch_size, t.local_epochs, experiment.rounds, key)


@functools.lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    return compose(history, delta, accountant)


def charge_release(context: Context, site: SiteData, plan: DPPlan, *, run_id: str, server_round: int) -> float:
    """Record one round of DP-SGD by this node and return its epsilon so far.

    Raises
    ------
    PrivacyBudgetExceeded
        When the node's ledger budget cannot cover the release (nothing is recorded).
    """
    node_config = context.node_config
    if "ledger" in node_config:
        ledger = PrivacyLedger(str(node_config["ledger"]))
        budget = Budget.from_node_config(node_config)
        dataset = fingerprint_arrays(site.x_train, site.y_train)
        stored = ledger.save_plan(dataset, run_id, plan)
        ledger.charge(dataset=dataset, run_id=run_id, round=server_round, plan=stored, site=site.name, budget=budget)
        delta = budget.delta if budget else stored.delta
        accountant = budget.accountant if budget else stored.accountant
        return ledger.epsilon(dataset, delta, accountant)
    record = context.state[STATE_KEY] if STATE_KEY in context.state else ConfigRecord()
    rounds = list(record[run_id]) if run_id in record else []
    rounds.append(int(server_round))
    record[run_id] = rounds
    context.state[STATE_KEY] = record
    history = ((plan.noise_multiplier, plan.sample_rate, plan.steps_per_round * len(rounds)),)
    return _epsilon(history, plan.delta, plan.accountant)
