"""Epsilon of a DP-SGD release history: Opacus's PRV and RDP accountants, bit for bit, faster.

``epsilon(history, delta, accountant)`` gives the epsilon a fresh Opacus accountant
(``create_accountant(mechanism=accountant)`` with ``history`` set, then ``get_epsilon(delta)``)
gives, exactly: the same floating-point operations run on the same values in the same order,
with Opacus's own building blocks (``compute_rdp``, ``get_privacy_spent``,
``PoissonSubsampledGaussianPRV``, ``Domain``, ``discretize``, ``compose_heterogeneous``,
``DiscretePRV.compute_epsilon``). What is faster is only what is recomputed:

- the RDP of one step of ``(sigma, q)`` at Opacus's default orders (a pure function of floats) is
  memoized, for the RDP accountant and for the PRV accountant's domain sizing;
- the truncated PRV (``_TruncatedPRV``) evaluates ``cdf(t_min)`` once per variable instead of at
  every point, and memoizes the untruncated cdf at the scalar points ``quad`` evaluates in
  ``mean``: the interior integration intervals recur from one evaluation to the next, so do
  their points, and every integrand value is the one Opacus computes;
- equal ``(sigma, q)`` entries of a history share one discretized PRV;
- a history's epsilon is memoized per (merged history, delta, accountant).

Nothing of Opacus is patched: no attribute of any Opacus module or class is assigned, and
importing or using this module changes no global state (warnings are silenced only inside a
``warnings.catch_warnings`` block, as ``flowerbed.privacy.ledger`` does). Parameters the PRV
accountant cannot handle (a discretization grid of more than ``MAX_DOMAIN_POINTS`` points, which
Opacus would try to allocate) raise ``ConfigError`` before anything large is allocated.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable
from itertools import pairwise

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import (
    DiscretePRV,
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)
from scipy import integrate

from flowerbed.exception import ConfigError

History = tuple[tuple[float, float, int], ...]

ACCOUNTANTS: tuple[str, ...] = ("prv", "rdp")
MAX_DOMAIN_POINTS = 10**8  # ~0.8 GB per float64 array; Opacus holds several at once
EPS_ERROR = 0.01  # ``PRVAccountant.get_epsilon``'s default ``eps_error``
_ALPHAS = list(RDPAccountant.DEFAULT_ALPHAS)  # a copy: Opacus's list is only read
_SOURCE = "privacy accountant"


def epsilon(history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "prv") -> float:
    """Epsilon at ``delta`` of a history of (noise multiplier, sample rate, steps), as Opacus computes it.

    Consecutive entries with the same noise multiplier and sample rate are merged (as
    ``flowerbed.privacy.ledger.compose`` and Opacus's ``step`` do); an empty history spends 0.0.

    Raises
    ------
    ConfigError
        For an unknown accountant, a delta outside (0, 1), a noise multiplier that is not
        positive, a sample rate outside (0, 1], fewer than one step, or a noise multiplier too
        small for the PRV accountant's grid.
    """
    entries = tuple(history)
    try:
        hash((entries, delta, accountant))
    except TypeError:  # an entry that is not a tuple (a list from JSON, say): no memo
        return _epsilon_of(entries, delta, accountant)
    return _memo_epsilon(entries, delta, accountant)


@functools.lru_cache(maxsize=4096)
def _memo_epsilon(entries: tuple, delta: float, accountant: str) -> float:
    """``_epsilon_of`` remembered per raw history: simulated nodes with equal histories ask for the same one."""
    return _epsilon_of(entries, delta, accountant)


def _epsilon_of(entries: tuple, delta: float, accountant: str) -> float:
    merged = _merge(entries, delta, accountant)
    if not merged:
        return 0.0
    return _epsilon(merged, float(delta), accountant)


def _merge(history: Iterable[tuple[float, float, int]], delta: float, accountant: str) -> History:
    """The history with consecutive equal (sigma, q) entries merged; every parameter checked."""
    problems = []
    if accountant not in ACCOUNTANTS:
        problems.append(f"accountant = {accountant!r} must be one of {ACCOUNTANTS}")
    if not _number(delta) or not 0 < float(delta) < 1:
        problems.append(f"delta = {delta!r} must be in (0, 1)")
    merged: list[tuple[float, float, int]] = []
    for i, entry in enumerate(history):
        try:
            sigma, q, steps = entry
            sigma, q, steps = float(sigma), float(q), int(steps)
        except (TypeError, ValueError):
            problems.append(f"history entry {i} = {entry!r} must be (noise multiplier, sample rate, steps)")
            continue
        if not (math.isfinite(sigma) and sigma > 0):
            problems.append(f"history entry {i}: noise multiplier {sigma!r} must be a positive number")
        if not 0 < q <= 1:
            problems.append(f"history entry {i}: sample rate {q!r} must be in (0, 1]")
        if steps < 1:
            problems.append(f"history entry {i}: steps {steps!r} must be at least 1")
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    if problems:
        raise ConfigError(_SOURCE, problems)
    return tuple(merged)


def _number(value: object) -> bool:
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=4096)
def _epsilon(history: History, delta: float, accountant: str) -> float:
    """``epsilon`` of a merged, checked, non-empty history (a pure function of its arguments)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's "optimal order is the largest alpha" and numpy's
        if accountant == "rdp":
            return _rdp_epsilon(history, delta)
        return _prv_epsilon(history, delta)


# ----------------------------------------------------------------------------------------- RDP
@functools.lru_cache(maxsize=4096)
def _one_step_rdp(q: float, sigma: float) -> np.ndarray:
    """RDP of one sampled-Gaussian step at Opacus's default orders (``compute_rdp`` with ``steps=1``)."""
    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=_ALPHAS)
    rdp.flags.writeable = False  # shared by every caller
    return rdp


@functools.lru_cache(maxsize=4096)
def _rdp_epsilon(history: History, delta: float) -> float:
    """``RDPAccountant.get_epsilon(delta)`` of ``history``, with the one-step RDP memoized.

    Mirrors ``RDPAccountant.get_privacy_spent``: ``compute_rdp`` returns the one-step RDP times
    ``steps``, summed with ``sum`` in history order, then ``get_privacy_spent`` at the same orders.
    """
    rdp = sum([_one_step_rdp(q, sigma) * steps for sigma, q, steps in history])
    eps, _ = rdp_analysis.get_privacy_spent(orders=_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


# ----------------------------------------------------------------------------------------- PRV
@functools.lru_cache(maxsize=1 << 16)
def _prv_cdf(q: float, sigma: float, t: float) -> float:
    """Opacus's untruncated sampled-Gaussian PRV cdf at one point (a pure function of floats)."""
    return float(PoissonSubsampledGaussianPRV(q, sigma).cdf(t))


class _TruncatedPRV(TruncatedPrivacyRandomVariable):
    """Opacus's ``TruncatedPrivacyRandomVariable`` of a sampled-Gaussian PRV, with the same values, faster.

    ``cdf(t_min)`` is evaluated once (Opacus evaluates it at every call), and at a scalar point
    (how ``quad`` calls the integrand in ``mean``) the untruncated cdf comes from ``_prv_cdf``.
    The scalar arithmetic is IEEE double, as numpy's is, so every value equals Opacus's bit for
    bit; arrays take Opacus's own expression.
    """

    def __init__(self, prv: PoissonSubsampledGaussianPRV, t_min: float, t_max: float) -> None:
        super().__init__(prv, t_min, t_max)
        self._floor = self._prv.cdf(self.t_min)
        self._floor_value = float(self._floor)
        self._mass_value = float(self._remaining_mass)

    def cdf(self, t):
        """The truncated cdf at ``t`` (a float or an array)."""
        if isinstance(t, float):  # np.float64 too
            if t < self.t_min:
                return 0.0
            if t < self.t_max:
                prv = self._prv
                return (_prv_cdf(prv.sample_rate, prv.noise_multiplier, t) - self._floor_value) / self._mass_value
            return 1.0
        return np.where(
            t < self.t_min,
            0.0,
            np.where(t < self.t_max, (self._prv.cdf(t) - self._floor) / self._remaining_mass, 1.0),
        )

    def mean(self) -> float:
        """The mean by quadrature of the cdf: mirrors Opacus's ``TruncatedPrivacyRandomVariable.mean``.

        Defined here rather than inherited so that the result does not depend on the class
        attribute (which other code may have replaced in this process).
        """
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
        mean = 0.0
        for left, right in pairwise(points):
            integral, _ = integrate.quad(self.cdf, left, right, limit=500)
            mean += right * self.cdf(right) - left * self.cdf(left) - integral
        return mean


def _safe_domain_size(history: History, eps_error: float, delta_error: float) -> float:
    """Half-width of the PRV domain, as Opacus's ``compute_safe_domain_size`` computes it.

    A copy of that function (which builds its own ``RDPAccountant``s) with the one-step RDP memoized.
    """
    total_compositions = sum(steps for _, _, steps in history)
    l_max = _rdp_epsilon(history, delta_error / 4)
    for sigma, q, _ in history:
        l_max = max(l_max, _rdp_epsilon(((sigma, q, 1),), delta_error / (8 * total_compositions)))
    return max(l_max, eps_error) + 3


def _prv_domain(history: History, eps_error: float, delta_error: float) -> Domain:
    """Mirrors ``PRVAccountant._get_domain``; refuses a grid too large to allocate."""
    total_self_compositions = sum(steps for _, _, steps in history)
    half_width = _safe_domain_size(history, eps_error, delta_error)
    mesh_size = eps_error / np.sqrt(total_self_compositions * np.log(12 / delta_error) / 2)
    points = 2 * half_width / mesh_size
    if not points <= MAX_DOMAIN_POINTS:  # also NaN and inf
        sigma = min(s for s, _, _ in history)
        raise ConfigError(
            _SOURCE,
            [
                f"noise multiplier {sigma:g} is too small for the PRV accountant; use accountant = "
                f'"rdp" or a larger noise multiplier ({total_self_compositions} steps would need a grid of '
                f"{points:.3g} points, over the limit of {MAX_DOMAIN_POINTS:.0e})"
            ],
        )
    return Domain.create_aligned(-half_width, half_width, mesh_size)


def _prv_epsilon(history: History, delta: float) -> float:
    """``PRVAccountant.get_epsilon(delta)`` of ``history`` (defaults: ``eps_error=0.01``, ``delta_error=delta/1000``).

    Mirrors ``PRVAccountant.get_epsilon`` and ``_get_dprv``, with ``_TruncatedPRV`` for Opacus's
    truncated PRV (``_get_dprv`` hard-codes the class) and one discretized PRV per distinct
    ``(sigma, q)`` (the same value Opacus computes for each entry).
    """
    eps_error = EPS_ERROR
    delta_error = delta / 1000
    domain = _prv_domain(history, eps_error, delta_error)
    if np.finfo(np.longdouble).eps * domain.size > delta - delta_error:  # ``compute_epsilon`` would refuse
        raise ConfigError(
            _SOURCE,
            [
                f"delta = {delta:g} is too small for the PRV accountant (floating-point error would dominate "
                f'on its grid of {domain.size} points); use accountant = "rdp" or a larger delta'
            ],
        )
    try:
        dprvs: dict[tuple[float, float], DiscretePRV] = {}
        for sigma, q, _ in history:
            if (sigma, q) not in dprvs:
                prv = PoissonSubsampledGaussianPRV(q, sigma)
                dprvs[sigma, q] = discretize(_TruncatedPRV(prv, domain.t_min, domain.t_max), domain)
        dprv = compose_heterogeneous(
            dprvs=[dprvs[sigma, q] for sigma, q, _ in history],
            num_self_compositions=[steps for _, _, steps in history],
        )
        _, _, eps_upper = dprv.compute_epsilon(delta, delta_error, eps_error)
    except (ValueError, RuntimeError) as exc:  # Opacus's other refusals ("cannot compute epsilon", a poor grid)
        raise ConfigError(
            _SOURCE,
            [
                f"the PRV accountant cannot compute epsilon at delta = {delta:g} for this history ({exc}); "
                'use accountant = "rdp"'
            ],
        ) from None
    return float(eps_upper)
