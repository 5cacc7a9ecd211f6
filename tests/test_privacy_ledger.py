"""The node's privacy ledger: Opacus-exact composition, durability across restarts and kills."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import typer
from opacus.accountants import create_accountant
from typer.testing import CliRunner

from flowerbed.exception import PrivacyBudgetExceeded
from flowerbed.privacy.ledger import (
    Budget,
    Charge,
    PrivacyLedger,
    compose,
    fingerprint_arrays,
    fingerprint_file,
)
from flowerbed.privacy.planner import DPPlan

# Two runs on one dataset with different plans, then a third run like the first.
RELEASES = [
    ("run-a", 1.1, 0.125, 8, 3),
    ("run-b", 0.8, 0.1, 10, 2),
    ("run-c", 1.1, 0.125, 8, 2),
]


def _plan(sigma: float, q: float, steps: int, accountant: str = "prv") -> DPPlan:
    return DPPlan(
        noise_multiplier=sigma,
        sample_rate=q,
        steps_per_round=steps,
        rounds=10,
        max_grad_norm=1.0,
        delta=1e-5,
        accountant=accountant,
    )


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def _opacus_stepped(accountant: str) -> object:
    """Opacus's own accountant, stepped one DP-SGD step at a time over RELEASES."""
    acc = create_accountant(mechanism=accountant)
    for _, sigma, q, steps, rounds in RELEASES:
        for _ in range(steps * rounds):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc


WRITER = """
import sys
from flowerbed.privacy.ledger import PrivacyLedger
from flowerbed.privacy.planner import DPPlan
path, dataset, releases = sys.argv[1], sys.argv[2], eval(sys.argv[3])
ledger = PrivacyLedger(path)
for run_id, sigma, q, steps, rounds in releases:
    plan = DPPlan(noise_multiplier=sigma, sample_rate=q, steps_per_round=steps, rounds=10,
                  max_grad_norm=1.0, delta=1e-5)
    for r in range(1, rounds + 1):
        ledger.charge(dataset=dataset, run_id=run_id, round=r, plan=plan, site="cleveland")
"""

READER = """
import json, sys
from flowerbed.privacy.ledger import PrivacyLedger
ledger = PrivacyLedger(sys.argv[1])
print(json.dumps({acc: ledger.epsilon(sys.argv[2], 1e-5, acc) for acc in ("prv", "rdp")}))
"""


def test_ledger_epsilon_equals_opacus_accountant_across_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.sqlite")
    # One process writes every release, then exits; another reads them back.
    _run(WRITER, path, "ds1", repr(RELEASES))
    got = json.loads(_run(READER, path, "ds1").stdout)
    for accountant in ("prv", "rdp"):
        expected = _opacus_stepped(accountant).get_epsilon(delta=1e-5)
        assert got[accountant] == pytest.approx(expected, abs=1e-6)
        assert got[accountant] > 0
    # A dataset without releases has spent nothing; another dataset's releases do not count.
    ledger = PrivacyLedger(path)
    assert ledger.epsilon("other", 1e-5) == 0.0
    assert len(ledger.releases("ds1")) == sum(r[4] for r in RELEASES)
    assert ledger.rounds_charged("ds1", "run-b") == 2


def test_every_run_composes_into_the_dataset_total(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    for run_id, sigma, q, steps, rounds in RELEASES:
        for r in range(rounds):
            ledger.charge(dataset="d", run_id=run_id, round=r + 1, plan=_plan(sigma, q, steps))
    total = ledger.epsilon("d", 1e-5)
    per_run = [ledger.epsilon("d", 1e-5, run_id=r[0]) for r in RELEASES]
    assert total > max(per_run)
    assert total <= sum(per_run) + 1e-9  # composition is never worse than adding epsilons


def test_ledger_rows_cannot_be_updated_or_deleted(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    PrivacyLedger(path).charge(dataset="d", run_id="r", round=1, plan=_plan(1.0, 0.1, 10))
    con = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM releases")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE releases SET steps = 1")
    con.close()
    assert PrivacyLedger(path).history("d") == [(1.0, 0.1, 10)]


def test_check_refuses_with_the_numbers_and_charge_is_atomic(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    plan = _plan(1.0, 0.125, 8)
    roomy = Budget(epsilon=100.0, delta=1e-5)
    one_round = ledger.check("d", plan, roomy)
    two_rounds = ledger.check("d", plan, roomy, rounds=2)
    assert two_rounds > one_round
    budget = Budget(epsilon=(one_round + two_rounds) / 2, delta=1e-5)
    assert ledger.check("d", plan, budget, site="cleveland") == pytest.approx(one_round)
    ledger.charge(dataset="d", run_id="r", round=1, plan=plan, budget=budget)
    with pytest.raises(PrivacyBudgetExceeded) as err:
        ledger.check("d", plan, budget, site="cleveland")
    msg = str(err.value)
    assert msg.startswith(f"privacy budget exhausted: spent {one_round:.3g} of {budget.epsilon:.3g}")
    assert "cleveland" in msg and "dataset d" in msg
    # The atomic check inside charge refuses too, and writes nothing.
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.charge(dataset="d", run_id="r", round=2, plan=plan, budget=budget)
    assert len(ledger.releases("d")) == 1
    # Projecting a whole run refuses earlier than projecting one round.
    fresh = PrivacyLedger(tmp_path / "fresh.sqlite")
    fresh.check("d", plan, budget, rounds=1)
    with pytest.raises(PrivacyBudgetExceeded, match="2 more rounds"):
        fresh.check("d", plan, budget, rounds=2)


def test_a_batch_of_charges_returns_the_rows_it_wrote(tmp_path: Path) -> None:
    """Charged together, releases come back with their stored ids; a refused one writes nothing between."""
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    plan = _plan(1.0, 0.125, 8)
    ledger.charge(dataset="x", run_id="r", round=1, plan=plan)
    tight = Budget(epsilon=ledger.check("d", plan, Budget(epsilon=100.0, delta=1e-5)) * 1.01, delta=1e-5)
    charges = [Charge(d, "r", 2, plan, 8, d) for d in ("a", "d", "d", "b")]
    outcomes = ledger.charge_many(charges, [None, tight, tight, None])
    assert isinstance(outcomes[2], PrivacyBudgetExceeded)  # the second release of "d" does not fit
    written = [o for o in outcomes if not isinstance(o, PrivacyBudgetExceeded)]
    assert written == [r for r in ledger.releases() if r.run_id == "r" and r.round == 2]
    assert [r.dataset for r in written] == ["a", "d", "b"] and written[0].id < written[1].id < written[2].id


def test_budget_comes_from_node_config() -> None:
    assert Budget.from_node_config({}) is None
    b = Budget.from_node_config({"budget-epsilon": 8, "budget-delta": 1e-6})
    assert b == Budget(epsilon=8.0, delta=1e-6, accountant="prv")
    with pytest.raises(Exception, match="budget-epsilon"):
        Budget.from_node_config({"budget-epsilon": -1})


def test_first_plan_of_a_run_wins(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    first, second = _plan(1.0, 0.1, 10), _plan(2.0, 0.1, 10)
    assert ledger.save_plan("d", "run", first) == first
    assert PrivacyLedger(tmp_path / "l.sqlite").save_plan("d", "run", second) == first
    assert ledger.load_plan("d", "other") is None


def test_fingerprints_follow_content(tmp_path: Path) -> None:
    a = tmp_path / "a.csv"
    a.write_text("1,2\n3,4\n")
    assert fingerprint_file(a) == fingerprint_file(a)
    b = tmp_path / "b.csv"
    b.write_text("1,2\n3,5\n")
    assert fingerprint_file(a) != fingerprint_file(b)
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert fingerprint_arrays(x, np.array([0, 1, 0])) == fingerprint_arrays(x.copy(), np.array([0, 1, 0]))
    assert fingerprint_arrays(x) != fingerprint_arrays(x.reshape(2, 3))
    assert fingerprint_arrays(x) != fingerprint_arrays(x.astype(np.float64))


KILLED_NODE = """
import json, sys, time
from uuid import uuid4
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from flowerbed.client.app import app
from flowerbed.experiment import load_experiment
from flowerbed.privacy.ledger import PrivacyLedger
from flowerbed.tasks.data.catalog import load_federation
from flowerbed.tasks import resolve_task
from flowerbed.weights import model_to_arrays

toml, ledger_path, kill_round = sys.argv[1], sys.argv[2], int(sys.argv[3])
experiment = load_experiment(toml, ["privacy.enabled=true", "privacy.noise_multiplier=1.0",
                                    "train.local_epochs=1", "rounds=10"])
site = load_federation(experiment.data, experiment.seed)[0]
task = resolve_task(experiment.task.name, experiment.task.args)
arrays = model_to_arrays(task.build_model(site.schema, seed=0))
context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                  node_config={"partition-id": 0, "ledger": ledger_path})
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
charge_batch = PrivacyLedger.charge_batch

def charge_then_maybe_die(self, charges, budgets):
    charged = charge_batch(self, charges, budgets)
    for c in charges:
        print(f"charged {c.round}", flush=True)
        if c.round == kill_round:
            time.sleep(120)  # killed here: charged, reply not yet built
    return charged

PrivacyLedger.charge_batch = charge_then_maybe_die
for r in range(1, 11):
    config = ConfigRecord({"server-round": r, "flowerbed.run-id": "run-1",
                           "flowerbed.experiment": json.dumps(experiment.to_dict())})
    message = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1,
                      message_type="train")
    message.metadata.__dict__["_message_id"] = str(uuid4())
    reply = app(message, context)
    assert not reply.has_error(), reply.error
    print(f"replied {r} {reply.content['metrics']['epsilon']}", flush=True)
"""


def test_node_killed_between_charge_and_reply_never_under_counts(tmp_path: Path) -> None:
    from flowerbed.experiment import load_experiment
    from flowerbed.privacy.planner import sampling
    from flowerbed.tasks.data.catalog import load_federation
    from tests.conftest import HEART_TOML

    path = str(tmp_path / "ledger.sqlite")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_NODE), str(HEART_TOML), path, "3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    replied: list[float] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("replied"):
                replied.append(float(line.split()[2]))
            if line.strip() == "charged 3":
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # After the restart: both replies that left are charged, and so is the round killed before
    # its reply. The ledger over-counts (3 rounds), never under-counts (2).
    assert len(replied) == 2
    ledger = PrivacyLedger(path)
    (dataset,) = ledger.datasets()
    assert ledger.rounds_charged(dataset, "run-1") == 3
    experiment = load_experiment(HEART_TOML, ["train.local_epochs=1"])
    n = load_federation(experiment.data, experiment.seed)[0].num_train
    q, steps = sampling(n, experiment.train.batch_size)
    stepped = create_accountant(mechanism="prv")
    for _ in range(3 * steps):
        stepped.step(noise_multiplier=1.0, sample_rate=q)
    spent = ledger.epsilon(dataset, 1e-5)
    assert spent == pytest.approx(stepped.get_epsilon(delta=1e-5), abs=1e-6)
    assert spent > replied[-1]


def test_node_budget_command_reports_per_dataset_and_run(tmp_path: Path) -> None:
    from flowerbed.client.commands import register

    app = typer.Typer()
    register(app)
    path = tmp_path / "l.sqlite"
    ledger = PrivacyLedger(path)
    ledger.charge(dataset="d" * 64, run_id="run-a", round=1, plan=_plan(1.0, 0.1, 10), site="s1")
    ledger.charge(dataset="d" * 64, run_id="run-b", round=1, plan=_plan(1.5, 0.1, 10), site="s1")
    result = CliRunner().invoke(app, ["node", "budget", "--ledger", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    (ds,) = json.loads(result.output)
    assert ds["epsilon"] == pytest.approx(ledger.epsilon("d" * 64, 1e-5), abs=1e-9)
    assert [r["run_id"] for r in ds["runs"]] == ["run-a", "run-b"]
    assert ds["runs"][0]["epsilon"] == pytest.approx(ledger.epsilon("d" * 64, 1e-5, run_id="run-a"))
    table = CliRunner().invoke(app, ["node", "budget", "--ledger", str(path)])
    assert table.exit_code == 0 and "run-b" in table.output and "all runs" in table.output


def test_a_ledger_sees_what_another_process_charged(tmp_path: Path) -> None:
    """Histories held in memory are read again once another connection has written."""
    plan = DPPlan(noise_multiplier=1.0, sample_rate=0.2, steps_per_round=5, rounds=3, max_grad_norm=1.0, delta=1e-5)
    ours = PrivacyLedger(tmp_path / "ledger.sqlite")
    ours.charge(dataset="ds", run_id="a", round=1, plan=plan)
    assert ours.histories(["ds"])["ds"] == [(1.0, 0.2, 5)]
    theirs = PrivacyLedger(tmp_path / "ledger.sqlite")
    theirs.charge(dataset="ds", run_id="b", round=1, plan=plan)
    assert ours.histories(["ds"])["ds"] == [(1.0, 0.2, 5), (1.0, 0.2, 5)]
    budget = Budget(epsilon=compose([(1.0, 0.2, 10)], 1e-5, "prv") + 1e-9, delta=1e-5)
    (refused,) = ours.charge_many([Charge("ds", "a", 2, plan, 5)], [budget])
    assert isinstance(refused, PrivacyBudgetExceeded) and len(theirs.releases("ds")) == 2
