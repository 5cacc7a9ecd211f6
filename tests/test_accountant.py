"""``flowerbed.privacy.accountant`` gives a fresh Opacus accountant's epsilons bit for bit, and patches nothing.

The reference values come from a subprocess that imports Opacus alone (other test modules of a
full run may have patched Opacus in this process); it also checks that importing and using the
accountant there leaves every Opacus module and class attribute as it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

from flowerbed.exception import ConfigError
from flowerbed.privacy import accountant
from flowerbed.privacy.accountant import epsilon

Entries = list[tuple[float, float, int]]

# (history given to ``epsilon``, the merged history a fresh Opacus accountant gets, delta)
PRV_CASES: list[tuple[Entries, Entries, float]] = [
    ([(1.0, 0.01, 1000)], [(1.0, 0.01, 1000)], 1e-5),
    ([(2.0, 0.001, 20000)], [(2.0, 0.001, 20000)], 1e-6),
    ([(5.0, 0.01, 3000)], [(5.0, 0.01, 3000)], 1e-6),
    ([(0.5, 0.001, 1000)], [(0.5, 0.001, 1000)], 1e-5),
    ([(0.5, 0.5, 3)], [(0.5, 0.5, 3)], 1e-6),
    ([(2.0, 1.0, 20)], [(2.0, 1.0, 20)], 1e-6),
    ([(1.1, 0.21, 5), (0.9, 0.3, 2)], [(1.1, 0.21, 5), (0.9, 0.3, 2)], 1e-5),
    (
        [(1.0, 0.01, 100), (2.0, 0.05, 300), (1.0, 0.01, 250)],  # a (sigma, q) that comes back
        [(1.0, 0.01, 100), (2.0, 0.05, 300), (1.0, 0.01, 250)],
        1e-5,
    ),
    ([(3.0, 0.002, 5000), (0.8, 0.002, 1500)], [(3.0, 0.002, 5000), (0.8, 0.002, 1500)], 1e-6),
    (
        [(1.0, 0.02, 100), (1.0, 0.02, 150), (1.3, 0.02, 100), (1.3, 0.02, 1)],  # merged as ledger.compose does
        [(1.0, 0.02, 250), (1.3, 0.02, 101)],
        1e-5,
    ),
]
# every PRV history at the other delta, and histories only the RDP accountant can take
RDP_CASES: list[tuple[Entries, Entries, float]] = [
    (given, merged, 1e-6 if delta == 1e-5 else 1e-5) for given, merged, delta in PRV_CASES
] + [
    ([(1.0, 0.01, 1000)], [(1.0, 0.01, 1000)], 1e-5),
    ([(0.5, 0.5, 20000)], [(0.5, 0.5, 20000)], 1e-5),
    ([(1e-6, 0.01, 100), (1.0, 0.01, 100)], [(1e-6, 0.01, 100), (1.0, 0.01, 100)], 1e-5),
]
# (q, sigma, t_min, t_max) of truncated PRVs; cdf(t_min) is 0, 0.42, 0, 0.66
TRUNCATED = [(0.25, 1.0, -10.0, 20.0), (0.25, 1.0, -0.1, 20.0), (0.01, 0.8, -5.3, 35.1), (0.25, 1.0, 0.05, 150.0)]

_REFERENCE = r"""
import json, sys, types, warnings

import numpy as np
import opacus.accountants.analysis.prv.compose
import opacus.accountants.analysis.prv.domain
from opacus.accountants import create_accountant
from opacus.accountants.analysis import rdp
from opacus.accountants.analysis.prv import prvs


def snapshot():
    seen = {}
    for name, module in list(sys.modules.items()):
        if name == "opacus" or name.startswith("opacus."):
            for key, value in vars(module).items():
                if key != "__warningregistry__":  # Python's own record of warnings shown
                    seen[name, key] = value
                if isinstance(value, type) and value.__module__ == name:
                    for attr, member in vars(value).items():
                        seen[name, key, attr] = member
    return seen


def hexes(values):
    return [float(v).hex() for v in values]


before = snapshot()
cls = prvs.TruncatedPrivacyRandomVariable
named = (rdp._compute_rdp, cls.cdf, cls.mean)
cases = json.loads(sys.argv[1])
out = {}
for mechanism in ("prv", "rdp"):
    out[mechanism] = []
    for history, delta in cases[mechanism]:
        acc = create_accountant(mechanism=mechanism)  # a fresh, plain Opacus accountant
        acc.history = [tuple(h) for h in history]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[mechanism].append(float(acc.get_epsilon(delta)).hex())
out["truncated"] = []
for q, sigma, t_min, t_max in cases["truncated"]:
    truncated = cls(prvs.PoissonSubsampledGaussianPRV(q, sigma), t_min, t_max)
    grid = np.linspace(t_min - 1, t_max + 1, 97)
    out["truncated"].append(
        {
            "mean": float(truncated.mean()).hex(),
            "array": hexes(truncated.cdf(grid)),
            "scalar": hexes(truncated.cdf(float(t)) for t in grid),
        }
    )

import flowerbed.privacy.accountant as accountant

out["used"] = [accountant.epsilon([(1.0, 0.01, 100), (1.5, 0.02, 50)], 1e-5, m) for m in ("prv", "rdp")]
after = snapshot()
modules = {key[0] for key in before}
out["changed"] = sorted(repr(k) for k, v in before.items() if k not in after or after[k] is not v)
out["added"] = sorted(
    repr(k) for k in after.keys() - before.keys() if k[0] in modules and not isinstance(after[k], types.ModuleType)
)
out["same_objects"] = [a is b for a, b in zip(named, (rdp._compute_rdp, cls.cdf, cls.mean))]
out["memoized_by_others"] = hasattr(rdp._compute_rdp, "cache_info") or "opacus_cdf" in vars(cls)
out["inline_privacy"] = sorted(name for name in sys.modules if "inline_privacy" in name)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def opacus_reference() -> Callable[[], dict]:
    """``get()``: what the Opacus-only subprocess reports (started at once, so it runs while we compute)."""
    cases = {
        "prv": [(merged, delta) for _, merged, delta in PRV_CASES],
        "rdp": [(merged, delta) for _, merged, delta in RDP_CASES],
        "truncated": TRUNCATED,
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _REFERENCE, json.dumps(cases)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    result: dict = {}

    def get() -> dict:
        if not result:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-4000:]
            result.update(json.loads(out))
        return result

    yield get
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _clear_caches(*, values: bool) -> None:
    """Forget memoized epsilons (and, with ``values``, the memoized RDP and cdf values too)."""
    accountant._memo_epsilon.cache_clear()
    accountant._epsilon.cache_clear()
    accountant._rdp_epsilon.cache_clear()
    if values:
        accountant._one_step_rdp.cache_clear()
        accountant._prv_cdf.cache_clear()


def _mismatches(cases: list[tuple[Entries, Entries, float]], mechanism: str, reference: list[str]) -> list[str]:
    cold = [epsilon(given, delta, mechanism) for given, _, delta in cases]
    _clear_caches(values=False)  # again, every one-step RDP and cdf value memoized now
    hits = accountant._prv_cdf.cache_info().hits
    warm = [epsilon(given, delta, mechanism) for given, _, delta in cases]
    if mechanism == "prv":
        assert accountant._prv_cdf.cache_info().hits > hits
    again = [epsilon(iter(given), delta, mechanism) for given, _, delta in cases]  # memoized epsilons
    bad = []
    for (given, _, delta), ref, *ours in zip(cases, reference, cold, warm, again, strict=True):
        if any(value != float.fromhex(ref) for value in ours):
            bad.append(f"{mechanism} {given} delta={delta}: opacus {float.fromhex(ref)!r}, ours {ours}")
    return bad


def test_prv_epsilon_equals_a_fresh_opacus_accountant_bit_for_bit(opacus_reference):
    _clear_caches(values=True)
    bad = _mismatches(PRV_CASES, "prv", opacus_reference()["prv"])
    assert bad == []


def test_rdp_epsilon_equals_a_fresh_opacus_accountant_bit_for_bit(opacus_reference):
    _clear_caches(values=True)
    bad = _mismatches(RDP_CASES, "rdp", opacus_reference()["rdp"])
    assert bad == []


def test_truncated_prv_cdf_and_mean_equal_opacus_bit_for_bit(opacus_reference):
    for (q, sigma, t_min, t_max), ref in zip(TRUNCATED, opacus_reference()["truncated"], strict=True):
        for _ in range(2):  # the second time, every scalar cdf value is memoized
            truncated = accountant._TruncatedPRV(PoissonSubsampledGaussianPRV(q, sigma), t_min, t_max)
            grid = np.linspace(t_min - 1, t_max + 1, 97)
            assert [float(v).hex() for v in truncated.cdf(grid)] == ref["array"]
            assert [float(truncated.cdf(float(t))).hex() for t in grid] == ref["scalar"]
            assert float(truncated.mean()).hex() == ref["mean"]


def test_importing_and_using_the_accountant_leaves_opacus_untouched(opacus_reference):
    report = opacus_reference()
    assert report["inline_privacy"] == []  # nothing in that process patched Opacus
    assert report["memoized_by_others"] is False
    assert report["changed"] == []
    assert report["added"] == []
    assert report["same_objects"] == [True, True, True]  # _compute_rdp, TruncatedPRV.cdf, .mean
    assert all(v > 0 for v in report["used"])


def test_too_small_noise_multiplier_is_refused_before_anything_large_is_allocated():
    tracemalloc.start()
    try:
        started = time.perf_counter()
        with pytest.raises(ConfigError) as raised:
            epsilon([(1e-6, 0.01, 100)], 1e-5, "prv")
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(raised.value)
    assert "noise multiplier 1e-06 is too small for the PRV accountant" in message
    assert 'use accountant = "rdp" or a larger noise multiplier' in message
    assert peak < 50 * 2**20 and elapsed < 10
    assert epsilon([(1e-6, 0.01, 100)], 1e-5, "rdp") > 1e6  # the RDP accountant still answers


@pytest.mark.parametrize(
    ("history", "delta", "name", "fragment"),
    [
        ([(1.0, 0.1, 10)], 1e-5, "gdp", "accountant = 'gdp' must be one of ('prv', 'rdp')"),
        ([(1.0, 0.1, 10)], 0.0, "prv", "delta = 0.0 must be in (0, 1)"),
        ([(1.0, 0.1, 10)], 1.0, "rdp", "delta = 1.0 must be in (0, 1)"),
        ([(1.0, 0.1, 10)], "x", "rdp", "delta = 'x' must be in (0, 1)"),
        ([(0.0, 0.1, 10)], 1e-5, "prv", "noise multiplier 0.0 must be a positive number"),
        ([(-1.0, 0.1, 10)], 1e-5, "rdp", "noise multiplier -1.0 must be a positive number"),
        ([(float("nan"), 0.1, 10)], 1e-5, "prv", "noise multiplier nan must be a positive number"),
        ([(1.0, 0.0, 10)], 1e-5, "prv", "sample rate 0.0 must be in (0, 1]"),
        ([(1.0, 1.5, 10)], 1e-5, "rdp", "sample rate 1.5 must be in (0, 1]"),
        ([(1.0, 0.1, 0)], 1e-5, "prv", "steps 0 must be at least 1"),
        ([(1.0, 0.1)], 1e-5, "prv", "must be (noise multiplier, sample rate, steps)"),
        ([(1.0, 0.1, 10)], 1e-300, "prv", "delta = 1e-300 is too small for the PRV accountant"),
        ([(0.5, 0.5, 20000)], 1e-5, "prv", 'use accountant = "rdp" or a larger noise multiplier'),
    ],
)
def test_parameters_the_accountant_cannot_take_raise_config_error(history, delta, name, fragment):
    with pytest.raises(ConfigError) as raised:
        epsilon(history, delta, name)
    assert fragment in str(raised.value)


def test_an_empty_history_spends_nothing():
    assert epsilon([], 1e-5) == 0.0
    assert epsilon(iter(()), 1e-6, "rdp") == 0.0
