"""DP-SGD only where it is valid: a loss that couples the rows of a batch is refused, however it is declared."""

from __future__ import annotations

import pytest

from flowerbed.client.node_round import NodeRequest, Refusal, admit
from flowerbed.protocol import ErrorCode


def _admit_dp(heart_experiment, task: str, args: str = "{}"):
    experiment = heart_experiment(
        f"task.name='{task}'", f"task.args={args}", "privacy.enabled=true", "privacy.noise_multiplier=1.0"
    )
    (outcome,) = admit([NodeRequest("train", experiment, "dp-validity", 1, {"partition-id": 0})])
    return outcome


def test_a_per_row_loss_trains_with_dp(heart_experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWERBED_SIM_NODE_DIR", str(tmp_path))
    assert not isinstance(_admit_dp(heart_experiment, "tests.user_task_example:wide_mlp"), Refusal)
    assert not isinstance(_admit_dp(heart_experiment, "tabular-mlp", "{hidden=8}"), Refusal)


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        ("true", "rows are coupled"),  # a false declaration: the probe on the node's rows catches it
        ("false", "couples the rows of a batch"),
        ("none", "does not say whether its loss is a mean of per-row terms"),
    ],
)
def test_a_batch_coupled_loss_is_refused(heart_experiment, tmp_path, monkeypatch, declared, expected):
    monkeypatch.setenv("FLOWERBED_SIM_NODE_DIR", str(tmp_path))
    outcome = _admit_dp(heart_experiment, "tests.user_task_example:coupled", f"{{declared='{declared}'}}")
    assert isinstance(outcome, Refusal) and outcome.code == ErrorCode.POLICY
    assert expected in outcome.reason


def test_a_noise_the_accountant_cannot_handle_is_a_clear_refusal(heart_experiment, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWERBED_SIM_NODE_DIR", str(tmp_path))
    experiment = heart_experiment("privacy.enabled=true", "privacy.noise_multiplier=1e-6")
    (outcome,) = admit([NodeRequest("train", experiment, "tiny-noise", 1, {"partition-id": 0})])
    assert isinstance(outcome, Refusal) and outcome.code == ErrorCode.CONFIG
    assert "too small for the PRV accountant" in outcome.reason and "rdp" in outcome.reason
