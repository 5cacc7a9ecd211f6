"""FedAdam, FedYogi and FedAdagrad as Reddi et al. (2021) publish them, beside Flower's.

"Adaptive Federated Optimization" (Reddi et al., ICLR 2021, Algorithm 2), per round t, with
``delta_t`` the weighted mean of the nodes' updates (the FedAvg aggregate minus the global model):

    m_t = beta_1 m_{t-1} + (1 - beta_1) delta_t                                  (m_{-1} = 0)
    v_t = v_{t-1} + delta_t^2                                                     FedAdagrad
    v_t = v_{t-1} - (1 - beta_2) delta_t^2 sign(v_{t-1} - delta_t^2)              FedYogi
    v_t = beta_2 v_{t-1} + (1 - beta_2) delta_t^2                                 FedAdam
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)                                   (v_{-1} = tau^2)

with no bias correction, and the paper's beta_1 = 0.9, beta_2 = 0.99, tau = 1e-3 (eta defaults to
1e-2). Flower's ``FedAdam``, ``FedYogi`` and ``FedAdagrad`` differ: they start v at 0, and
FedAdam's step is bias-corrected with ``sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))`` (an exponent
shifted by one round), which changes its first steps several-fold; FedAdagrad has no momentum
(beta_1 = 0); their ``eta_l`` argument does nothing here (a node's learning rate is the
experiment's ``train.lr``), so flowerbed refuses it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

Arrays = dict[str, np.ndarray]


class _PublishedAdaptive(FedAvg):
    """FedAvg's weighted mean as the pseudo-gradient, then an adaptive server step (Reddi et al. 2021)."""

    def __init__(
        self, *, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3, **fedavg: object
    ) -> None:
        super().__init__(**fedavg)  # type: ignore[arg-type]
        if not eta > 0 or not tau > 0 or not 0 <= beta_1 < 1 or not 0 <= beta_2 < 1:
            raise ValueError("eta and tau must be > 0, beta_1 and beta_2 in [0, 1)")
        self.eta, self.beta_1, self.beta_2, self.tau = float(eta), float(beta_1), float(beta_2), float(tau)
        self.current_arrays: Arrays | None = None
        self.m_t: Arrays | None = None
        self.v_t: Arrays | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model the round starts from, then configure as FedAvg."""
        self.current_arrays = {k: a.numpy() for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """``v_t`` from ``v_{t-1}`` and ``delta_t``."""
        raise NotImplementedError

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The weighted mean of the replies, then one adaptive step from the current global model."""
        aggregated, metrics = super().aggregate_train(server_round, replies)
        if aggregated is None or self.current_arrays is None:
            return aggregated, metrics
        mean = {k: a.numpy() for k, a in aggregated.items()}
        delta = {k: mean[k].astype(np.float64) - x for k, x in self.current_arrays.items()}
        m_prev = self.m_t or {k: np.zeros_like(d) for k, d in delta.items()}
        v_prev = self.v_t or {k: np.full_like(d, self.tau**2) for k, d in delta.items()}
        self.m_t = {k: self.beta_1 * m_prev[k] + (1 - self.beta_1) * d for k, d in delta.items()}
        self.v_t = {k: self.second_moment(v_prev[k], d) for k, d in delta.items()}
        new = {
            k: (x + self.eta * self.m_t[k] / (np.sqrt(self.v_t[k]) + self.tau)).astype(mean[k].dtype)
            for k, x in self.current_arrays.items()
        }
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in new.items()}), metrics


class FedAdagradPaper(_PublishedAdaptive):
    """FedAdagrad as in Reddi et al. 2021: ``v_t = v_{t-1} + delta_t^2``."""

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Adagrad's running sum of squares."""
        return v + delta**2


class FedYogiPaper(_PublishedAdaptive):
    """FedYogi as in Reddi et al. 2021: ``v_t = v_{t-1} - (1 - beta_2) delta_t^2 sign(v_{t-1} - delta_t^2)``."""

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Yogi's additive second moment."""
        return v - (1 - self.beta_2) * delta**2 * np.sign(v - delta**2)


class FedAdamPaper(_PublishedAdaptive):
    """FedAdam as in Reddi et al. 2021: ``v_t = beta_2 v_{t-1} + (1 - beta_2) delta_t^2``, no bias correction."""

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """Adam's exponential average of squares."""
        return self.beta_2 * v + (1 - self.beta_2) * delta**2


PUBLISHED = {"FedAdamPaper": FedAdamPaper, "FedYogiPaper": FedYogiPaper, "FedAdagradPaper": FedAdagradPaper}
