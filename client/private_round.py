"""One private round at a node: fingerprint, plan, check the budget, train, charge, report.

The node's privacy settings come only from its own configuration (``context.node_config``),
never from the server's message:

| node config key | meaning |
|---|---|
| ``ledger`` | the SQLite ledger file (required in a deployment) |
| ``budget-epsilon`` | most epsilon a local dataset may ever spend (none: recorded, no limit) |
| ``budget-delta`` | the delta epsilon is measured at (default 1e-5) |
| ``budget-accountant`` | ``prv`` (default) or ``rdp`` |
| ``dataset-id`` | a stable name for the local dataset (default: the SHA-256 of the data file) |
| ``dp-test-seed`` | makes sampling and noise deterministic: tests only, never in production |

A simulated node (``partition-id`` in its config) without ``ledger`` keeps one ledger per run
under ``$FLOWERBED_SIM_LEDGER_DIR`` (default: the system's temporary folder), so that separate
simulations do not charge each other's virtual hospitals. Simulated hospitals can be given the
keys above through the environment of the process that runs them:
``FLOWERBED_SIM_NODE_CONFIG='{"*": {"dp-test-seed": 0}, "switzerland": {"budget-epsilon": 2}}'``
(``"*"`` for every site, then per site name). Deployed nodes ignore this variable.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowerbed.client.private_training import train_private
from flowerbed.client.training import TrainResult
from flowerbed.exception import ConfigError, NodeError, PrivacyBudgetExceeded
from flowerbed.experiment import Experiment
from flowerbed.privacy.ledger import Budget, PrivacyLedger, fingerprint_arrays, fingerprint_file
from flowerbed.privacy.planner import DPPlan, make_plan
from flowerbed.seeds import derive_seed
from flowerbed.tasks.task import SiteData, Task

SIM_LEDGER_DIR_ENV = "FLOWERBED_SIM_LEDGER_DIR"
SIM_NODE_CONFIG_ENV = "FLOWERBED_SIM_NODE_CONFIG"


def node_privacy_config(node_config: Mapping[str, Any], site: str) -> dict[str, Any]:
    """The node's config; a simulated node also takes ``FLOWERBED_SIM_NODE_CONFIG``'s entries."""
    config = dict(node_config)
    raw = os.environ.get(SIM_NODE_CONFIG_ENV)
    if raw and "partition-id" in node_config:
        try:
            overlay = json.loads(raw)
            for key in ("*", site):
                config.update(overlay.get(key, {}))
        except (ValueError, AttributeError, TypeError) as exc:
            raise ConfigError(
                SIM_NODE_CONFIG_ENV,
                [f"must be a JSON object of objects keyed by '*' or site name ({exc})"],
            ) from None
    return config


@dataclass(frozen=True)
class NodePrivacy:
    """A node's own privacy settings.

    Parameters
    ----------
    ledger : PrivacyLedger
        Where releases are recorded.
    budget : Budget | None
        The hospital's limit; ``None`` records without limiting.
    test_seed : int | None
        Deterministic sampling and noise (tests only).
    """

    ledger: PrivacyLedger
    budget: Budget | None
    test_seed: int | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run_id: str) -> NodePrivacy:
        """Read the node's settings; a deployed node without ``ledger`` is an error."""
        if "ledger" in node_config:
            path = Path(str(node_config["ledger"]))
        elif "partition-id" in node_config:
            root = Path(os.environ.get(SIM_LEDGER_DIR_ENV) or tempfile.gettempdir())
            safe_run = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
            path = root / "flowerbed-ledgers" / safe_run / f"node-{node_config['partition-id']}.sqlite"
        else:
            raise NodeError(
                "DP training needs a privacy ledger: start the node with "
                "--node-config 'ledger=\"/var/lib/flowerbed/ledger.sqlite\" budget-epsilon=8.0'"
            )
        seed = node_config.get("dp-test-seed")
        return cls(
            ledger=PrivacyLedger(path),
            budget=Budget.from_node_config(node_config),
            test_seed=None if seed is None else int(seed),
        )

    def delta(self, plan: DPPlan) -> float:
        """The delta epsilon is reported at: the budget's, else the plan's."""
        return plan.delta if self.budget is None else self.budget.delta

    def accountant(self, plan: DPPlan) -> str:
        """The accountant that composes releases: the budget's, else the plan's."""
        return plan.accountant if self.budget is None else self.budget.accountant


def refuse_unless_private(node_config: Mapping[str, Any], site: str) -> None:
    """A node with a privacy budget never releases an update trained without DP.

    Raises
    ------
    PrivacyBudgetExceeded
        When the node config sets ``budget-epsilon`` and the experiment asks for plain training.
    """
    config = node_privacy_config(node_config, site)
    if config.get("budget-epsilon") is not None:
        raise PrivacyBudgetExceeded(
            f"site {site} only trains with differential privacy (its node config sets "
            f"budget-epsilon = {config['budget-epsilon']}); set privacy.enabled = true and "
            "privacy.target_epsilon in the experiment"
        )


def dataset_fingerprint(site: SiteData, node_config: Mapping[str, Any]) -> str:
    """The ledger's name for the local dataset.

    ``dataset-id`` from the node config when set (a name that stays the same when the file is
    updated, so a new version does not start a fresh budget); else the SHA-256 of the node's data
    file; else (simulations) of the training arrays.
    """
    if node_config.get("dataset-id"):
        return f"id:{node_config['dataset-id']}"
    path = node_config.get("data-path")
    if path is not None and Path(str(path)).is_file():
        return fingerprint_file(str(path))
    return fingerprint_arrays(site.x_train, site.y_train)


def run_plan(privacy: NodePrivacy, dataset: str, run_id: str, experiment: Experiment, n: int) -> DPPlan:
    """The run's plan on this dataset: made once, stored in the ledger, reused after a restart."""
    stored = privacy.ledger.load_plan(dataset, run_id)
    if stored is not None:
        return stored
    cfg = experiment.privacy
    plan = make_plan(
        n=n,
        batch_size=experiment.train.batch_size,
        local_epochs=experiment.train.local_epochs,
        rounds=experiment.rounds,
        max_grad_norm=cfg.max_grad_norm,
        target_epsilon=cfg.target_epsilon,
        noise_multiplier=cfg.noise_multiplier,
        delta=cfg.delta,
        accountant=cfg.accountant,
    )
    return privacy.ledger.save_plan(dataset, run_id, plan)


@dataclass(frozen=True)
class PrivateRoundResult:
    """What a private round did and what this dataset has spent, all runs together."""

    train: TrainResult
    epsilon: float
    delta: float
    plan: DPPlan


def train_private_round(
    model: nn.Module,
    task: Task,
    site: SiteData,
    experiment: Experiment,
    *,
    node_config: Mapping[str, Any],
    run_id: str,
    server_round: int,
    device: torch.device,
) -> PrivateRoundResult:
    """Guards, DP-SGD and the ledger for one round; the caller replies only after this returns.

    Raises
    ------
    PrivacyBudgetExceeded
        Before training when the next round would exceed the node's budget, or after training
        when another process spent the rest first (the update is then discarded, never sent).
    """
    node_config = node_privacy_config(node_config, site.name)
    privacy = NodePrivacy.from_node_config(node_config, run_id)
    dataset = dataset_fingerprint(site, node_config)
    plan = run_plan(privacy, dataset, run_id, experiment, site.num_train)
    if privacy.budget is not None:
        privacy.ledger.check(dataset, plan, privacy.budget, site=site.name)
    seed = None if privacy.test_seed is None else derive_seed(privacy.test_seed, "dp", server_round, site.name)
    result = train_private(
        model,
        task,
        site.x_train,
        site.y_train,
        experiment.train,
        plan=plan,
        seed=seed,
        device=device,
    )
    privacy.ledger.charge(
        dataset=dataset,
        run_id=run_id,
        round=server_round,
        plan=plan,
        steps=result.steps,
        site=site.name,
        budget=privacy.budget,
    )
    delta = privacy.delta(plan)
    epsilon = privacy.ledger.epsilon(dataset, delta, privacy.accountant(plan))
    return PrivateRoundResult(train=result, epsilon=epsilon, delta=delta, plan=plan)
