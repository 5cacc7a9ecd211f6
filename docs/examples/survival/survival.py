"""A survival task for flowerbed: a Cox model, trained across three hospitals.

Its loss, the Cox partial likelihood, compares each patient with everyone still at risk in the
same batch, so it is not a mean of per-row terms: the task says so (``loss_per_row=False``) and a
node refuses to train it with DP-SGD. Its metric, the concordance index, is a property of a whole
test set (pairs of patients), computed at each node on its own test split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from flowerbed.experiment import DataConfig
from flowerbed.tasks import DataSchema, SiteData, Task

FEATURES = 5


def cox_loss(risk: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood of a batch; ``target`` is ``[n, 2]``: time, event (1 or 0)."""
    score, time, event = risk.reshape(-1), target[:, 0], target[:, 1]
    at_risk = (time.reshape(1, -1) >= time.reshape(-1, 1)).float()  # row i: who is still at risk at t_i
    log_risk_set = torch.logsumexp(score.reshape(1, -1) + torch.log(at_risk), dim=1)
    return -((score - log_risk_set) * event).sum() / event.sum().clamp(min=1.0)


def concordance(risk: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Harrell's C-index on a whole test set: of the comparable pairs, the share ordered correctly."""
    score, time, event = risk.reshape(-1), target[:, 0], target[:, 1]
    earlier = (time.reshape(-1, 1) < time.reshape(1, -1)) & (event.reshape(-1, 1) > 0)  # i failed before j
    higher = (score.reshape(-1, 1) > score.reshape(1, -1)).float() + 0.5 * (
        score.reshape(-1, 1) == score.reshape(1, -1)
    )
    pairs = earlier.sum()
    return {"c-index": float((higher * earlier).sum() / pairs) if pairs else float("nan")}


def task() -> Task:
    """The Cox model: one linear risk score per patient."""
    return Task(
        name="survival:task",
        model_fn=lambda schema: nn.Linear(schema.num_features, 1),
        kinds=("tabular",),
        loss_fn=cox_loss,
        metrics_fn=concordance,
        loss_per_row=False,  # the partial likelihood couples the rows of a batch: no DP-SGD
        primary_metric="c-index",  # the figure local baselines and the comparison report and rank by
        greater_is_better=True,
    )


def hospitals(data: DataConfig, seed: int) -> list[SiteData]:
    """Three hospitals of synthetic patients: features, then survival time and whether the event was seen."""
    rng = np.random.default_rng(seed)
    beta = rng.normal(size=FEATURES)
    # Two float target columns, not class labels: label-skew partitions and label histograms do not apply.
    names = tuple(f"x{i}" for i in range(FEATURES))
    schema = DataSchema("tabular", (FEATURES,), num_classes=2, feature_names=names, target="values")
    sites = []
    for name, n in (("north", 160), ("south", 120), ("east", 80)):
        x = rng.normal(size=(n, FEATURES)).astype(np.float32)
        event_time = rng.exponential(np.exp(-(x @ beta)))
        censor_time = rng.exponential(2.0, size=n)
        y = np.stack([np.minimum(event_time, censor_time), event_time <= censor_time], axis=1).astype(np.float32)
        cut = int(n * (1 - data.test_fraction))
        sites.append(SiteData(name, x[:cut], y[:cut], x[cut:], y[cut:], schema))
    return sites
