"""Properties of every partitioner: a true partition, seeded, minimum sizes, measured label skew."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from flowerbed.exception import ConfigError
from flowerbed.experiment import PartitionConfig, parse_experiment
from flowerbed.tasks.data.partitioners import (
    label_histograms,
    label_skew,
    natural_names,
    partition,
)

KINDS = ["iid", "dirichlet", "pathological", "quantity"]


@pytest.fixture(scope="module")
def digits_labels() -> np.ndarray:
    return load_digits().target


def _assert_exact_partition(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.size == n, "sizes must add up to the dataset size"
    assert np.array_equal(np.sort(joined), np.arange(n)), "every sample exactly once"


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_assigns_every_sample_exactly_once(digits_labels: np.ndarray, kind: str) -> None:
    config = PartitionConfig(kind=kind, num_clients=20, alpha=0.3, classes_per_client=2)
    parts = partition(digits_labels, config, seed=3)
    assert len(parts) == 20
    _assert_exact_partition(parts, digits_labels.size)
    assert all(p.dtype == np.int64 for p in parts)
    assert min(p.size for p in parts) >= 1


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    n=st.integers(min_value=1, max_value=400),
    num_classes=st.integers(min_value=1, max_value=12),
    num_clients=st.integers(min_value=1, max_value=40),
    alpha=st.floats(min_value=0.01, max_value=50.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_partition_properties_hold_for_any_input(
    kind: str, n: int, num_classes: int, num_clients: int, alpha: float, seed: int
) -> None:
    labels = np.random.default_rng(seed).integers(0, num_classes, size=n)
    present = np.unique(labels).size
    k = min(present, max(1, -(-present // num_clients)))
    config = PartitionConfig(kind=kind, num_clients=num_clients, alpha=alpha, classes_per_client=k, power=1.2)
    if num_clients > n:
        with pytest.raises(ConfigError, match=r"data\.partition\.num_clients"):
            partition(labels, config, seed)
        return
    parts = partition(labels, config, seed)
    assert len(parts) == num_clients
    _assert_exact_partition(parts, n)
    assert min(p.size for p in parts) >= 1
    again = partition(labels, config, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_partition_other_seed_differs(digits_labels: np.ndarray, kind: str) -> None:
    config = PartitionConfig(kind=kind, num_clients=10, alpha=0.5, classes_per_client=3)
    a = partition(digits_labels, config, seed=11)
    b = partition(digits_labels, config, seed=11)
    c = partition(digits_labels, config, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_label_skew_grows_as_alpha_shrinks(digits_labels: np.ndarray) -> None:
    alphas = [100.0, 10.0, 1.0, 0.3, 0.1]
    skews = []
    for alpha in alphas:
        config = PartitionConfig(kind="dirichlet", num_clients=20, alpha=alpha)
        per_seed = [label_skew(digits_labels, partition(digits_labels, config, s)) for s in range(3)]
        skews.append(float(np.mean(per_seed)))
    assert all(a < b for a, b in itertools.pairwise(skews)), list(zip(alphas, skews, strict=True))
    iid = PartitionConfig(kind="iid", num_clients=20)
    iid_skew = label_skew(digits_labels, partition(digits_labels, iid, 0))
    assert iid_skew < skews[2], "a random IID split is far closer to the pooled mix than alpha 1"
    assert skews[-1] > 0.5, "alpha = 0.1 should leave most clients far from the pooled mix"


def test_label_skew_is_zero_for_identical_mixes_and_one_for_disjoint_halves() -> None:
    labels = np.array([0, 1, 0, 1])
    assert label_skew(labels, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(0.0)
    assert label_skew(labels, [np.array([0, 2]), np.array([1, 3])]) == pytest.approx(0.5)


def test_pathological_gives_each_client_exactly_k_classes(digits_labels: np.ndarray) -> None:
    config = PartitionConfig(kind="pathological", num_clients=15, classes_per_client=2)
    parts = partition(digits_labels, config, seed=0)
    hist = label_histograms(digits_labels, parts)
    assert ((hist > 0).sum(axis=1) == 2).all()
    assert (hist.sum(axis=0) == np.bincount(digits_labels)).all()


def test_pathological_rejects_uncoverable_classes(digits_labels: np.ndarray) -> None:
    too_many = PartitionConfig(kind="pathological", num_clients=5, classes_per_client=11)
    with pytest.raises(ConfigError, match=r"data\.partition\.classes_per_client = 11"):
        partition(digits_labels, too_many, seed=0)
    too_few = PartitionConfig(kind="pathological", num_clients=3, classes_per_client=2)
    with pytest.raises(ConfigError, match="covers only 6 of 10 classes"):
        partition(digits_labels, too_few, seed=0)


def test_quantity_sizes_follow_the_power_law(digits_labels: np.ndarray) -> None:
    config = PartitionConfig(kind="quantity", num_clients=8, power=1.0)
    sizes = np.array([p.size for p in partition(digits_labels, config, seed=0)])
    shares = (1 / np.arange(1, 9)) / (1 / np.arange(1, 9)).sum()
    expected = 1 + shares * (digits_labels.size - 8)  # one guaranteed sample each, then the law
    assert np.all(np.abs(sizes - expected) < 1)
    assert (np.diff(sizes) <= 0).all()


def test_dirichlet_tiny_alpha_still_gives_every_client_the_minimum(
    digits_labels: np.ndarray,
) -> None:
    config = PartitionConfig(kind="dirichlet", num_clients=100, alpha=0.01)
    parts = partition(digits_labels, config, seed=5, min_samples=8)
    _assert_exact_partition(parts, digits_labels.size)
    assert min(p.size for p in parts) >= 8


def test_more_clients_than_samples_names_the_key() -> None:
    config = PartitionConfig(kind="iid", num_clients=50)
    with pytest.raises(ConfigError, match=r"data\.partition\.num_clients = 50") as err:
        partition(np.zeros(30, dtype=int), config, seed=0, source="exp.toml")
    assert err.value.source == "exp.toml"
    assert "at most 30 clients" in str(err.value)


def test_natural_partition_follows_the_group_column() -> None:
    groups = np.array(["va", "cleveland", "va", "hungary", "cleveland", "va"])
    labels = np.array([0, 1, 1, 0, 0, 1])
    config = PartitionConfig(kind="natural", num_clients=99)
    parts = partition(labels, config, seed=0, groups=groups)
    assert natural_names(groups) == ["cleveland", "hungary", "va"]
    assert [p.tolist() for p in parts] == [[1, 4], [3], [0, 2, 5]]


def test_natural_partition_without_groups_says_what_to_set() -> None:
    with pytest.raises(ConfigError, match=r"data\.site_column"):
        partition(np.zeros(10), PartitionConfig(kind="natural"), seed=0)


def test_schema_rejects_non_positive_alpha_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"data\.partition\.alpha = 0"):
        parse_experiment({"data": {"partition": {"kind": "dirichlet", "alpha": 0}}})
