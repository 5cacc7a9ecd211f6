"""Scenario decisions: seeded, keyed by site, rates as configured, late joiners fixed per run."""

from __future__ import annotations

import pytest

from flowerbed.exception import ConfigError
from flowerbed.experiment import ScenarioConfig, parse_experiment
from flowerbed.server.round_policy import (
    is_active,
    late_joiners,
    select_round_participants,
)

SITES = [f"site-{i:03d}" for i in range(200)]


def test_no_scenario_means_everyone_takes_part() -> None:
    decision = select_round_participants(SITES[:10], 3, ScenarioConfig(), seed=0)
    assert decision.participants == tuple(SITES[:10])
    assert decision.dropped == decision.not_joined == decision.stragglers == ()


def test_every_sampled_site_lands_in_exactly_one_group() -> None:
    scenario = ScenarioConfig(
        dropout=0.3,
        straggler_fraction=0.4,
        straggler_delay=5,
        late_join_fraction=0.25,
        late_join_round=4,
    )
    for rnd in range(1, 7):
        decision = select_round_participants(SITES, rnd, scenario, seed=1)
        groups = [decision.participants, decision.dropped, decision.not_joined]
        assert sorted(s for g in groups for s in g) == sorted(SITES)
        assert set(decision.stragglers) <= set(decision.participants)
        if rnd >= 4:
            assert decision.not_joined == ()


def test_same_seed_same_decision_other_seed_differs() -> None:
    scenario = ScenarioConfig(dropout=0.5, straggler_fraction=0.5, straggler_delay=2.0)
    a = select_round_participants(SITES, 2, scenario, seed=7)
    b = select_round_participants(SITES, 2, scenario, seed=7)
    c = select_round_participants(SITES, 2, scenario, seed=8)
    d = select_round_participants(SITES, 3, scenario, seed=7)
    assert a == b
    assert a.dropped != c.dropped
    assert a.dropped != d.dropped, "each round draws afresh"


def test_a_site_fate_does_not_depend_on_who_else_was_sampled() -> None:
    scenario = ScenarioConfig(dropout=0.5, straggler_fraction=0.5, straggler_delay=1.0)
    full = select_round_participants(SITES, 4, scenario, seed=3)
    subset = SITES[::7]
    part = select_round_participants(list(reversed(subset)), 4, scenario, seed=3)
    assert set(part.dropped) == set(full.dropped) & set(subset)
    assert set(part.stragglers) == set(full.stragglers) & set(subset)
    assert part.participants == tuple(s for s in reversed(subset) if s in full.participants)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_and_straggler_rates_match_the_configuration(rate: float) -> None:
    scenario = ScenarioConfig(dropout=rate, straggler_fraction=rate, straggler_delay=3.0)
    dropped = participants = stragglers = 0
    for rnd in range(1, 26):
        decision = select_round_participants(SITES, rnd, scenario, seed=0)
        dropped += len(decision.dropped)
        participants += len(decision.participants)
        stragglers += len(decision.stragglers)
    total = 25 * len(SITES)
    # 5000 Bernoulli draws: four standard deviations is at most 0.03 of the total
    assert dropped / total == pytest.approx(rate, abs=0.03)
    assert stragglers / participants == pytest.approx(rate, abs=0.05)


def test_stragglers_time_out_only_when_the_delay_reaches_the_timeout() -> None:
    scenario = ScenarioConfig(straggler_fraction=0.5, straggler_delay=30.0)
    decision = select_round_participants(SITES[:40], 1, scenario, seed=2)
    assert decision.stragglers
    assert all(decision.delays[s] == 30.0 for s in decision.stragglers)
    assert decision.timed_out(60.0) == ()
    assert decision.on_time(60.0) == decision.participants
    assert decision.timed_out(30.0) == decision.stragglers
    assert set(decision.on_time(10.0)) == set(decision.participants) - set(decision.stragglers)


def test_late_joiners_are_a_fixed_share_of_the_population_until_their_round() -> None:
    scenario = ScenarioConfig(late_join_fraction=0.25, late_join_round=3)
    late = late_joiners(SITES, scenario, seed=5)
    assert len(late) == 50
    assert late == late_joiners(list(reversed(SITES)), scenario, seed=5)
    sampled = SITES[:20]
    for rnd in (1, 2):
        decision = select_round_participants(sampled, rnd, scenario, seed=5, population=SITES)
        assert set(decision.not_joined) == late & set(sampled)
    decision = select_round_participants(sampled, 3, scenario, seed=5, population=SITES)
    assert decision.participants == tuple(sampled)
    some_late = sorted(late)[0]
    assert not is_active(some_late, 2, SITES, scenario, seed=5)
    assert is_active(some_late, 3, SITES, scenario, seed=5)


def test_decision_is_json_ready() -> None:
    scenario = ScenarioConfig(dropout=0.5, straggler_fraction=0.5, straggler_delay=1.5)
    record = select_round_participants(SITES[:8], 1, scenario, seed=0).to_dict()
    assert set(record) == {"round", "participants", "dropped", "not_joined", "delays"}
    assert all(isinstance(v, float) for v in record["delays"].values())


def test_schema_rejects_a_dropout_probability_of_one() -> None:
    with pytest.raises(ConfigError, match=r"scenario\.dropout = 1"):
        parse_experiment({"scenario": {"dropout": 1}})
