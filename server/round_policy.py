"""Simulated failures for a round: dropouts, stragglers and clients that join late.

Everything here is a pure function of ``(scenario, seed, round, site name)``. Each draw is keyed by
the site's name, not its position, so whether a site drops out in round 5 does not depend on which
other sites were sampled with it, and two runs with the same seed see the same failures.

The round loop calls ``select_round_participants`` on the sites it sampled, sends work only to
``decision.participants``, and treats a straggler whose ``delay`` reaches the round timeout as a
reply that never arrived (``decision.timed_out(timeout)``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowerbed.experiment import ScenarioConfig

__all__ = [
    "ScenarioDecision",
    "is_active",
    "late_joiners",
    "select_round_participants",
]


@dataclass(frozen=True)
class ScenarioDecision:
    """What happens to the sampled sites in one round.

    Attributes
    ----------
    round : int
        The server round (1-based).
    participants : tuple[str, ...]
        Sites that receive work and reply (stragglers included), in the order they were sampled.
    dropped : tuple[str, ...]
        Sites that had joined but drop out this round: they never reply.
    not_joined : tuple[str, ...]
        Late joiners whose first round (``scenario.late_join_round``) has not come yet.
    delays : dict[str, float]
        Stragglers among ``participants`` and their extra delay in seconds.
    """

    round: int
    participants: tuple[str, ...]
    dropped: tuple[str, ...] = ()
    not_joined: tuple[str, ...] = ()
    delays: dict[str, float] = field(default_factory=dict)

    @property
    def stragglers(self) -> tuple[str, ...]:
        """Participants that reply late, in sampling order."""
        return tuple(s for s in self.participants if s in self.delays)

    def timed_out(self, timeout: float) -> tuple[str, ...]:
        """Stragglers whose delay reaches ``timeout`` seconds: their replies count as missing."""
        return tuple(s for s in self.stragglers if self.delays[s] >= timeout)

    def on_time(self, timeout: float) -> tuple[str, ...]:
        """Participants whose replies arrive within ``timeout`` seconds."""
        late = set(self.timed_out(timeout))
        return tuple(s for s in self.participants if s not in late)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for logs and ``metrics.jsonl``."""
        return {
            "round": self.round,
            "participants": list(self.participants),
            "dropped": list(self.dropped),
            "not_joined": list(self.not_joined),
            "delays": dict(self.delays),
        }


def select_round_participants(
    sites: list[str],
    round: int,
    scenario: ScenarioConfig,
    seed: int,
    *,
    population: Sequence[str] | None = None,
) -> ScenarioDecision:
    """Decide which sampled sites take part in ``round``, which drop out, straggle or are not there.

    Parameters
    ----------
    sites : list[str]
        The sites sampled for this round (names, as the round loop knows them).
    round : int
        The server round, 1-based.
    scenario : ScenarioConfig
        ``dropout`` (probability per site and round), ``straggler_fraction`` (probability that a
        participant is slow), ``straggler_delay`` (its extra seconds), ``late_join_fraction`` and
        ``late_join_round`` (that share of the federation is absent before that round).
    seed : int
        The experiment's seed.
    population : Sequence[str] or None (default: None)
        Every site of the federation. Late joiners are drawn from it, so the same sites are late
        whatever was sampled; ``None`` uses ``sites`` (right when every site is sampled each round).

    Returns
    -------
    ScenarioDecision
        Each of ``sites`` lands in exactly one of ``participants``, ``dropped``, ``not_joined``.
    """
    late = late_joiners(population if population is not None else sites, scenario, seed)
    participants: list[str] = []
    dropped: list[str] = []
    not_joined: list[str] = []
    delays: dict[str, float] = {}
    for site in sites:
        if site in late and round < scenario.late_join_round:
            not_joined.append(site)
        elif scenario.dropout > 0 and _uniform(seed, round, site, "dropout") < scenario.dropout:  # [0, 1) < 0 never
            dropped.append(site)
        else:
            participants.append(site)
            if (
                scenario.straggler_fraction > 0
                and _uniform(seed, round, site, "straggler") < scenario.straggler_fraction
            ):
                delays[site] = float(scenario.straggler_delay)
    return ScenarioDecision(
        round=round,
        participants=tuple(participants),
        dropped=tuple(dropped),
        not_joined=tuple(not_joined),
        delays=delays,
    )


def late_joiners(population: Iterable[str], scenario: ScenarioConfig, seed: int) -> frozenset[str]:
    """The sites that join at ``scenario.late_join_round``: ``round(fraction x N)`` of them.

    The choice depends only on the seed and the site names: the sites with the smallest seeded
    hash values are late.
    """
    if scenario.late_join_fraction <= 0:
        return frozenset()
    names = sorted(set(population))
    count = round(scenario.late_join_fraction * len(names))
    if count == 0:
        return frozenset()
    ranked = sorted(names, key=lambda s: (_uniform(seed, 0, s, "late-join"), s))
    return frozenset(ranked[:count])


def is_active(site: str, round: int, population: Iterable[str], scenario: ScenarioConfig, seed: int) -> bool:
    """Whether ``site`` has joined by ``round``; the round loop may sample among active sites."""
    return round >= scenario.late_join_round or site not in late_joiners(population, scenario, seed)


def _uniform(seed: int, round: int, site: str, purpose: str) -> float:
    """A uniform number in [0, 1) from a stable hash (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(f"{seed}|{round}|{site}|{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
