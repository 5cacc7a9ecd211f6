"""A site's validation split: rows its node takes out of its own training rows.

The node draws the rows itself, from its own data and a seed of its split (the coordinator sets
only the share), so a validation metric is as local as a test metric.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flowerbed.seeds import derive_seed
from flowerbed.tasks.task import SiteData


def hold_out_validation(site: SiteData, fraction: float, seed: int) -> SiteData:
    """``site`` with ``round(fraction * rows)`` of its training rows moved to ``x_val``/``y_val``.

    At least one row goes to each side when the site has two or more training rows. For class
    labels the draw is stratified where every class has two rows or more (each class keeps its
    share); otherwise it is uniform. The same site, fraction and seed always give the same rows.
    """
    n = site.num_train
    if fraction <= 0 or n < 2:
        return site
    n_val = min(n - 1, max(1, round(fraction * n)))
    rng = np.random.default_rng(derive_seed(seed, "validation", site.name))
    val = _stratified(site.y_train, n_val, rng) if site.schema.target == "class" else None
    if val is None:
        val = rng.choice(n, size=n_val, replace=False)
    keep = np.ones(n, dtype=bool)
    keep[val] = False
    val = np.sort(val)
    return dataclasses.replace(
        site,
        x_train=site.x_train[keep],
        y_train=site.y_train[keep],
        x_val=site.x_train[val],
        y_val=site.y_train[val],
        groups_train=None if site.groups_train is None else {k: v[keep] for k, v in site.groups_train.items()},
        groups_val=None if site.groups_train is None else {k: v[val] for k, v in site.groups_train.items()},
    )


def _stratified(labels: np.ndarray, n_val: int, rng: np.random.Generator) -> np.ndarray | None:
    """``n_val`` indices keeping each class's share (largest remainders), or None if a class is too small."""
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2 or counts.min() < 2:
        return None
    share = counts * n_val / len(labels)
    take = np.floor(share).astype(int)
    for k in np.argsort(-(share - take), kind="stable")[: n_val - int(take.sum())]:
        take[k] += 1
    take = np.minimum(take, counts - 1)
    pools = [np.flatnonzero(labels == c) for c in classes]
    picked = [rng.choice(pool, size=t, replace=False) for pool, t in zip(pools, take, strict=True) if t]
    return np.concatenate(picked) if picked else None
