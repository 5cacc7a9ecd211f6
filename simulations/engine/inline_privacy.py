"""Privacy bookkeeping of inline nodes, with the node semantics of ``flowerbed.client.private_round``.

For each node of a private cohort, as the ClientApp does it: the node's own config (plus
``FLOWERBED_SIM_NODE_CONFIG`` for simulated nodes) gives its ledger and budget; the dataset is
fingerprinted; the run's plan is made once and kept (a resumed run reuses it); the budget is
checked before training; the release is charged before the reply is built; epsilon composes every
release of the dataset with Opacus's accountant, at the budget's delta (else the plan's).

Where the releases are kept:

- a node whose config names a ``ledger`` uses that ``PrivacyLedger`` file for every release;
- a virtual node without one (the usual simulation) keeps this run's releases in its own
  ``Context.state``: a durable SQLite commit per node per round (what the ClientApp does, in a
  per-run file) costs more than the training of a whole vectorized cohort. When a node of a
  resumed run has no state yet, it starts from the releases of the earlier rounds: those in its
  per-run ledger file if the ClientApp wrote one, else one per round of the run's
  ``metrics.jsonl`` in which the site took part (the round loop writes it with each checkpoint).

Nodes whose release histories are the same (same plan, same rounds) share one accountant
evaluation.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context

from flowerbed.client.private_round import (
    SIM_LEDGER_DIR_ENV,
    NodePrivacy,
    dataset_fingerprint,
    node_privacy_config,
    run_plan,
)
from flowerbed.exception import PrivacyBudgetExceeded
from flowerbed.experiment import Experiment
from flowerbed.privacy.ledger import Budget, PrivacyLedger, compose
from flowerbed.privacy.planner import DPPlan, make_plan
from flowerbed.simulations.engine.inline_records import config_record
from flowerbed.tasks.task import SiteData

STATE_KEY = "flowerbed.dp-ledger"


def _memoize_rdp_orders() -> None:
    """Memoize Opacus's RDP of one sampled-Gaussian step at one order (a pure function of floats).

    The PRV accountant sizes its domain with an RDP bound of the whole history, which evaluates
    ``_compute_rdp(q, sigma, alpha)`` for every release and every order, in Python: most of an
    epsilon evaluation here. Every release of a run has the same ``(q, sigma)``, so after the first
    evaluation the rest are look-ups; the values, hence every epsilon, are unchanged.
    """
    from opacus.accountants.analysis import rdp

    if not hasattr(rdp._compute_rdp, "cache_info"):
        rdp._compute_rdp = functools.lru_cache(maxsize=65536)(rdp._compute_rdp)


def _cdf_floor(self):
    """``cdf(t_min)`` of a truncated PRV, evaluated once per variable."""
    floor = self.__dict__.get("_cdf_at_t_min")
    if floor is None:
        floor = self.__dict__["_cdf_at_t_min"] = self._prv.cdf(self.t_min)
    return floor


def _truncated_cdf(self, t):
    """Opacus's ``TruncatedPrivacyRandomVariable.cdf`` with ``cdf(t_min)`` evaluated once per variable."""
    floor = _cdf_floor(self)
    return np.where(
        t < self.t_min,
        0.0,
        np.where(t < self.t_max, (self._prv.cdf(t) - floor) / self._remaining_mass, 1.0),
    )


def _memoize_truncated_floor() -> None:
    """Evaluate the truncation floor of Opacus's PRVs once instead of at every point.

    A PRV evaluation integrates the truncated variable's cdf (``scipy.integrate.quad``, one Python
    call per point), and every call evaluated the untruncated cdf at the fixed lower bound
    ``t_min`` again: a third of the accountant's time for a short history. The floor is the same
    value whenever it is computed, so every epsilon is unchanged. The original stays reachable as
    ``TruncatedPrivacyRandomVariable.opacus_cdf``.
    """
    from opacus.accountants.analysis.prv import prvs

    cls = prvs.TruncatedPrivacyRandomVariable
    if "opacus_cdf" not in cls.__dict__:
        cls.opacus_cdf = cls.cdf
        cls.cdf = _truncated_cdf


@functools.lru_cache(maxsize=65536)
def _cdf_integral(sample_rate: float, noise_multiplier: float, left: float, right: float) -> float:
    """``quad`` of the untruncated sampled-Gaussian PRV's cdf over ``[left, right]`` (a pure function of floats)."""
    from opacus.accountants.analysis.prv import prvs
    from scipy import integrate

    prv = prvs.PoissonSubsampledGaussianPRV(sample_rate=sample_rate, noise_multiplier=noise_multiplier)
    return float(integrate.quad(prv.cdf, left, right, limit=500)[0])


def _truncated_mean(self) -> float:
    """Opacus's ``TruncatedPrivacyRandomVariable.mean`` reusing the integrals between fixed points.

    The mean integrates the truncated cdf ``(cdf(t) - cdf(t_min)) / mass`` over about 20 intervals;
    all but the first and the last lie between points that depend only on the integer decades
    of ``t_min`` and ``t_max``, so they recur from one epsilon evaluation to the next. Over such
    an interval the integral is ``(integral of cdf - cdf(t_min) * width) / mass``, with the
    integral of the untruncated cdf memoized per (q, sigma, interval).
    """
    from opacus.accountants.analysis.prv import prvs
    from scipy import integrate

    lower_exponent = int(np.log10(np.abs(self.t_min)))
    upper_exponent = int(np.log10(self.t_max))
    points = np.concatenate(
        [
            [self.t_min],
            -np.logspace(start=lower_exponent, stop=-5, num=10),
            [0],
            np.logspace(start=-5, stop=upper_exponent, num=10),
            [self.t_max],
        ]
    )
    prv = self._prv
    reusable = isinstance(prv, prvs.PoissonSubsampledGaussianPRV)
    floor = _cdf_floor(self)
    mean = 0.0
    last = len(points) - 2
    for i, (left, right) in enumerate(pairwise(points)):
        if reusable and 0 < i < last:
            raw = _cdf_integral(float(prv.sample_rate), float(prv.noise_multiplier), float(left), float(right))
            integral = (raw - floor * (right - left)) / self._remaining_mass
        else:
            integral, _ = integrate.quad(self.cdf, left, right, limit=500)
        mean += right * self.cdf(right) - left * self.cdf(left) - integral
    return mean


def _memoize_truncated_mean() -> None:
    """Reuse the accountant's inner integrals across epsilon evaluations (``_truncated_mean``).

    About a quarter of an evaluation for a short history; the epsilons of every history in
    ``tests/test_inline_accounting.py`` are bit for bit Opacus's. The original stays reachable as
    ``TruncatedPrivacyRandomVariable.opacus_mean``.
    """
    from opacus.accountants.analysis.prv import prvs

    cls = prvs.TruncatedPrivacyRandomVariable
    if "opacus_mean" not in cls.__dict__:
        cls.opacus_mean = cls.mean
        cls.mean = _truncated_mean


_memoize_rdp_orders()
_memoize_truncated_floor()
_memoize_truncated_mean()
History = tuple[tuple[float, float, int], ...]


@functools.lru_cache(maxsize=4096)
def _epsilon(history: History, delta: float, accountant: str) -> float:
    return compose(history, delta, accountant)


@functools.lru_cache(maxsize=4096)
def _plan(n: int, batch_size: int, local_epochs: int, rounds: int, privacy: tuple) -> DPPlan:
    max_grad_norm, target_epsilon, noise_multiplier, delta, accountant = privacy
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


@functools.lru_cache(maxsize=4096)
def _stored_plan(text: str) -> DPPlan:
    """A plan from its JSON in a node's state (parsed once per distinct plan: plans are frozen)."""
    return DPPlan.from_dict(json.loads(text))


@functools.lru_cache(maxsize=4096)
def _stored_prior(text: str) -> History:
    """Releases made before the node's state was created, from their JSON (parsed once)."""
    return tuple(tuple(h) for h in json.loads(text))  # type: ignore[misc]


def new_plan(experiment: Experiment, n: int) -> DPPlan:
    """The run's plan for ``n`` rows, as ``run_plan`` makes it (cached: equal sites share it)."""
    p, t = experiment.privacy, experiment.train
    key = (p.max_grad_norm, p.target_epsilon, p.noise_multiplier, p.delta, p.accountant)
    return _plan(n, t.batch_size, t.local_epochs, experiment.rounds, key)


def sim_ledger_path(node_config: Mapping[str, Any], run_id: str) -> Path:
    """The per-run ledger file of a virtual node (as ``NodePrivacy.from_node_config`` names it)."""
    return _ledger_folder(os.environ.get(SIM_LEDGER_DIR_ENV) or tempfile.gettempdir(), run_id) / (
        f"node-{node_config['partition-id']}.sqlite"
    )


@functools.lru_cache(maxsize=64)
def _ledger_folder(root: str, run_id: str) -> Path:
    safe_run = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return Path(root) / "flowerbed-ledgers" / safe_run


@functools.lru_cache(maxsize=4096)
def _plan_text(plan: DPPlan) -> str:
    return json.dumps(plan.to_dict())


@dataclass
class NodeRelease:
    """One node's privacy state for the round being trained."""

    context: Context
    dataset: str
    plan: DPPlan
    site: str
    budget: Budget | None
    test_seed: int | None
    ledger: PrivacyLedger | None  # None: kept in the node's state until ``flush_releases``

    @property
    def delta(self) -> float:
        """The delta epsilon is reported at."""
        return self.plan.delta if self.budget is None else self.budget.delta

    @property
    def accountant(self) -> str:
        """The accountant that composes the releases."""
        return self.plan.accountant if self.budget is None else self.budget.accountant

    def history(self) -> History:
        """Every release of this dataset known to the node, oldest first."""
        if self.ledger is not None:
            return tuple(self.ledger.history(self.dataset))
        record = self.context.state[STATE_KEY]
        sigma, q = self.plan.noise_multiplier, self.plan.sample_rate
        return _stored_prior(str(record["prior"])) + tuple((sigma, q, int(s)) for s in record["steps"])  # type: ignore[union-attr]


@functools.lru_cache(maxsize=8)
def _participation(path: str, size: int, mtime_ns: int) -> dict[str, tuple[int, ...]]:
    """Rounds each site took part in, from a run's ``metrics.jsonl`` (cached per file version)."""
    rounds: dict[str, list[int]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            for site in record.get("participants", []):
                rounds.setdefault(site, []).append(int(record["round"]))
    return {site: tuple(r) for site, r in rounds.items()}


def _earlier_rounds(experiment: Experiment, run_id: str, site: str, server_round: int, plan: DPPlan) -> list[int]:
    """Steps of the releases this site made before ``server_round`` in a resumed run (from its metrics)."""
    metrics = Path(experiment.output) / run_id / "metrics.jsonl"
    try:
        stat = metrics.stat()
    except OSError:
        return []
    rounds = _participation(str(metrics), stat.st_size, stat.st_mtime_ns).get(site, ())
    return [plan.steps_per_round for r in rounds if r < server_round]


def _state_record(
    context: Context, run_id: str, site: SiteData, config: Mapping[str, Any], experiment: Experiment, server_round: int
):
    if STATE_KEY in context.state and str(context.state[STATE_KEY]["run"]) == run_id:
        return context.state[STATE_KEY]
    dataset = dataset_fingerprint(site, config)
    prior: list = []
    plan = None
    path = sim_ledger_path(config, run_id)
    if path.is_file():  # the ClientApp ran earlier rounds of this run
        ledger = PrivacyLedger(path)
        prior = [list(h) for h in ledger.history(dataset)]
        plan = ledger.load_plan(dataset, run_id)
    plan = plan or new_plan(experiment, site.num_train)
    if not prior and server_round > 1:
        for step_count in _earlier_rounds(experiment, run_id, site.name, server_round, plan):
            prior.append([plan.noise_multiplier, plan.sample_rate, step_count])
    record = config_record(
        {
            "run": str(run_id),
            "dataset": str(dataset),
            "plan": _plan_text(plan),
            "prior": json.dumps(prior),
            "site": str(site.name),
            "rounds": [],
            "steps": [],
        }
    )
    context.state[STATE_KEY] = record
    return record


def prepare_release(
    context: Context, site: SiteData, experiment: Experiment, run_id: str, server_round: int = 1
) -> NodeRelease:
    """The node's ledger, dataset and run plan; refuse now if the next round exceeds its budget.

    Raises
    ------
    PrivacyBudgetExceeded
        When the node's budget cannot cover one more round of the plan (nothing is trained).
    """
    config = node_privacy_config(context.node_config, site.name)
    budget = Budget.from_node_config(config)
    seed = config.get("dp-test-seed")
    test_seed = None if seed is None else int(seed)
    if "ledger" in config or "partition-id" not in config:
        privacy = NodePrivacy.from_node_config(config, run_id)
        dataset = dataset_fingerprint(site, config)
        plan = run_plan(privacy, dataset, run_id, experiment, site.num_train)
        release = NodeRelease(context, dataset, plan, site.name, privacy.budget, test_seed, privacy.ledger)
    else:
        record = _state_record(context, run_id, site, config, experiment, server_round)
        plan = _stored_plan(str(record["plan"]))
        release = NodeRelease(context, str(record["dataset"]), plan, site.name, budget, test_seed, None)
    if budget is not None:
        step = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        spent = _epsilon(release.history(), budget.delta, budget.accountant)
        projected = _epsilon((*release.history(), step), budget.delta, budget.accountant)
        if projected > budget.epsilon:
            raise PrivacyBudgetExceeded(
                f"privacy budget exhausted: spent {spent:.3g} of {budget.epsilon:.3g} on dataset "
                f"{release.dataset[:12]} (site {site.name}, delta {budget.delta:.3g}); the next round "
                f"would bring it to {projected:.3g}; raise budget-epsilon in the node config, or lower "
                "rounds or local epochs, or raise the noise"
            )
    return release


def charge_release(release: NodeRelease, *, run_id: str, server_round: int, steps: int) -> tuple[float, float]:
    """Charge one round before the reply is built; return (epsilon, delta) for the dataset.

    Raises
    ------
    PrivacyBudgetExceeded
        When another process spent the rest of a ledger's budget first (discard the update).
    """
    if release.ledger is not None:
        release.ledger.charge(
            dataset=release.dataset,
            run_id=run_id,
            round=server_round,
            plan=release.plan,
            steps=steps,
            site=release.site,
            budget=release.budget,
        )
    else:
        record = release.context.state[STATE_KEY]
        record["rounds"] = [*record["rounds"], int(server_round)]  # type: ignore[misc]
        record["steps"] = [*record["steps"], int(steps)]  # type: ignore[misc]
    return _epsilon(release.history(), release.delta, release.accountant), release.delta
