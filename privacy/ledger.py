"""The node's privacy ledger: an append-only SQLite file of every DP release.

A release is one round of DP-SGD whose result left (or is about to leave) the node: dataset
fingerprint, run, round, noise multiplier, sample rate, steps, accountant, time. A dataset's epsilon
composes ALL its releases, across runs and restarts, with Opacus's accountant. The budget (maximum
epsilon at a delta) comes from the node's own configuration, never from the server.

Durability: the file is in WAL mode with ``synchronous=FULL``, and ``charge`` commits before it
returns, so a release is on disk before the reply leaves the node. A crash after charging
over-counts; nothing under-counts. Releases cannot be updated or deleted (SQL triggers refuse).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from flowerbed.exception import ConfigError, NodeError, PrivacyBudgetExceeded
from flowerbed.privacy.accountant import epsilon as accountant_epsilon
from flowerbed.privacy.planner import ACCOUNTANTS, DPPlan

History = list[tuple[float, float, int]]
_COLUMNS = "id, dataset, run_id, round, noise_multiplier, sample_rate, steps, accountant, site, time"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sample_rate REAL NOT NULL CHECK (sample_rate > 0 AND sample_rate <= 1),
    steps INTEGER NOT NULL CHECK (steps > 0),
    accountant TEXT NOT NULL,
    site TEXT NOT NULL DEFAULT '',
    time TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS releases_dataset ON releases (dataset, id);
CREATE TRIGGER IF NOT EXISTS releases_no_update BEFORE UPDATE ON releases
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS releases_no_delete BEFORE DELETE ON releases
BEGIN SELECT RAISE(ABORT, 'the privacy ledger is append-only'); END;
CREATE TABLE IF NOT EXISTS plans (
    dataset TEXT NOT NULL,
    run_id TEXT NOT NULL,
    plan TEXT NOT NULL,
    time TEXT NOT NULL,
    PRIMARY KEY (dataset, run_id)
);
"""


def fingerprint_file(path: str | Path) -> str:
    """SHA-256 (hex) of a data file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_arrays(*arrays: Any) -> str:
    """SHA-256 (hex) of arrays (numpy or torch): dtype, shape and bytes of each, in order."""
    digest = hashlib.sha256()
    for arr in arrays:
        if hasattr(arr, "detach"):
            arr = arr.detach().cpu().numpy()
        a = np.ascontiguousarray(arr)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Budget:
    """The hospital's promise for every dataset of this node: at most ``epsilon`` at ``delta``.

    Parameters
    ----------
    epsilon : float
        Maximum cumulative epsilon per dataset, over all runs, ever.
    delta : float
        The delta at which epsilon is measured.
    accountant : str (default: "prv")
        Opacus accountant that composes the releases.
    """

    epsilon: float
    delta: float
    accountant: str = "prv"

    def __post_init__(self) -> None:
        problems = []
        if not self.epsilon > 0:
            problems.append(f"budget-epsilon = {self.epsilon} must be > 0 (e.g. 8.0)")
        if not 0 < self.delta < 1:
            problems.append(f"budget-delta = {self.delta} must be in (0, 1) (e.g. 1e-5)")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"budget-accountant = {self.accountant!r} must be one of {ACCOUNTANTS}")
        if problems:
            raise ConfigError("node config", problems)

    @classmethod
    def from_node_config(cls, config: Mapping[str, Any]) -> Budget | None:
        """Read ``budget-epsilon``, ``budget-delta`` (default 1e-5), ``budget-accountant``.

        Returns ``None`` when the node sets no ``budget-epsilon``.
        """
        if config.get("budget-epsilon") is None:
            return None
        try:
            return cls(
                epsilon=float(config["budget-epsilon"]),
                delta=float(config.get("budget-delta", 1e-5)),
                accountant=str(config.get("budget-accountant", "prv")),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError("node config", [f"budget-*: {exc}"]) from None


@dataclass(frozen=True)
class Charge:
    """One release to record: which dataset, which run and round, under which plan, how many steps."""

    dataset: str
    run_id: str
    round: int
    plan: DPPlan
    steps: int
    site: str = ""


@dataclass(frozen=True)
class Release:
    """One row of the ledger."""

    id: int
    dataset: str
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    site: str
    time: str


def compose(history: Iterable[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of a history of (noise multiplier, sample rate, steps).

    ``flowerbed.privacy.accountant.epsilon``: equal to Opacus's accountant bit for bit, faster,
    memoized; consecutive entries with the same noise multiplier and sample rate are merged,
    exactly as Opacus's accountant does when it is stepped one step at a time.
    """
    return accountant_epsilon(history, delta, accountant)


def check_budget(
    history: Iterable[tuple[float, float, int]],
    step: tuple[float, float, int],
    budget: Budget,
    *,
    dataset: str,
    site: str = "",
    rounds: int = 1,
) -> float:
    """Refuse unless ``step`` after ``history`` fits in ``budget``; return the projected epsilon.

    Raises
    ------
    PrivacyBudgetExceeded
        Naming the site, the dataset, what was spent, the budget and the fix (the only place
        this refusal is written).
    """
    history = list(history)
    projected = compose([*history, step], budget.delta, budget.accountant)
    if projected > budget.epsilon:
        spent = compose(history, budget.delta, budget.accountant)
        where = f"site {site}, " if site else ""
        what = "the next round" if rounds == 1 else f"{rounds} more rounds"
        raise PrivacyBudgetExceeded(
            f"privacy budget exhausted: spent {spent:.3g} of {budget.epsilon:.3g} on dataset "
            f"{_short(dataset)} ({where}delta {budget.delta:.3g}); {what} would bring it "
            f"to {projected:.3g}; raise budget-epsilon in the node config, or lower rounds "
            "or local epochs, or raise the noise"
        )
    return projected


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@functools.lru_cache(maxsize=4096)
def _plan_json(plan: DPPlan) -> str:
    return json.dumps(plan.to_dict(), sort_keys=True)


@functools.lru_cache(maxsize=4096)
def _parse_plan(text: str) -> DPPlan:
    return DPPlan.from_dict(json.loads(text))


def _chunks(items: list[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _short(dataset: str) -> str:
    return dataset[:12]


class PrivacyLedger:
    """Append-only record of a node's DP releases and the plans of its runs.

    Parameters
    ----------
    path : str | Path
        The SQLite file (created with its folder when missing). Comes from the node's config
        (key ``ledger``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._plans: dict[tuple[str, str], DPPlan] = {}
        self._local = threading.local()  # one open connection per thread and process
        self._known: dict[str, History] = {}  # histories read or written by this object ...
        self._version: tuple[int, int, int] | None = None  # ... valid while no other connection wrote
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                con.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise NodeError(
                f"privacy ledger {self.path}: cannot open ({exc}); set `ledger` in the node config to a writable file"
            ) from None

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (opened once; a forked child opens its own)."""
        held = getattr(self._local, "connection", None)
        if held is None or held[0] != os.getpid():
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            held = self._local.connection = (os.getpid(), con)
        yield held[1]

    # ----------------------------------------------------------------- reading
    def releases(self, dataset: str | None = None) -> list[Release]:
        """Every release (of one dataset, or all), oldest first."""
        with self._connect() as con:
            return self._releases(con, dataset)

    @staticmethod
    def _releases(con: sqlite3.Connection, dataset: str | None) -> list[Release]:
        cols = _COLUMNS
        if dataset is None:
            rows = con.execute(f"SELECT {cols} FROM releases ORDER BY id").fetchall()
        else:
            rows = con.execute(f"SELECT {cols} FROM releases WHERE dataset = ? ORDER BY id", (dataset,)).fetchall()
        return [Release(*row) for row in rows]

    def history(self, dataset: str, run_id: str | None = None) -> History:
        """(noise multiplier, sample rate, steps) of a dataset's releases, oldest first."""
        return [
            (r.noise_multiplier, r.sample_rate, r.steps)
            for r in self.releases(dataset)
            if run_id is None or r.run_id == run_id
        ]

    def datasets(self) -> list[str]:
        """Fingerprints of every dataset with at least one release."""
        with self._connect() as con:
            rows = con.execute("SELECT DISTINCT dataset FROM releases ORDER BY dataset").fetchall()
        return [r[0] for r in rows]

    def epsilon(self, dataset: str, delta: float, accountant: str = "prv", run_id: str | None = None) -> float:
        """Epsilon at ``delta`` spent on ``dataset`` by all its releases (or one run's)."""
        return compose(self.history(dataset, run_id), delta, accountant)

    def rounds_charged(self, dataset: str, run_id: str) -> int:
        """How many releases a run has made on a dataset."""
        with self._connect() as con:
            (count,) = con.execute(
                "SELECT COUNT(*) FROM releases WHERE dataset = ? AND run_id = ?",
                (dataset, run_id),
            ).fetchone()
        return int(count)

    def histories(self, datasets: Iterable[str]) -> dict[str, History]:
        """(noise multiplier, sample rate, steps) of each dataset's releases, oldest first, in one read."""
        with self._connect() as con:
            return self._histories(con, sorted(set(datasets)))

    def _histories(self, con: sqlite3.Connection, datasets: list[str]) -> dict[str, History]:
        """Each dataset's history; read from the file only when another connection wrote since the last read."""
        version = (os.getpid(), id(con), con.execute("PRAGMA data_version").fetchone()[0])
        if version != self._version:
            self._known.clear()
            self._version = version
        missing = [d for d in datasets if d not in self._known]
        for dataset in missing:
            self._known[dataset] = []
        for part in _chunks(missing):
            marks = ",".join("?" * len(part))
            rows = con.execute(
                "SELECT dataset, noise_multiplier, sample_rate, steps FROM releases "
                f"WHERE dataset IN ({marks}) ORDER BY id",
                part,
            ).fetchall()
            for dataset, sigma, q, steps in rows:
                self._known[dataset].append((sigma, q, steps))
        return {d: list(self._known[d]) for d in datasets}

    # ------------------------------------------------------------------ plans
    def save_plan(self, dataset: str, run_id: str, plan: DPPlan) -> DPPlan:
        """Store a run's plan; the first stored plan wins and is returned (restarts reuse it)."""
        return self.save_plans([(dataset, run_id, plan)])[0]

    def save_plans(self, items: list[tuple[str, str, DPPlan]]) -> list[DPPlan]:
        """``save_plan`` for many (dataset, run, plan) at once, in one transaction.

        A plan this object already stored or read is returned without touching the file: the first
        stored plan of a run never changes.
        """
        unknown = [(d, r, p) for d, r, p in items if (d, r) not in self._plans]
        if unknown:
            for key, plan in zip(((d, r) for d, r, _ in unknown), self._store_plans(unknown), strict=True):
                self._plans[key] = plan
        return [self._plans[(d, r)] for d, r, _ in items]

    def _store_plans(self, items: list[tuple[str, str, DPPlan]]) -> list[DPPlan]:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany(
                    "INSERT OR IGNORE INTO plans (dataset, run_id, plan, time) VALUES (?, ?, ?, ?)",
                    [(d, r, _plan_json(p), _now()) for d, r, p in items],
                )
                stored: dict[tuple[str, str], str] = {}
                by_run: dict[str, list[str]] = {}
                for d, r, _ in items:
                    by_run.setdefault(r, []).append(d)
                for run_id, datasets in by_run.items():
                    for part in _chunks(datasets):
                        marks = ",".join("?" * len(part))
                        rows = con.execute(
                            f"SELECT dataset, plan FROM plans WHERE run_id = ? AND dataset IN ({marks})",
                            [run_id, *part],
                        )
                        stored.update(((d, run_id), text) for d, text in rows)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return [_parse_plan(stored[(d, r)]) if (d, r) in stored else p for d, r, p in items]

    def load_plan(self, dataset: str, run_id: str) -> DPPlan | None:
        """The plan stored for a run on a dataset, if any."""
        with self._connect() as con:
            row = con.execute("SELECT plan FROM plans WHERE dataset = ? AND run_id = ?", (dataset, run_id)).fetchone()
        return None if row is None else _parse_plan(row[0])

    # ----------------------------------------------------------------- budget
    def check(self, dataset: str, plan: DPPlan, budget: Budget, *, rounds: int = 1, site: str = "") -> float:
        """Refuse unless ``rounds`` more rounds of ``plan`` fit in ``budget``.

        Returns
        -------
        float
            The projected epsilon at ``budget.delta`` (this dataset's releases plus the new ones).

        Raises
        ------
        PrivacyBudgetExceeded
            When the projection exceeds ``budget.epsilon`` (``check_budget``'s refusal).
        """
        step = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round * rounds)
        return check_budget(self.history(dataset), step, budget, dataset=dataset, site=site, rounds=rounds)

    def charge(
        self,
        *,
        dataset: str,
        run_id: str,
        round: int,
        plan: DPPlan,
        steps: int | None = None,
        site: str = "",
        budget: Budget | None = None,
    ) -> Release:
        """Record one release durably (committed and synced before returning).

        With ``budget``, the check and the write happen in one exclusive transaction, so two
        processes sharing the ledger cannot both spend the last of a budget.

        Raises
        ------
        PrivacyBudgetExceeded
            With ``budget``, when this release does not fit; nothing is written.
        """
        charge = Charge(dataset, run_id, int(round), plan, plan.steps_per_round if steps is None else int(steps), site)
        (outcome,) = self.charge_many([charge], [budget])
        if isinstance(outcome, PrivacyBudgetExceeded):
            raise outcome
        return outcome

    def charge_many(self, charges: list[Charge], budgets: list[Budget | None]) -> list[Release | PrivacyBudgetExceeded]:
        """Record many releases in one exclusive transaction, each checked against its budget.

        Releases are checked in order, each after the ones before it in the same call (two
        releases of one dataset both count). A release that does not fit is not written and its
        place in the result holds the refusal; the others are committed, and synced, together.
        """
        return self.charge_batch(charges, budgets)[0]

    def charge_batch(
        self, charges: list[Charge], budgets: list[Budget | None]
    ) -> tuple[list[Release | PrivacyBudgetExceeded], dict[str, History]]:
        """``charge_many``, and every charged dataset's whole history after it (read in the same transaction)."""
        if not charges:
            return [], {}
        outcomes: list[Release | PrivacyBudgetExceeded] = []
        now = _now()
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                known = self._histories(con, sorted({c.dataset for c in charges}))
                rows = []
                for charge, budget in zip(charges, budgets, strict=True):
                    step = (float(charge.plan.noise_multiplier), float(charge.plan.sample_rate), int(charge.steps))
                    if budget is not None:
                        try:
                            check_budget(known[charge.dataset], step, budget, dataset=charge.dataset, site=charge.site)
                        except PrivacyBudgetExceeded as exc:
                            outcomes.append(exc)
                            continue
                    known[charge.dataset].append(step)
                    row = (charge.dataset, charge.run_id, charge.round, *step, charge.plan.accountant, charge.site, now)
                    rows.append(row)
                    outcomes.append(Release(0, *row))  # type: ignore[arg-type]
                if rows:
                    con.executemany(
                        "INSERT INTO releases (dataset, run_id, round, noise_multiplier, sample_rate,"
                        " steps, accountant, site, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    # AUTOINCREMENT in one exclusive transaction: the rows took consecutive ids
                    (last,) = con.execute("SELECT last_insert_rowid()").fetchone()
                    ids = iter(range(int(last) - len(rows) + 1, int(last) + 1))
                    outcomes = [replace(o, id=next(ids)) if isinstance(o, Release) else o for o in outcomes]
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                self._known.clear()
                raise
        self._known.update({d: list(h) for d, h in known.items()})
        return outcomes, known

    # ---------------------------------------------------------------- summary
    def summary(self, delta: float, accountant: str = "prv") -> list[dict[str, Any]]:
        """Per dataset: epsilon at ``delta`` over all releases, and per run."""
        out = []
        for dataset in self.datasets():
            rel = self.releases(dataset)
            runs: dict[str, list[Release]] = {}
            for r in rel:
                runs.setdefault(r.run_id, []).append(r)
            out.append(
                {
                    "dataset": dataset,
                    "epsilon": compose(
                        [(r.noise_multiplier, r.sample_rate, r.steps) for r in rel],
                        delta,
                        accountant,
                    ),
                    "delta": delta,
                    "accountant": accountant,
                    "releases": len(rel),
                    "sites": sorted({r.site for r in rel if r.site}),
                    "runs": [
                        {
                            "run_id": run_id,
                            "rounds": len(rs),
                            "steps": sum(r.steps for r in rs),
                            "epsilon": compose(
                                [(r.noise_multiplier, r.sample_rate, r.steps) for r in rs],
                                delta,
                                accountant,
                            ),
                            "first": rs[0].time,
                            "last": rs[-1].time,
                        }
                        for run_id, rs in runs.items()
                    ],
                }
            )
        return out
