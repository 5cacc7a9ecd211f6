"""Local work in optimizer steps: a per-site iterator that keeps its place across rounds."""

from __future__ import annotations

import numpy as np

from flowerbed.client.training import StepSchedule, epoch_permutations
from flowerbed.server.run_folder import read_metrics
from flowerbed.simulations.simulate import simulate
from flowerbed.tasks.data.catalog import load_federation
from flowerbed.weights import load_safetensors


def test_rounds_of_steps_continue_one_iterator_reshuffled_every_epoch():
    n, size = 10, 4  # epochs of 3 steps: 4, 4 and the partial 2
    whole = [b.tolist() for b in StepSchedule(0, 9, seed=5, batch_size=size).batches(n)]
    rounds = [b.tolist() for r in range(3) for b in StepSchedule(3 * r, 3, seed=5, batch_size=size).batches(n)]
    assert rounds == whole and [len(b) for b in whole] == [4, 4, 2] * 3
    for epoch in range(3):
        rows = sorted(row for batch in whole[3 * epoch : 3 * epoch + 3] for row in batch)
        assert rows == list(range(n)), "every row once per epoch"
    assert whole[0:3] != whole[3:6], "a fresh order every epoch"
    again = [b.tolist() for b in StepSchedule(3, 3, seed=5, batch_size=size).batches(n)]
    assert again == whole[3:6], "a round run again takes the same batches"


def test_an_epoch_order_depends_only_on_its_own_seed_epoch_and_size():
    """Many sites at once, each a permutation of its own rows, the same as when drawn alone."""
    rng = np.random.default_rng(3)
    seeds, epochs, sizes = rng.integers(0, 2**62, 300), rng.integers(0, 50, 300), rng.integers(1, 40, 300)
    together = epoch_permutations(seeds, epochs, sizes)
    for i in range(300):
        alone = epoch_permutations(seeds[i : i + 1], epochs[i : i + 1], sizes[i : i + 1])[0]
        assert sorted(together[i, : sizes[i]]) == list(range(sizes[i]))
        assert together[i, : sizes[i]].tolist() == alone[: sizes[i]].tolist()


def test_every_site_takes_its_steps_and_both_paths_agree(heart_experiment):
    settings = (
        "rounds=3",
        "train.local_steps=5",
        "train.sites.switzerland.local_steps=3",
        "train.sites.va.batch_size=8",
        "train.weighting='steps'",
        "evaluate.central=false",
    )
    vectorized = simulate(heart_experiment(*settings), quiet=True)
    sequential = simulate(heart_experiment(*settings, "backend.vectorize=false"), quiet=True)
    for record in read_metrics(vectorized):
        steps = {site: values["train-num-examples"] for site, values in record["sites"].items()}
        assert steps == {"cleveland": 5, "hungarian": 5, "switzerland": 3, "va": 5}
    a, b = load_safetensors(vectorized / "model.safetensors"), load_safetensors(sequential / "model.safetensors")
    for key in a:
        assert np.allclose(a[key], b[key], atol=1e-5), key


def test_dp_in_steps_charges_exactly_the_steps(heart_experiment, tmp_path, monkeypatch):
    from flowerbed.privacy.ledger import PrivacyLedger

    experiment = heart_experiment(
        "rounds=2",
        "train.local_steps=4",
        "privacy.enabled=true",
        "privacy.noise_multiplier=1.0",
        "evaluate.central=false",
    )
    run = simulate(experiment, quiet=True)
    ledger = PrivacyLedger(run / "nodes" / "ledger.sqlite")
    releases = [r for d in ledger.datasets() for r in ledger.releases(d)]
    assert len(releases) == 2 * len(load_federation(experiment.data, experiment.seed))
    assert {r.steps for r in releases} == {4}
