"""The node's data-quality report: what ``flowerbed node check`` and ``node start``'s pre-flight found.

The report stays at the node. It is written as Markdown and JSON (``data-report.md``,
``data-report.json``) beside the node's ledger, or in its state folder, and holds counts and line
numbers of the hospital's own file: per column missingness, values outside the contract's valid
range, outliers by its plausible range, duplicate rows, label balance, the site's size and its
split, and every problem with what to do. It quotes cells only from numeric, binary, categorical
and label columns, and only where a value is wrong; identifier and free-text columns are never read.

Nothing of it is sent anywhere. ``shareable`` is the part a hospital may choose to hand to the
coordinator's operator (``node check --write-shareable``): aggregate counts only, no line numbers,
no values, no label balance.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowerbed.exception import DataError
from flowerbed.tasks.data.contract import DataContract
from flowerbed.tasks.data.intake import Problem, Table
from flowerbed.tasks.task import SiteData

REPORT_NAME = "data-report"
SHAREABLE_NAME = "data-report.shareable.json"
#: Below this share of rows a class is reported as rare (a warning: the site still trains).
RARE_CLASS = 0.10


@dataclass
class DataReport:
    """Everything the node found in its data, as counts (see the module's docstring)."""

    site: str
    path: Path
    contract: DataContract
    table: Table
    train_rows: int | None = None
    test_rows: int | None = None
    classes: dict[str, dict[int, int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    created: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))

    @property
    def blocking(self) -> list[Problem]:
        """The problems that keep the node from joining."""
        return [p for p in self.problems if p.blocking]

    @property
    def verdict(self) -> str:
        """``ok`` or ``refused``."""
        return "refused" if self.blocking else "ok"

    @property
    def rows(self) -> int:
        """Data rows read."""
        return len(self.table.values)

    def count(self, severity: str) -> int:
        """How many problems of this severity."""
        return sum(p.severity == severity for p in self.problems)

    def duplicates(self) -> int:
        """Rows that repeat an earlier row."""
        return sum(p.count for p in self.problems if p.code == "duplicate-row")

    def label_values(self) -> dict[str, int]:
        """Rows per label value (as written in the file, e.g. ``num`` 0..4)."""
        contract = self.table.contract
        if not self.rows:
            return {}
        labels = self.table.column(contract.label.name)
        values, counts = np.unique(labels[~np.isnan(labels)], return_counts=True)
        return {f"{v:g}": int(c) for v, c in zip(values, counts, strict=True)}

    def to_dict(self) -> dict[str, Any]:
        """The JSON report."""
        contract = self.table.contract
        columns = {}
        for column in contract.data_columns:
            stats = self.table.stats.get(column.name)
            entry: dict[str, Any] = {**(stats.to_dict() if stats else {}), "unit": column.unit or None}
            entry["missing_share"] = round(entry.get("missing", 0) / self.rows, 4) if self.rows else None
            if column.plausible is not None:
                entry["plausible"] = list(column.plausible)
            if column.valid is not None:
                entry["valid"] = list(column.valid)
            columns[column.name] = entry
        return {
            "site": self.site,
            "file": str(self.path),
            "created": self.created,
            "verdict": self.verdict,
            "contract": {"name": contract.name, "version": contract.version, "fingerprint": contract.fingerprint},
            "dialect": self.table.dialect.to_dict() if self.table.dialect else None,
            "rows": {
                "read": self.rows,
                "train": self.train_rows,
                "test": self.test_rows,
                "duplicates": self.duplicates(),
                "min_train": contract.min_train_rows,
            },
            "columns_matched": list(self.table.matched),
            "columns_dropped": list(self.table.dropped),
            "columns": columns,
            "labels": {"column": contract.label.name, "values": self.label_values(), "classes": self._classes()},
            "problems": [p.to_dict() for p in self.problems],
            "counts": {"errors": self.count("error"), "warnings": self.count("warning"), "notes": self.count("note")},
            "shared": "nothing: this report stays at the node",
        }

    def _classes(self) -> dict[str, dict[str, int]]:
        return {split: {str(k): v for k, v in counts.items()} for split, counts in self.classes.items()}

    def shareable(self) -> dict[str, Any]:
        """Aggregate counts only, for a hospital that chooses to share them (no lines, values or labels)."""
        columns = {
            name: {k: v for k, v in stats.to_dict().items() if k in ("missing", "invalid", "out_of_range", "outliers")}
            for name, stats in self.table.stats.items()
        }
        problems: dict[str, int] = {}
        for problem in self.problems:
            problems[problem.code] = problems.get(problem.code, 0) + max(problem.count, 1)
        return {
            "site": self.site,
            "contract": self.table.contract.ref,
            "verdict": self.verdict,
            "rows": self.rows,
            "train_rows": self.train_rows,
            "test_rows": self.test_rows,
            "duplicates": self.duplicates(),
            "columns": columns,
            "problems": problems,
        }

    def to_markdown(self) -> str:
        """The Markdown report."""
        contract = self.table.contract
        dialect = self.table.dialect.describe() if self.table.dialect else "not read"
        split = f" ({self.train_rows} training, {self.test_rows} test)" if self.train_rows is not None else ""
        verdict = (
            f"**refused**: {len(self.blocking)} blocking problem{'s' if len(self.blocking) != 1 else ''}"
            if self.blocking
            else "**ok**: the node may join"
        )
        out = [
            f"# Data report: site {self.site}",
            "",
            f"- file: `{self.path}`",
            f"- checked: {self.created}",
            f"- data contract: {contract.ref}",
            f"- read as: {dialect}",
            f"- rows: {self.rows}{split}; duplicates: {self.duplicates()}",
            f"- columns: {len(self.table.matched)} matched by the contract"
            + (f"; dropped unread: {', '.join(self.table.dropped)}" if self.table.dropped else ""),
            f"- verdict: {verdict}",
            "- this report stays at the node: nothing in it is sent anywhere",
            "",
            "## Problems",
            "",
        ]
        if not self.problems:
            out.append("None.")
        else:
            out += ["| severity | problem | where | what to do |", "|---|---|---|---|"]
            for p in self.problems:
                out.append(f"| {p.severity} | {_cell(p.headline())} | {_cell(p.where())} | {_cell(p.action)} |")
        out += ["", "## Columns", ""]
        out += [
            "| column | kind | unit | present | missing | invalid | outside valid range | outliers (plausible range) |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for column in contract.data_columns:
            s = self.table.stats.get(column.name)
            if s is None:
                continue
            missing = f"{s.missing} ({s.missing / self.rows:.0%})" if self.rows else "0"
            plausible = f"{s.outliers} ({column.plausible[0]:g} to {column.plausible[1]:g})" if column.plausible else ""
            out.append(
                f"| {column.name} | {column.kind} | {column.unit} | {s.present} | {missing} | {s.invalid} | "
                f"{s.out_of_range} | {plausible} |"
            )
        out += ["", "## Labels", ""]
        values = self.label_values()
        if values:
            out += [f"| {contract.label.name} | rows |", "|---|---:|"]
            out += [f"| {value} | {count} |" for value, count in values.items()]
        if self.classes:
            classes = sorted({k for counts in self.classes.values() for k in counts})
            out += ["", "| class | " + " | ".join(self.classes) + " |", "|---|" + "---:|" * len(self.classes)]
            for k in classes:
                out.append(f"| {k} | " + " | ".join(str(c.get(k, 0)) for c in self.classes.values()) + " |")
        return "\n".join(out) + "\n"

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write ``data-report.md`` and ``data-report.json`` into ``folder`` (readable by this account only)."""
        folder.mkdir(parents=True, exist_ok=True)
        markdown, data = folder / f"{REPORT_NAME}.md", folder / f"{REPORT_NAME}.json"
        _write_private(markdown, self.to_markdown())
        _write_private(data, json.dumps(self.to_dict(), indent=2) + "\n")
        return markdown, data

    def write_shareable(self, folder: Path) -> Path:
        """Write the aggregate counts a hospital may choose to share (``data-report.shareable.json``)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / SHAREABLE_NAME
        _write_private(path, json.dumps(self.shareable(), indent=2) + "\n")
        return path


class DataCheckFailed(DataError):
    """The node's data has blocking problems; ``report`` has them all, ``paths`` where it was written."""

    def __init__(self, report: DataReport, paths: tuple[Path, ...] = ()) -> None:
        self.report = report
        self.paths = paths
        count = len(report.blocking)
        bullets = "\n".join(f"  - {p.describe(report.path)}" for p in report.blocking)
        where = f"\nreport: {paths[0]}" if paths else ""
        super().__init__(
            f"{report.path}: the data does not fit the data contract {report.table.contract.ref} "
            f"({count} blocking problem{'s' if count != 1 else ''}):\n{bullets}{where}"
        )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by this account only (the report names the hospital's rows)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    path.chmod(0o600)  # a report written earlier keeps its mode otherwise


def build_report(
    table: Table,
    site: str,
    site_data: SiteData | None,
    *,
    test_fraction: float,
    min_test_rows: int,
    problems: list[Problem] | None = None,
) -> DataReport:
    """The report for a table and (when its rows make a site) its split, with the site-level checks.

    Site-level checks: enough rows for each split (the contract's ``min_train_rows``, and the larger
    of its ``min_test_rows`` and the node's ``min-test-rows``) and label balance.
    """
    contract = table.contract
    report = DataReport(site, table.path, contract, table, problems=[*(problems or []), *table.problems])
    if site_data is None:
        return report
    report.train_rows, report.test_rows = site_data.num_train, len(site_data.y_test)
    for split, labels in (("train", site_data.y_train), ("test", site_data.y_test)):
        values, counts = np.unique(labels, return_counts=True)
        report.classes[split] = {int(v): int(c) for v, c in zip(values, counts, strict=True)}
    min_train, min_test = contract.min_train_rows, max(contract.min_test_rows, min_test_rows)
    if report.train_rows < min_train or report.test_rows < min_test:
        needed = math.ceil(max(min_train / (1 - test_fraction), min_test / test_fraction))
        report.problems.insert(
            0,
            Problem(
                "error",
                "too-few-rows",
                f"{report.rows} rows make {report.train_rows} training and {report.test_rows} test rows "
                f"(test-fraction {test_fraction:g}); the federation needs at least {min_train} training and "
                f"{min_test} test rows (about {needed} rows in all), so that no reply describes a handful of patients",
                "export all of the site's eligible patients; a site with fewer rows does not join",
            ),
        )
    everything = np.concatenate([site_data.y_train, site_data.y_test])
    values, counts = np.unique(everything, return_counts=True)
    shares = [(int(v), c / len(everything)) for v, c in zip(values, counts, strict=True)]
    for value, share in [(v, s) for v, s in shares if s < RARE_CLASS]:
        report.problems.append(
            Problem(
                "warning",
                "rare-class",
                f"class {value} is {share:.0%} of the rows: the labels are imbalanced",
                "the site still trains; its own test accuracy says little on its own",
            )
        )
    return report


def site_problem(exc: DataError, path: Path) -> Problem:
    """A site-level refusal (e.g. a single class) as a blocking problem of the report."""
    text = str(exc).removeprefix(f"{path}: ")
    return Problem("error", "site", text, "the federation trains on sites with both classes and enough rows")


def contract_mismatch(held: DataContract, run: DataContract) -> Problem:
    """The node's contract (its kit's) and the run's differ: a blocking problem."""
    return Problem(
        "error",
        "contract-mismatch",
        f"the experiment's data contract is {run.ref}, but this node's kit holds {held.ref}",
        "check against the experiment the coordinator's operator shared, or ask them for the current kit",
    )


def report_folder(ledger: str | Path | None, state: str | Path | None) -> Path:
    """Where the report goes: beside the ledger, else in the node's state folder."""
    if ledger is not None:
        return Path(ledger).expanduser().resolve().parent
    if state is not None:
        return Path(state).expanduser().resolve()
    return Path.cwd()
