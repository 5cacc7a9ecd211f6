"""Flower strategies by name, with the experiment's arguments, or a user strategy by reference."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from flwr.serverapp import strategy as flower_strategies
from flwr.serverapp.strategy import Strategy

from flowerbed.exception import ConfigError
from flowerbed.experiment import StrategyConfig
from flowerbed.flower_internals import quick_fanout
from flowerbed.strategies.adaptive import PUBLISHED
from flowerbed.strategies.scaffold import Scaffold

#: flowerbed's own strategies (with a client-side part its nodes implement, or a published update).
OWN = {**PUBLISHED, "SCAFFOLD": Scaffold}

#: Strategies that aggregate by a weighted mean of the replies (secure aggregation can feed them a sum).
WEIGHTED_MEAN = ("FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", *PUBLISHED)
#: Arguments a Flower strategy accepts that change nothing in flowerbed, and why.
NO_EFFECT = {"eta_l": "the nodes' learning rate is the experiment's train.lr"}
#: Strategies that need every individual update (median, trimming, distances between updates).
ROBUST = ("FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan")
#: Flower strategies whose client-side part flowerbed's nodes do not implement, and what is missing.
CLIENT_SIDE_MISSING = {
    "QFedAvg": "it needs each node's loss of the received model before training, which flowerbed's nodes do not "
    "report (they report their training loss, and under DP none)",
    "DifferentialPrivacyClientSideFixedClipping": "it needs Flower's client-side clipping mod; flowerbed's nodes "
    "train with DP-SGD instead (privacy.enabled = true)",
    "DifferentialPrivacyClientSideAdaptiveClipping": "it needs Flower's client-side clipping mod; flowerbed's nodes "
    "train with DP-SGD instead (privacy.enabled = true)",
    "DifferentialPrivacyServerSideFixedClipping": "it wraps another strategy object, which an experiment file cannot "
    "name; flowerbed's nodes train with DP-SGD instead (privacy.enabled = true)",
    "DifferentialPrivacyServerSideAdaptiveClipping": "it wraps another strategy object, which an experiment file "
    "cannot name; flowerbed's nodes train with DP-SGD instead (privacy.enabled = true)",
    "FedXgbBagging": "it needs XGBoost clients; flowerbed's nodes train torch models",
    "FedXgbCyclic": "it needs XGBoost clients; flowerbed's nodes train torch models",
}
#: Keys flowerbed sets itself: node sampling is the round loop's job (seeded, by site).
MANAGED_ARGS = (
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
)


def available_strategies() -> list[str]:
    """Names of Flower's message-API strategies that flowerbed can drive."""
    return [n for n in flower_strategies.__all__ if n in WEIGHTED_MEAN + ROBUST] + list(OWN)


def build_strategy(config: StrategyConfig, source: str = "experiment") -> Strategy:
    """Instantiate the strategy named by ``strategy.name`` with ``strategy.args``.

    Sampling arguments are fixed so that the strategy takes exactly the nodes the round loop chose
    (``train.clients_per_round`` controls sampling instead).
    """
    managed = sorted(set(config.args) & set(MANAGED_ARGS))
    if managed:
        raise ConfigError(
            source,
            [
                f"strategy.args.{k}: flowerbed samples nodes itself; use train.clients_per_round instead"
                for k in managed
            ],
        )
    cls = _resolve(config.name, source)
    args: dict[str, Any] = dict(config.args)
    params = _published_params(cls) if cls in OWN.values() else inspect.signature(cls.__init__).parameters
    for key in MANAGED_ARGS:
        if key in params:
            args[key] = 1.0 if key.startswith("fraction") else 1
    useless = [k for k in config.args if k in NO_EFFECT]
    if useless:
        raise ConfigError(
            source,
            [f"strategy.args.{k}: {config.name} accepts it but it does nothing: {NO_EFFECT[k]}" for k in useless],
        )
    unknown = [k for k in config.args if k not in params]
    if unknown:
        allowed = ", ".join(p for p in params if p not in ("self", *MANAGED_ARGS))
        raise ConfigError(
            source, [f"strategy.args.{k}: {config.name} has no such argument (allowed: {allowed})" for k in unknown]
        )
    try:
        strategy = cls(**args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(source, [f"strategy.args for {config.name}: {exc}"]) from None
    quick_fanout(strategy)
    return strategy


def _published_params(cls: type[Strategy]) -> dict[str, Any]:
    """The arguments of one of flowerbed's own strategies: its own and FedAvg's."""
    own = dict(inspect.signature(cls.__init__).parameters)
    own.pop("fedavg", None)
    return {**dict(inspect.signature(flower_strategies.FedAvg.__init__).parameters), **own}


def _resolve(name: str, source: str) -> type[Strategy]:
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(source, [f"strategy.name = {name!r} cannot be imported: {exc}"]) from None
    else:
        if name in CLIENT_SIDE_MISSING:
            raise ConfigError(
                source,
                [
                    f"strategy.name = {name!r} cannot run on flowerbed: {CLIENT_SIDE_MISSING[name]}; use one of "
                    f"{', '.join(available_strategies())}"
                ],
            )
        cls = OWN.get(name) or (getattr(flower_strategies, name, None) if name in available_strategies() else None)
        if cls is None:
            raise ConfigError(
                source,
                [
                    f"strategy.name = {name!r} is unknown: use one of {', '.join(available_strategies())} "
                    "or 'package.module:ClassName'"
                ],
            )
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise ConfigError(source, [f"strategy.name = {name!r} is not a flwr.serverapp.strategy.Strategy"])
    return cls


def weighted_mean_classes() -> frozenset[type[Strategy]]:
    """The classes (exactly, not subclasses) of the built-in strategies in ``WEIGHTED_MEAN``."""
    found = (OWN.get(name) or getattr(flower_strategies, name, None) for name in WEIGHTED_MEAN)
    return frozenset(cls for cls in found if cls is not None)
