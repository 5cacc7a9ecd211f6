"""Plan DP-SGD once for a whole run: the noise multiplier for rounds x local steps.

The noise multiplier is solved once, for the total number of steps a node may take in the run
(every round, every local step), with Opacus's own search (``get_noise_multiplier``). It is never
re-derived per round: re-planning each round as if it were the first is how budgets silently
multiply. A node stores its plan in its ledger keyed by run, so a restarted node reuses it.

Sampling follows Opacus's Poisson loader: with ``n`` local rows and batch size ``B`` an epoch has
``ceil(n / B)`` steps and every row joins each step with probability ``q = 1 / ceil(n / B)``
(expected batch size ``q * n <= B``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from flowerbed.exception import ConfigError

Accountant = Literal["prv", "rdp"]
ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")


@dataclass(frozen=True)
class DPPlan:
    """Everything a node needs to train privately and to account for it.

    Parameters
    ----------
    noise_multiplier : float
        Gaussian noise standard deviation divided by ``max_grad_norm`` (sigma).
    sample_rate : float
        Poisson sampling probability of one row in one step (q).
    steps_per_round : int
        Local DP-SGD steps in one round (local epochs x steps per epoch).
    rounds : int
        Rounds the plan covers (the run's rounds).
    max_grad_norm : float
        Per-sample clipping norm (C).
    delta : float
        The delta the plan targets (epsilon is reported at the node's budget delta).
    accountant : str (default: "prv")
        Opacus accountant: ``"prv"`` or ``"rdp"``.
    target_epsilon : float | None (default: None)
        The epsilon the noise was planned for; ``None`` for an explicit noise multiplier.
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    max_grad_norm: float
    delta: float
    accountant: str = "prv"
    target_epsilon: float | None = None

    def __post_init__(self) -> None:
        problems = []
        if not self.noise_multiplier > 0:
            problems.append(f"noise_multiplier = {self.noise_multiplier} must be > 0")
        if not 0 < self.sample_rate <= 1:
            problems.append(f"sample_rate = {self.sample_rate} must be in (0, 1]")
        if self.steps_per_round < 1 or self.rounds < 1:
            problems.append("steps_per_round and rounds must be >= 1")
        if not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm = {self.max_grad_norm} must be > 0")
        if not 0 < self.delta < 1:
            problems.append(f"delta = {self.delta} must be in (0, 1)")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant = {self.accountant!r} must be one of {ACCOUNTANTS}")
        if problems:
            raise ConfigError("DP plan", problems)

    @property
    def total_steps(self) -> int:
        """Steps over the whole run (rounds x steps per round)."""
        return self.rounds * self.steps_per_round

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DPPlan:
        """Inverse of ``to_dict``; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError("DP plan", [f"unknown keys {unknown}"])
        return cls(**data)


def default_delta(n: int) -> float:
    """Delta well below ``1 / n``: ``min(1e-5, 1 / (10 n))``."""
    if n < 1:
        raise ValueError(f"local dataset size must be >= 1, got {n}")
    return min(1e-5, 1.0 / (10.0 * n))


def sampling(n: int, batch_size: int) -> tuple[float, int]:
    """Poisson sample rate and steps per epoch for ``n`` rows and a batch size (as Opacus)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    steps_per_epoch = math.ceil(n / batch_size)
    return 1.0 / steps_per_epoch, steps_per_epoch


def epsilon_for(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "prv"
) -> float:
    """Epsilon at ``delta`` of ``steps`` Poisson-subsampled Gaussian steps (Opacus's accountant)."""
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def plan_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (within tolerance) whose epsilon does not exceed the target.

    Raises
    ------
    ConfigError
        When the target cannot be reached with any noise multiplier Opacus searches.
    """
    if accountant not in ACCOUNTANTS:
        raise ConfigError("privacy", [f"accountant = {accountant!r} must be one of {ACCOUNTANTS}"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=epsilon_tolerance,
                )
            )
    except ValueError as exc:
        raise ConfigError(
            "privacy",
            [
                f"target_epsilon = {target_epsilon} is unreachable for {steps} steps at "
                f"q = {sample_rate:.4g}, delta = {delta:.3g} ({exc}); raise the target or "
                "lower rounds or local epochs"
            ],
        ) from None


def make_plan(
    *,
    n: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    max_grad_norm: float,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    delta: float | None = None,
    accountant: str = "prv",
    local_steps: int | None = None,
) -> DPPlan:
    """Plan a whole run at a node with ``n`` local training rows.

    Exactly one of ``target_epsilon`` (the noise is solved once for ``rounds x local steps``)
    and ``noise_multiplier`` (used as given) must be set. ``delta`` defaults to
    ``default_delta(n)``. ``local_steps`` sets the steps of a round directly (else
    ``local_epochs`` epochs of ``ceil(n / batch_size)`` steps).
    """
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ConfigError("privacy", ["set exactly one of target_epsilon (e.g. 3.0) or noise_multiplier"])
    q, steps_per_epoch = sampling(n, batch_size)
    steps_per_round = local_steps if local_steps is not None else local_epochs * steps_per_epoch
    delta = default_delta(n) if delta is None else delta
    if noise_multiplier is None:
        noise_multiplier = plan_noise(
            target_epsilon=float(target_epsilon),  # type: ignore[arg-type]
            delta=delta,
            sample_rate=q,
            steps=rounds * steps_per_round,
            accountant=accountant,
        )
    return DPPlan(
        noise_multiplier=float(noise_multiplier),
        sample_rate=q,
        steps_per_round=steps_per_round,
        rounds=rounds,
        max_grad_norm=float(max_grad_norm),
        delta=float(delta),
        accountant=accountant,
        target_epsilon=None if target_epsilon is None else float(target_epsilon),
    )
