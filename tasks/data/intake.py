"""Reading a hospital's export as hospital systems write it, against the federation's data contract.

``read_table`` takes a file as it comes out of a hospital system (a header row or none, a
byte-order mark, CRLF line endings, ``,`` ``;`` tab or ``|`` separators, decimal commas, empty cells
and missing markers, UTF-8, UTF-16 or Windows-1252) and returns every value of every contract
column, matched by name, in the contract's order, plus **every** problem at once: each with its
file, lines, column, what is wrong and what to do, grouped and counted.

The separator is detected with ``csv.Sniffer`` and checked against the other candidates (the one
that splits the rows into the most columns consistently wins); the decimal mark from the numeric
cells; the header row from its names. ``DialectOptions`` (the node config's ``csv-delimiter``,
``csv-decimal``, ``csv-header``) set any of them explicitly.

What is never shown: the content of a cell from a column that is not numeric, binary, categorical
or a label. Identifier and free-text columns are dropped without reading a cell; an extra column
the contract does not know is refused without reading a cell; a first row that might be data is
never quoted.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from flowerbed.exception import DataError
from flowerbed.tasks.data.contract import Column, DataContract, level_code, open_contract

Severity = Literal["error", "warning", "note"]
Scope = Literal["file", "column", "row", "cell"]

DELIMITERS = (",", ";", "\t", "|")
DELIMITER_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
DECIMAL_COMMA = re.compile(r"[+-]?\d*,\d+")
DECIMAL_POINT = re.compile(r"[+-]?\d*\.\d+")
SAMPLE_LINES = 200
SHOWN_LINES = 5
SHOWN_EXAMPLES = 3
MAX_SHOWN_CHARS = 24


# ------------------------------------------------------------------------------------------- problems


@dataclass
class Problem:
    """One kind of problem in one column (or row, or the whole file), with every line it occurs on.

    ``examples`` holds cell contents only from numeric, binary, categorical and label columns.
    """

    severity: Severity
    code: str
    what: str
    action: str
    scope: Scope = "file"
    column: str | None = None
    lines: list[int] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    @property
    def blocking(self) -> bool:
        """Whether the node refuses the data because of it."""
        return self.severity == "error"

    @property
    def count(self) -> int:
        """Rows affected (0 for a problem of the file or of a column)."""
        return len(self.lines)

    def where(self) -> str:
        """``line 3`` or ``lines 3, 7, 9, 12, 15 and 20 more``."""
        if not self.lines:
            return ""
        if len(self.lines) == 1:
            return f"line {self.lines[0]}"
        shown = ", ".join(str(n) for n in self.lines[:SHOWN_LINES])
        more = len(self.lines) - SHOWN_LINES
        return f"lines {shown}" + (f" and {more} more" if more > 0 else "")

    def _examples(self) -> str:
        quoted = ", ".join(f"'{e}'" for e in self.examples[:SHOWN_EXAMPLES])
        return f" (e.g. {quoted})" if quoted else ""

    def headline(self) -> str:
        """A counted summary: ``212 rows: 'chol' empty``; no file, no line numbers."""
        rows = f"{self.count} row{'s' if self.count != 1 else ''}"
        if self.scope == "cell":
            return f"{rows}: '{self.column}' {self.what}{self._examples()}"
        if self.scope == "row":
            return f"{rows}: {self.what}"
        if self.scope == "column":
            return f"column '{self.column}': {self.what}"
        return self.what

    def describe(self, path: str | Path) -> str:
        """One line naming the file, the line(s), the column, what is wrong and what to do."""
        if self.scope == "cell" and self.count == 1:
            value = f"'{self.examples[0]}' {self.what}" if self.examples else f"the value {self.what}"
            return f"{path}, line {self.lines[0]}, column '{self.column}': {value}; {self.action}"
        if self.scope == "cell":
            rows = f"{self.count} rows ({self.where()})"
            return f"{path}, column '{self.column}', {rows}: {self.what}{self._examples()}; {self.action}"
        if self.scope == "row":
            return f"{path}, {self.where()}: {self.what}; {self.action}"
        if self.scope == "column":
            return f"{path}, column '{self.column}': {self.what}; {self.action}"
        return f"{path}: {self.what}; {self.action}"

    def to_dict(self) -> dict[str, Any]:
        """Plain form for the data report (at most the first 1000 lines)."""
        return {
            "severity": self.severity,
            "code": self.code,
            "column": self.column,
            "rows": self.count,
            "lines": self.lines[:1000],
            "problem": self.headline(),
            "action": self.action,
        }


class _Problems:
    """Groups problems by (severity, code, column, what) in the order they are first met."""

    def __init__(self) -> None:
        self.groups: dict[tuple[str, str, str | None, str], Problem] = {}
        self.added = 0  # every problem met, with its repeats

    def add(
        self,
        severity: Severity,
        code: str,
        what: str,
        action: str,
        *,
        scope: Scope = "file",
        column: str | None = None,
        line: int | None = None,
        example: str | None = None,
    ) -> None:
        self.added += 1
        key = (severity, code, column, what)
        problem = self.groups.get(key)
        if problem is None:
            problem = self.groups[key] = Problem(severity, code, what, action, scope, column)
        if line is not None:
            problem.lines.append(line)
        if example is not None and example not in problem.examples and len(problem.examples) < SHOWN_EXAMPLES:
            problem.examples.append(example)

    def sorted(self) -> list[Problem]:
        rank = {"error": 0, "warning": 1, "note": 2}
        scope = {"file": 0, "column": 1, "row": 2, "cell": 2}
        problems = list(self.groups.values())
        return sorted(problems, key=lambda p: (rank[p.severity], scope[p.scope], p.lines[0] if p.lines else 0))


class IntakeError(DataError):
    """The export does not fit the contract; ``problems`` lists every blocking problem."""

    def __init__(self, path: Path, contract: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        count = len(problems)
        bullets = "\n".join(f"  - {p.describe(path)}" for p in problems)
        super().__init__(
            f"{path}: the data does not fit the data contract {contract} "
            f"({count} blocking problem{'s' if count != 1 else ''}):\n{bullets}"
        )


# ------------------------------------------------------------------------------------------- the text


def decode_export(path: Path) -> tuple[str, str]:
    """A data file's text and its encoding (``UTF-8``, ``UTF-8 with byte-order mark``, ``UTF-16``, ...).

    Raises
    ------
    DataError
        Naming the file when it is missing, not readable, or not text (e.g. a spreadsheet or a
        compressed export), and what to do.
    """
    if not path.is_file():
        raise DataError(f"{path}: data file not found (check the node's data-path)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the data file ({exc.strerror}); check its permissions") from None
    not_text = f"{path}: not a text file (binary content); export the data as CSV text and point data-path at it"
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = raw.decode("utf-16")
        except UnicodeDecodeError:
            raise DataError(not_text) from None
        if sum(c.isascii() for c in text) < 0.9 * len(text):
            raise DataError(not_text)
        return text, "UTF-16 with byte-order mark"
    if b"\x00" in raw[:8192]:
        raise DataError(not_text)
    encoding = "UTF-8 with byte-order mark" if raw.startswith(codecs.BOM_UTF8) else "UTF-8"
    try:
        return raw.decode("utf-8-sig"), encoding
    except UnicodeDecodeError as exc:
        position = exc.start
    try:
        return raw.decode("cp1252"), "Windows-1252 (not UTF-8)"
    except UnicodeDecodeError:
        raise DataError(
            f"{path}: not UTF-8 text (byte {position}); export the data as CSV in UTF-8 and point data-path at it"
        ) from None


def _line_endings(text: str) -> str:
    crlf = text.count("\r\n")
    cr = text.count("\r") - crlf
    lf = text.count("\n") - crlf
    kinds = [name for name, n in (("CRLF", crlf), ("LF", lf), ("CR", cr)) if n]
    return "+".join(kinds) if kinds else "none"


# ------------------------------------------------------------------------------------------- the dialect


@dataclass(frozen=True)
class DialectOptions:
    """What the node config sets explicitly (``None``: detect it)."""

    delimiter: str | None = None
    decimal: str | None = None
    header: bool | None = None


@dataclass(frozen=True)
class Dialect:
    """How the file was read."""

    delimiter: str
    decimal: str
    header: bool
    encoding: str
    line_endings: str
    explicit: tuple[str, ...] = ()

    def describe(self) -> str:
        """``';'-separated, decimal comma, header row, CRLF line endings, UTF-8 with byte-order mark``."""
        name = DELIMITER_NAMES.get(self.delimiter, repr(self.delimiter))
        parts = [
            f"{name}-separated",
            "decimal comma" if self.decimal == "," else "decimal point",
            "header row" if self.header else "no header row",
            f"{self.line_endings} line endings",
            self.encoding,
        ]
        how = f"set in the node config: {', '.join(self.explicit)}" if self.explicit else "detected"
        return f"{', '.join(parts)} ({how})"

    def to_dict(self) -> dict[str, Any]:
        """Plain form for the data report."""
        return {
            "delimiter": self.delimiter,
            "decimal": self.decimal,
            "header": self.header,
            "encoding": self.encoding,
            "line_endings": self.line_endings,
            "explicit": list(self.explicit),
        }


def _split(lines: list[str], delimiter: str) -> list[list[str]]:
    return list(csv.reader(lines, delimiter=delimiter, quotechar='"', skipinitialspace=True))


def detect_delimiter(lines: list[str]) -> str:
    """The separator that splits most of these lines into the most columns; ``csv.Sniffer`` breaks a tie."""
    sample = [line for line in lines if line.strip()][:SAMPLE_LINES]
    if not sample:
        return ","

    def score(delimiter: str) -> tuple[bool, bool, int]:
        widths = Counter(len(row) for row in _split(sample, delimiter))
        width, rows = widths.most_common(1)[0]
        return width > 1, rows >= 0.8 * len(sample), width

    scores = {d: score(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: scores[d])
    if sum(scores[d] == scores[best] for d in DELIMITERS) == 1:  # no tie: the sniffer could only agree
        return best
    try:
        sniffed = csv.Sniffer().sniff("\n".join(sample), delimiters="".join(DELIMITERS)).delimiter
    except csv.Error:
        return best
    return sniffed if scores.get(sniffed) == scores[best] else best


def parse_number(text: str, decimal: str) -> float | None:
    """A cell's number with this decimal mark (``None``: not a plain number; no thousands separators)."""
    text = text.strip()
    if decimal == "," and DECIMAL_COMMA.fullmatch(text):
        text = text.replace(",", ".")
    return float(text) if NUMBER.fullmatch(text) else None


def _detect_decimal(cells: list[str]) -> str:
    """``,`` when some cells have a decimal comma and none a decimal point, else ``.``."""
    if any(DECIMAL_POINT.fullmatch(c.strip()) for c in cells):
        return "."
    return "," if any(DECIMAL_COMMA.fullmatch(c.strip()) for c in cells) else "."


# ------------------------------------------------------------------------------------------- the table


@dataclass
class ColumnStats:
    """What one contract column held, as counts (nothing about a single row).

    ``present``: usable values; ``missing``: empty, marked missing, or a 0 the contract reads as
    missing (``zero_missing``); ``invalid``: not a number or not a level; ``out_of_range``: outside
    the valid range (not used); ``outliers``: outside the plausible range (used).
    """

    kind: str
    present: int = 0
    missing: int = 0
    zero_missing: int = 0
    invalid: int = 0
    out_of_range: int = 0
    outliers: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain form for the data report."""
        return dict(self.__dict__)


@dataclass
class Table:
    """A hospital export read against a contract.

    ``values`` has one row per data row and one column per ``contract.data_columns`` (NaN where a
    cell is missing or unreadable; a 0 the contract reads as missing stays 0 for the dataset's
    preprocessing to note); ``lines`` gives each row's line in the file.
    """

    path: Path
    contract: DataContract
    dialect: Dialect | None
    values: np.ndarray
    lines: list[int]
    problems: list[Problem]
    stats: dict[str, ColumnStats] = field(default_factory=dict)
    matched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    kept: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of ``values``' columns (the contract's data columns, in contract order)."""
        return tuple(c.name for c in self.contract.data_columns)

    @property
    def blocking(self) -> list[Problem]:
        """The problems that make the node refuse the data."""
        return [p for p in self.problems if p.blocking]

    def column(self, name: str) -> np.ndarray:
        """One column's values."""
        return self.values[:, self.columns.index(name)]

    def raise_if_blocking(self) -> Table:
        """This table, or an ``IntakeError`` listing every blocking problem."""
        if self.blocking:
            raise IntakeError(self.path, self.contract.ref, self.blocking)
        return self


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."


class _Reader:
    """One pass over an export's rows (see ``read_table``)."""

    def __init__(self, contract: DataContract, problems: _Problems) -> None:
        self.contract = contract
        self.problems = problems
        self.stats = {c.name: ColumnStats(c.kind) for c in contract.data_columns}
        self.clean: dict[tuple[str, str], float] = {}  # (column, text) -> value of a cell with no problem

    def _not_a_number_action(self, text: str, dialect: Dialect) -> str:
        if DECIMAL_COMMA.fullmatch(text) and dialect.decimal != ",":
            return "it looks like a decimal comma: export decimal points, or set csv-decimal = ',' in the node config"
        if re.fullmatch(r"[+-]?[\d.,]+", text):
            return "a number has one decimal mark and no thousands separator: correct the value"
        if any(d in text for d in DELIMITERS if d != dialect.delimiter):
            return (
                "it looks like a separator other than the file's: export with one separator, or set csv-delimiter "
                "in the node config"
            )
        return "write a number (with a decimal point), or leave the cell empty if it was not recorded"

    def cell(self, column: Column, text: str, line: int, dialect: Dialect) -> float:
        """One cell's value (NaN when missing or wrong; every problem recorded).

        A text read before in the same column without a problem counts as present again, unparsed
        (an export repeats its codes and values on most rows).
        """
        stats = self.stats[column.name]
        known = self.clean.get((column.name, text))
        if known is not None:
            stats.present += 1
            return known
        shown = _clip(text)
        if self.contract.is_missing(text):
            stats.missing += 1
            if column.kind == "label":
                self.problems.add(
                    "error", "label-missing", "is missing: every row needs its label",
                    "fill in the label, or remove the row from the export", scope="cell", column=column.name, line=line,
                )  # fmt: skip
            else:
                marker = "empty" if not text.strip() else "marked missing"
                self.problems.add(
                    "note", "missing", marker, _imputation(column), scope="cell", column=column.name, line=line,
                    example=shown if text.strip() else None,
                )  # fmt: skip
            return np.nan
        met = self.problems.added
        value = (self._numeric if column.kind == "numeric" else self._coded)(column, text, line, dialect)
        if self.problems.added == met and value == value:  # present, no problem: the same text reads the same
            self.clean[(column.name, text)] = value
        return value

    def _numeric(self, column: Column, text: str, line: int, dialect: Dialect) -> float:
        stats = self.stats[column.name]
        value = parse_number(text, dialect.decimal)
        if value is None or not np.isfinite(value):
            stats.invalid += 1
            self.problems.add(
                "error", "not-a-number", "is not a number", self._not_a_number_action(text.strip(), dialect),
                scope="cell", column=column.name, line=line, example=_clip(text),
            )  # fmt: skip
            return np.nan
        if column.zero_means_missing and value == 0:  # kept as 0: preprocessing reads it as missing
            stats.missing += 1
            stats.zero_missing += 1
            self.problems.add(
                "note", "zero-missing", "is 0, which the contract reads as not measured", _imputation(column),
                scope="cell", column=column.name, line=line,
            )  # fmt: skip
            return 0.0
        unit = f" {column.unit}" if column.unit else ""
        if column.valid is not None and not column.valid[0] <= value <= column.valid[1]:
            stats.out_of_range += 1
            low, high = (f"{b:g}" for b in column.valid)
            self.problems.add(
                "error", "out-of-range", f"is outside the valid range {low} to {high}{unit}",
                "correct the value, or leave the cell empty if it is not known", scope="cell", column=column.name,
                line=line, example=_clip(text),
            )  # fmt: skip
            return np.nan
        stats.present += 1
        if column.plausible is not None and not column.plausible[0] <= value <= column.plausible[1]:
            stats.outliers += 1
            low, high = (f"{b:g}" for b in column.plausible)
            self.problems.add(
                "warning", "outlier", f"is outside the plausible range {low} to {high}{unit}",
                "check these rows in the source system; they are used as they are", scope="cell",
                column=column.name, line=line,
            )  # fmt: skip
        return value

    def _coded(self, column: Column, text: str, line: int, dialect: Dialect) -> float:
        stats = self.stats[column.name]
        codes = column.codes
        number = parse_number(text, dialect.decimal)
        code: str | None = None
        if number is not None and np.isfinite(number) and level_code(number) in codes:
            code = level_code(number)
        elif number is None:
            meanings = Counter(m.casefold() for m in codes.values() if m)
            by_meaning = {m.casefold(): c for c, m in codes.items() if m and meanings[m.casefold()] == 1}
            code = by_meaning.get(text.strip().casefold())
            if code is not None:
                self.problems.add(
                    "note", "level-by-meaning", "given by meaning, read as its code",
                    f"read by the contract's levels: {column.levels_text()}", scope="cell", column=column.name,
                    line=line,
                )  # fmt: skip
        if code is None:
            if not codes and number is not None and np.isfinite(number):  # label values checked by the dataset
                stats.present += 1
                return number
            stats.invalid += 1
            if not codes:
                what, action = "is not a number", "write the label as a number"
            elif column.kind == "label":
                what = f"is not one of the label's values {', '.join(codes)}"
                action = "correct the label, or remove the row from the export"
            else:
                what = f"is not one of the levels {', '.join(codes)}"
                action = f"use one of {column.levels_text()}, or leave the cell empty if it is not known"
            self.problems.add(
                "error", "label-value" if column.kind == "label" else "not-a-level", what, action, scope="cell",
                column=column.name, line=line, example=_clip(text),
            )  # fmt: skip
            return np.nan
        stats.present += 1
        return float(code)


def _imputation(column: Column) -> str:
    if column.kind == "categorical":
        return "will be read as no level (all-zero one-hot)"
    return "will be imputed with the site's training median"


def read_table(
    path: str | Path,
    contract: DataContract | None,
    options: DialectOptions | None = None,
    *,
    label_column: str | None = None,
    keep: tuple[str, ...] = (),
) -> Table:
    """Read a hospital export against ``contract``, collecting every problem.

    Parameters
    ----------
    path : str | Path
        The export.
    contract : DataContract | None
        The federation's contract; ``None``: a CSV with a header whose columns are all numeric
        (``label_column``, default the last, is the label).
    options : DialectOptions | None
        What the node config sets explicitly (separator, decimal mark, header row).
    label_column : str | None
        Without a contract: the label column's name.
    keep : tuple[str, ...]
        Extra numeric columns to read and return in ``Table.kept`` (a simulation's site column).

    Raises
    ------
    DataError
        Only when the file is missing or, without a contract, has no header naming the label;
        every other problem (a binary file too) is in ``Table.problems`` (``Table.raise_if_blocking``
        turns them into one error that lists them all).
    """
    path = Path(path)
    options = options or DialectOptions()
    problems = _Problems()
    try:
        text, encoding = decode_export(path)
    except DataError as exc:
        if not path.is_file():
            raise
        what, _, action = str(exc).removeprefix(f"{path}: ").partition("; ")
        problems.add("error", "not-text", what, action)
        text, encoding = "", ""
    lines = text.splitlines()
    delimiter = options.delimiter or detect_delimiter(lines)
    rows = _rows(text, delimiter, problems)
    if not rows:
        if not problems.groups:
            problems.add(
                "error", "empty-file", "the file is empty",
                "export the site's data: one row per patient (a header row naming the columns is best)",
            )  # fmt: skip
        fallback = contract or open_contract(["value", "label"], "label")
        return Table(path, fallback, None, np.zeros((0, len(fallback.data_columns))), [], problems.sorted())
    head_line, head = rows[0]
    if contract is None:
        header: bool | None = True
        names = [n for n in (h.replace("\ufeff", "").strip() for h in head) if n]
        label = label_column or (names[-1] if names else "")
        if label not in names:
            raise DataError(f"{path}: label column {label!r} not in the header ({', '.join(names)})")
        try:
            contract = open_contract(names, label)
        except ValueError:
            raise DataError(
                f"{path}: the header row names a column twice ({', '.join(names)}); give every column its own name"
            ) from None
    elif options.header is not None:
        header = options.header
    else:
        header = _looks_like_header(head, contract, problems, head_line)
        if header is None:  # a first row that is neither a header nor data: reported, then skipped
            rows, header = rows[1:], False
    if header:
        positions = _match_header(head, contract, problems, keep)
        body, width = rows[1:], len(head)
        _unnamed(head, body, problems)
    else:
        positions = _positional(rows, contract, problems, delimiter)
        body, width = rows, len(contract.positional)
    data_positions = [positions[c.name] for c in contract.data_columns if c.name in positions]
    sample = [
        cell
        for _, cells in body[:SAMPLE_LINES]
        for p, cell in enumerate(cells)
        if p in data_positions or not data_positions
    ]
    decimal = options.decimal or _detect_decimal(sample)
    explicit = tuple(
        key for key, value in (("csv-delimiter", options.delimiter), ("csv-decimal", options.decimal),
                               ("csv-header", options.header)) if value is not None
    )  # fmt: skip
    dialect = Dialect(delimiter, decimal, bool(header), encoding, _line_endings(text), explicit)
    reader = _Reader(contract, problems)
    values, row_lines, kept = _read_rows(body, width, positions, dialect, reader, bool(header), keep)
    if data_positions and not body:
        problems.add("error", "no-rows", "the file has a header row but no data rows", "export the site's data rows")
    elif len(values) and len(data_positions) == len(contract.data_columns):
        _duplicates(values, row_lines, problems)
    return Table(
        path=path,
        contract=contract,
        dialect=dialect,
        values=values,
        lines=row_lines,
        problems=problems.sorted(),
        stats=reader.stats,
        matched=[c.name for c in contract.data_columns if c.name in positions],
        dropped=[k.removeprefix("drop:") for k in positions if k.startswith("drop:")],
        kept=kept,
    )


def _rows(text: str, delimiter: str, problems: _Problems) -> list[tuple[int, list[str]]]:
    """Every non-blank row with the line it ends on, its cells stripped."""
    rows: list[tuple[int, list[str]]] = []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quotechar='"', skipinitialspace=True)
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                rows.append((reader.line_num, [c.strip() for c in cells]))
    except csv.Error as exc:
        problems.add(
            "error", "unreadable", f"line {reader.line_num} cannot be split into cells ({exc})",
            'check that line for an unclosed quote (")',
        )  # fmt: skip
    return rows


def _unnamed(head: list[str], body: list[tuple[int, list[str]]], problems: _Problems) -> None:
    """A column without a name: ignored when empty (a trailing separator), refused when it holds values."""
    for pos, cell in enumerate(head):
        if cell.replace("\ufeff", "").strip():
            continue
        if any(pos < len(cells) and cells[pos] for _, cells in body):
            problems.add(
                "error", "unnamed-column", f"column {pos + 1} has no name in the header row but holds values; "
                "its cells were not read", "name the column as the contract does, or remove it from the export",
            )  # fmt: skip
        else:
            problems.add(
                "note", "empty-column", f"column {pos + 1} has no name and no values (a trailing separator)",
                "nothing to do: it is ignored",
            )  # fmt: skip


def _looks_like_header(head: list[str], contract: DataContract, problems: _Problems, line: int) -> bool | None:
    """``True``: the first row names contract columns; ``False``: it is data; ``None``: neither (reported)."""
    if any(contract.lookup(cell) is not None for cell in head):
        return True
    words = [c for c in head if not contract.is_missing(c) and parse_number(c, ",") is None]
    if len(words) * 2 < len(head):
        return False
    names = ", ".join(c.name for c in contract.positional)
    problems.add(
        "error", "unknown-header",
        f"line {line} looks like a header row but names none of the contract's columns",
        f"name the columns as the contract does ({names}), or set csv-header = false in the node config if "
        "the first line is data",
    )  # fmt: skip
    return None


def _match_header(
    head: list[str], contract: DataContract, problems: _Problems, keep: tuple[str, ...]
) -> dict[str, int]:
    """Contract column (``drop:NAME`` for one dropped unread, ``keep:NAME``) -> position; every mismatch reported."""
    positions: dict[str, int] = {}
    for pos, cell in enumerate(head):
        name = cell.replace("\ufeff", "").strip()
        column = contract.lookup(name)
        if name in keep:
            positions[f"keep:{name}"] = pos
        elif column is not None and column.name in positions:
            problems.add(
                "error", "duplicate-column", f"named twice in the header row (as '{name}' too)",
                "keep one of the two columns in the export", scope="column", column=column.name,
            )  # fmt: skip
        elif column is not None and column.is_data:
            positions[column.name] = pos
        elif column is not None:
            positions[f"drop:{column.name}"] = pos
            kind = "an identifier" if column.kind == "identifier" else "free text"
            problems.add(
                "note", "dropped-column", f"dropped: {kind}, never read or shown",
                "nothing to do; removing it from the export is better still", scope="column", column=name,
            )  # fmt: skip
        elif not name:
            continue  # an unnamed column: see _unnamed
        elif contract.is_ignorable(name):
            positions[f"drop:{name}"] = pos
            problems.add(
                "note", "dropped-column", "dropped: the contract marks it as ignorable, never read or shown",
                "nothing to do; removing it from the export is better still", scope="column", column=name,
            )  # fmt: skip
        else:
            problems.add(
                "error", "unknown-column",
                f"is not in the data contract {contract.ref}; its cells were not read",
                "remove it from the export (every site feeds the same columns to one shared model), or ask the "
                "coordinator's operator to add it to the contract",
                scope="column", column=name,
            )  # fmt: skip
    for column in contract.columns:
        if column.is_required and column.name not in positions and f"drop:{column.name}" not in positions:
            problems.add(
                "error", "missing-column", f"is missing from the header row ({column.describe()})",
                "add the column to the export (empty cells where a value was not recorded)"
                + (f"; other names it may have: {', '.join(column.aliases)}" if column.aliases else ""),
                scope="column", column=column.name,
            )  # fmt: skip
    return positions


def _positional(
    rows: list[tuple[int, list[str]]], contract: DataContract, problems: _Problems, delimiter: str
) -> dict[str, int]:
    """A headerless export's columns by position, when its rows have the contract's width."""
    expected = contract.positional
    widths = Counter(len(_trim(cells, len(expected))) for _, cells in rows)
    width = widths.most_common(1)[0][0] if widths else len(expected)
    if width != len(expected):
        names = ", ".join(c.name for c in expected)
        name = DELIMITER_NAMES.get(delimiter, repr(delimiter))
        problems.add(
            "error", "width",
            f"most rows have {width} {name}-separated columns, the data contract {contract.ref} has "
            f"{len(expected)} ({names})",
            "add a header row naming the columns so they are matched by name, or export exactly the contract's "
            "columns in its order",
        )  # fmt: skip
        return {}
    return {(c.name if c.is_data else f"drop:{c.name}"): i for i, c in enumerate(expected)}


def _trim(cells: list[str], width: int) -> list[str]:
    """Cells without the empty ones beyond ``width`` (a trailing separator)."""
    while len(cells) > width and not cells[-1]:
        cells = cells[:-1]
    return cells


def _read_rows(
    body: list[tuple[int, list[str]]],
    width: int,
    positions: dict[str, int],
    dialect: Dialect,
    reader: _Reader,
    header: bool,
    keep: tuple[str, ...],
) -> tuple[np.ndarray, list[int], dict[str, np.ndarray]]:
    contract = reader.contract
    columns = contract.data_columns
    values: list[list[float]] = []
    lines: list[int] = []
    kept: dict[str, list[float]] = {name: [] for name in keep}
    if not positions or not any(c.name in positions for c in columns):
        return np.zeros((0, len(columns))), [], {}
    name = DELIMITER_NAMES.get(dialect.delimiter, repr(dialect.delimiter))
    for line, raw_cells in body:
        cells = _trim(raw_cells, width)
        if len(cells) != width:
            if header:
                what = f"expected {width} columns as in the header, found {len(cells)}"
            else:
                names = ", ".join(c.name for c in contract.positional)
                what = f"expected {width} {name}-separated columns ({names}), found {len(cells)}"
            reader.problems.add(
                "error", "ragged-row", what,
                "check the row for a missing or extra separator (a separator inside a value needs quotes)",
                scope="row", line=line,
            )  # fmt: skip
            continue
        row = []
        for column in columns:
            pos = positions.get(column.name)
            row.append(np.nan if pos is None else reader.cell(column, cells[pos], line, dialect))
        for extra in keep:
            pos = positions.get(f"keep:{extra}")
            number = None if pos is None else parse_number(cells[pos], dialect.decimal)
            kept[extra].append(np.nan if number is None else number)
        values.append(row)
        lines.append(line)
    array = np.asarray(values, dtype=np.float64).reshape(len(values), len(columns))
    return array, lines, {k: np.asarray(v, dtype=np.float64) for k, v in kept.items()}


def _duplicates(values: np.ndarray, lines: list[int], problems: _Problems) -> None:
    seen: set[bytes] = set()
    for row, line in zip(np.nan_to_num(values, nan=np.inf), lines, strict=True):
        key = row.tobytes()
        if key in seen:
            problems.add(
                "warning", "duplicate-row", "the same values as an earlier row",
                "remove them if the same patient was exported twice; they are used as they are", scope="row",
                line=line,
            )  # fmt: skip
        seen.add(key)
