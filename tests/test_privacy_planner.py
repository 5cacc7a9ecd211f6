"""The DP planner: noise planned once per run never overshoots the target epsilon."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowerbed.exception import ConfigError
from flowerbed.privacy.planner import DPPlan, default_delta, epsilon_for, make_plan, sampling


@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    target=st.sampled_from([0.5, 1.0, 3.0, 8.0]),
    n=st.integers(min_value=60, max_value=2000),
    rounds=st.integers(min_value=1, max_value=10),
    accountant=st.sampled_from(["prv", "rdp"]),
)
def test_planned_noise_never_overshoots_target(target: float, n: int, rounds: int, accountant: str) -> None:
    plan = make_plan(
        n=n,
        batch_size=32,
        local_epochs=1,
        rounds=rounds,
        max_grad_norm=1.0,
        target_epsilon=target,
        accountant=accountant,
    )
    spent = epsilon_for(plan.noise_multiplier, plan.sample_rate, plan.total_steps, plan.delta, accountant)
    assert spent <= target
    # ... and is not wastefully noisy: 3% less noise would overshoot or land within tolerance.
    looser = epsilon_for(plan.noise_multiplier * 0.97, plan.sample_rate, plan.total_steps, plan.delta, accountant)
    assert looser > target - 0.05


def test_plan_covers_the_whole_run_not_one_round() -> None:
    kw = dict(n=230, batch_size=32, local_epochs=2, max_grad_norm=1.0, target_epsilon=3.0, accountant="rdp")
    one = make_plan(rounds=1, **kw)
    ten = make_plan(rounds=10, **kw)
    assert ten.noise_multiplier > one.noise_multiplier
    assert ten.steps_per_round == one.steps_per_round == 2 * math.ceil(230 / 32)
    assert ten.total_steps == 10 * ten.steps_per_round


def test_sampling_and_default_delta_follow_the_data() -> None:
    assert sampling(230, 32) == (1 / 8, 8)
    assert sampling(10, 32) == (1.0, 1)
    for n in (1, 50, 230, 10**6):
        assert default_delta(n) < 1 / n
    assert default_delta(230) == 1e-5


def test_plan_round_trips_and_rejects_bad_values() -> None:
    plan = make_plan(n=230, batch_size=32, local_epochs=1, rounds=3, max_grad_norm=1.0, noise_multiplier=1.1)
    assert plan.noise_multiplier == 1.1 and plan.target_epsilon is None
    assert DPPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(ConfigError, match="unknown keys"):
        DPPlan.from_dict({**plan.to_dict(), "sigma": 1})
    with pytest.raises(ConfigError, match="sample_rate"):
        DPPlan.from_dict({**plan.to_dict(), "sample_rate": 1.5})
    with pytest.raises(ConfigError, match="exactly one"):
        make_plan(n=230, batch_size=32, local_epochs=1, rounds=3, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="unreachable"):
        make_plan(
            n=100,
            batch_size=100,
            local_epochs=50,
            rounds=50,
            max_grad_norm=1.0,
            target_epsilon=1e-4,
            accountant="rdp",
        )
