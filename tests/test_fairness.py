"""Subgroups at the nodes: a small cell never leaves a node, DP releases are charged, a biased model shows its gaps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from flowerbed.client.app import app as client_app
from flowerbed.protocol import CLINICAL_RECORD, EVALUATE_CLINICAL_KEY, EXPERIMENT_KEY, RUN_ID_KEY
from flowerbed.server.run_folder import read_summary
from flowerbed.simulations.engine.cohort_handler import CohortHandler
from flowerbed.simulations.engine.inline_grid import InlineGrid
from flowerbed.simulations.simulate import simulate
from flowerbed.tasks import clinical, resolve_task
from flowerbed.tasks.data.catalog import load_federation

MIN = 10


def test_a_biased_model_shows_the_expected_gaps() -> None:
    """Right for group a, blind to the condition in group b: the gaps say so."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    group = np.array(["a"] * 100 + ["b"] * 100, dtype=object)
    p = np.where(y == 1, 0.9, 0.1)
    p[100:] = 0.1  # group b: every patient "no condition"
    logits = np.stack([np.zeros(200), np.log(p / (1 - p))], axis=1)
    cells = clinical.cell_statistics(logits, y, kind="binary", groups={"g": group}, threshold=0.5, bins=20)
    text = clinical.to_text(clinical.release("binary", clinical.suppress(cells, MIN), split="test", threshold=0.5,
                                             bins=20, min_count=MIN))  # fmt: skip
    summary = clinical.clinical_summary({"site": clinical.parse_statistics(text, "site")}, {"g": None})
    fair = summary["sites"]["site"]["fairness"]["g"]
    prevalence_a = y[:100].mean()
    assert fair["gaps"]["sensitivity"] == pytest.approx(
        {"difference": 1.0, "ratio": 0.0, "min": "b", "max": "a", "criterion": "equal opportunity"}
    )
    assert fair["gaps"]["specificity"]["difference"] == pytest.approx(0.0)
    assert fair["gaps"]["positive_rate"]["difference"] == pytest.approx(prevalence_a)
    assert fair["gaps"]["positive_rate"]["criterion"] == "demographic parity"
    assert fair["worst"]["sensitivity"] == {"value": "b", "metric": 0.0}
    assert fair["worst"]["balanced_accuracy"]["value"] == "b"
    # Calibration per group: b's observed rate is far above what it predicts (0.1 each).
    assert fair["calibration"]["b"]["observed_expected"] == pytest.approx(y[100:].mean() / 0.1)
    assert fair["calibration"]["a"]["ece"] == pytest.approx(0.1)
    # The federated summary of two such sites keeps the gap; the spread names the worse site.
    fed = clinical.clinical_summary({"x": summary["statistics"]["site"], "y": summary["statistics"]["site"]})
    assert fed["pooled"]["fairness"]["g"]["gaps"]["sensitivity"]["difference"] == pytest.approx(1.0)


def _push(experiment, server_round: int = 1) -> tuple[list[Message], list]:
    """One evaluation push asking the four heart sites for clinical statistics, as the coordinator sends it."""
    grid = InlineGrid(client_app, 4)
    contexts = list(grid.contexts.values())
    site = load_federation(experiment.data, experiment.seed)[0]
    model = resolve_task(experiment.task.name, experiment.task.args).build_model(site.schema, seed=1)
    arrays = ArrayRecord({k: v.detach() for k, v in model.state_dict().items()})
    config = ConfigRecord(
        {
            EXPERIMENT_KEY: json.dumps(experiment.to_dict()),
            RUN_ID_KEY: "run-c",
            "server-round": server_round,
            EVALUATE_CLINICAL_KEY: True,
        }
    )
    content = RecordDict({"arrays": arrays, "config": config})
    messages = [Message(content, dst_node_id=c.node_id, message_type=MessageType.EVALUATE) for c in contexts]
    return messages, contexts


def _small_cells(experiment) -> dict[str, set[tuple[str, str]]]:
    """Per site, the subgroup cells with fewer than MIN test patients (the node's own knowledge)."""
    small: dict[str, set[tuple[str, str]]] = {}
    for site in load_federation(experiment.data, experiment.seed):
        for sub in experiment.evaluate.clinical.subgroups:
            levels = {"0": "female", "1": "male"} if sub.column == "sex" else None
            values = clinical.assign_values(site.groups_test[sub.column], sub.cuts, levels)
            for value, count in zip(*np.unique(values.astype(str), return_counts=True), strict=True):
                if count < MIN:
                    small.setdefault(site.name, set()).add((sub.label, str(value)))
    return small


def test_a_subgroup_below_the_minimum_count_is_in_no_reply(heart_experiment) -> None:
    experiment = heart_experiment()
    assert [s.label for s in experiment.evaluate.clinical.subgroups] == ["sex", "age band"]
    small = _small_cells(experiment)
    assert ("sex", "female") in small["switzerland"], "the data has small cells to hide"
    messages, contexts = _push(experiment)
    pairs = list(zip(messages, contexts, strict=True))
    torch.manual_seed(0)
    one_by_one = [client_app(m, c) for m, c in pairs]
    cohort = CohortHandler(client_app)(pairs)
    for replies in (one_by_one, cohort):
        for reply in replies:
            assert not reply.has_error(), reply.error
            site = reply.content["site"]["name"]
            text = reply.content[CLINICAL_RECORD]["statistics"]
            statistics = clinical.parse_statistics(text, site)
            released = {(c["group"], c["value"]) for c in statistics["cells"]}
            assert all(c["n"] >= MIN for c in statistics["cells"])
            assert not released & small.get(site, set())
            # Nothing per patient: every cell is counts and sums, none longer than the bins.
            assert all(len(c["pos"]) == statistics["bins"] for c in statistics["cells"])
        by_site = {r.content["site"]["name"]: r.content[CLINICAL_RECORD]["statistics"] for r in replies}
        swiss = clinical.parse_statistics(by_site["switzerland"], "switzerland")
        # 4 women among 31: the women's cell goes, and the men's too (it would give the women's by subtraction).
        assert not any(c["group"] == "sex" for c in swiss["cells"])
    assert [r.content[CLINICAL_RECORD]["statistics"] for r in one_by_one] == [
        r.content[CLINICAL_RECORD]["statistics"] for r in cohort
    ], "the vectorized cohort releases exactly what the ClientApp releases"


def test_under_dp_the_statistics_are_a_charged_noisy_release(heart_experiment, tmp_path, monkeypatch) -> None:
    from flowerbed.client.node_round import SIM_NODE_CONFIG_ENV
    from flowerbed.privacy.accountant import epsilon
    from flowerbed.privacy.ledger import PrivacyLedger

    ledger = tmp_path / "ledger.sqlite"
    node = {"ledger": str(ledger), "budget-epsilon": 8.0, "dp-test-seed": 3}
    monkeypatch.setenv(SIM_NODE_CONFIG_ENV, json.dumps({"*": node}))
    messages, contexts = _push(heart_experiment())
    reply = client_app(messages[0], contexts[0])
    assert not reply.has_error(), reply.error
    statistics = clinical.parse_statistics(reply.content[CLINICAL_RECORD]["statistics"], "cleveland")
    # A patient is in three cells (all, sex, age band): noise 5 x 2 x sqrt(3) on every count.
    assert statistics["noise_std"] == pytest.approx(5.0 * 2 * math.sqrt(3))
    assert all("auroc" not in c and "ece" not in c for c in statistics["cells"]), "no exact figure under DP"
    book = PrivacyLedger(ledger)
    (dataset,) = book.datasets()
    (release,) = book.releases(dataset)
    assert (release.noise_multiplier, release.sample_rate, release.steps) == (5.0, 1.0, 2)
    assert book.epsilon(dataset, 1e-5) == epsilon([(5.0, 1.0, 2)], 1e-5)


def test_the_run_reports_pooled_figures_equal_to_the_pooled_test_set(heart_experiment) -> None:
    run_dir = simulate(heart_experiment("rounds=2", "train.local_epochs=1"), quiet=True)
    summary = read_summary(run_dir)
    figures = summary["final"]["clinical"]
    pooled = figures["pooled"]["all"]
    central = summary["final"]["central"]
    # The nodes' counts, added up, are the server's own evaluation of the pooled test set.
    assert pooled["n"] == central["num-examples"] == 230
    assert pooled["accuracy"] == pytest.approx(central["accuracy"], abs=1e-6)
    assert sorted(figures["sites"]) == ["cleveland", "hungarian", "switzerland", "va"]
    assert figures["sites"]["switzerland"]["suppressed"]["sex"] == ["female", "male"]
    assert figures["sites"]["va"]["groups"]["sex"].keys() == {"male"}
    assert figures["groups"]["age band"] == ["<45", "45 to <55", "55 to <65", "≥65"]
    assert "sensitivity" in figures["pooled"]["fairness"]["sex"]["gaps"]
    assert figures["spread"]["auroc"]["worst_site"] in figures["sites"]
    assert not figures["rejected"] and not figures["withheld"]
