"""The federation's data contract: every column a site's export has, its type, and what it may hold.

A contract is what every site agrees to before a single step is trained: each column's name (and
the other names exports give it), its kind, its unit and ranges or its levels, and which extra
columns a site may leave in its export (identifiers, free text) because the node drops them
unread. It is versioned and has a short fingerprint, so a node can tell whether the run it is asked
to join reads its data the way its start-up kit says the federation does.

Column kinds:

| kind | a cell holds | checked against |
|---|---|---|
| ``numeric`` | a number (unit in ``unit``) | ``valid`` (outside: refused) and ``plausible`` (outside: reported) |
| ``binary`` | 0 or 1 (or a meaning from ``levels``) | ``levels`` (default ``0``: no, ``1``: yes) |
| ``categorical`` | one of ``levels`` (a code, or its meaning) | ``levels`` |
| ``label`` | the value the model learns to predict | ``levels`` (its values) |
| ``identifier`` | a patient identifier (record number, name) | never read: dropped, its values never shown |
| ``text`` | free text (notes) | never read: dropped, its values never shown |

A contract file is TOML or JSON with the same keys (see ``DataContract``), e.g.::

    name = "heart-disease"
    version = 1
    ignore = ["*_id", "*name*"]

    [[columns]]
    name = "age"
    kind = "numeric"
    unit = "years"
    valid = [0, 120]
    plausible = [18, 100]

    [[columns]]
    name = "cp"
    kind = "categorical"
    levels = { 1 = "typical angina", 2 = "atypical angina", 3 = "non-anginal pain", 4 = "asymptomatic" }

The fingerprint is the first 12 hex digits of the SHA-256 of the contract's canonical JSON without
its descriptions: it changes with anything that changes how a row is read, and only then.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flowerbed.exception import ConfigError
from flowerbed.tasks.task import DataSchema

ColumnKind = Literal["numeric", "binary", "categorical", "label", "identifier", "text"]

#: Kinds whose cells the node reads (and may quote in a problem); the others are dropped unread.
DATA_KINDS = ("numeric", "binary", "categorical", "label")
#: Cell contents that mean "not recorded", compared without case.
DEFAULT_MISSING = ("", "?", "NA", "N/A", "NaN", "NULL", "None", ".", "-")
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def normalize_name(name: str) -> str:
    """A column name as it is matched: no case, no surrounding space or BOM, no spaces, '_' or '-'."""
    return re.sub(r"[\s_\-]+", "", name.replace("\ufeff", "").strip().casefold())


@functools.lru_cache(maxsize=32)
def _folded(markers: tuple[str, ...]) -> frozenset[str]:
    """The missing markers without case (a contract's are read for every cell of an export)."""
    return frozenset(m.casefold() for m in markers)


def level_code(value: float | str) -> str:
    """A level's canonical text: ``1``, ``1.0`` and ``"1"`` are all ``"1"``; ``0.5`` stays ``"0.5"``."""
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


class Column(BaseModel):
    """One column of a site's export.

    Parameters
    ----------
    name : str
        The column's name in the contract (and in a header row).
    kind : {"numeric", "binary", "categorical", "label", "identifier", "text"}
        What a cell holds (see the module's table).
    description : str
        What the column means (not part of the fingerprint).
    unit : str
        A numeric column's unit.
    valid : (low, high) | None
        A numeric value outside this range cannot be right: the row is refused.
    plausible : (low, high) | None
        A numeric value outside this range is unusual: it is reported as an outlier and used.
    levels : dict[str, str]
        Codes and their meanings (binary, categorical, label); a cell may hold either.
    zero_means_missing : bool
        A numeric 0 means "not measured" (read as missing).
    aliases : tuple[str, ...]
        Other names exports give the column.
    required : bool | None
        Must be in every export (default: yes for data columns, no for identifiers and text).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    kind: ColumnKind
    description: str = ""
    unit: str = ""
    valid: tuple[float, float] | None = None
    plausible: tuple[float, float] | None = None
    levels: dict[str, str] = Field(default_factory=dict)
    zero_means_missing: bool = False
    aliases: tuple[str, ...] = ()
    required: bool | None = None

    @field_validator("levels", mode="before")
    @classmethod
    def _codes(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        levels = {}
        for code, meaning in value.items():
            try:
                levels[level_code(code)] = str(meaning)
            except (TypeError, ValueError):
                raise ValueError(f"level {code!r} is not a number (levels map numeric codes to meanings)") from None
        return levels

    @model_validator(mode="after")
    def _fits_kind(self) -> Column:
        numeric = self.kind == "numeric"
        if not numeric and (self.valid or self.plausible or self.unit or self.zero_means_missing):
            raise ValueError(f"column {self.name!r}: unit, valid, plausible and zero_means_missing are for numeric")
        for bounds in (self.valid, self.plausible):
            if bounds is not None and bounds[0] > bounds[1]:
                raise ValueError(f"column {self.name!r}: range {list(bounds)} has low > high")
        if self.kind == "categorical" and not self.levels:
            raise ValueError(f"column {self.name!r}: a categorical column needs levels, e.g. {{1 = 'normal'}}")
        if self.kind == "binary" and self.levels and set(self.levels) != {"0", "1"}:
            raise ValueError(f"column {self.name!r}: a binary column's levels are 0 and 1")
        if self.kind in ("numeric", "identifier", "text") and self.levels:
            raise ValueError(f"column {self.name!r}: levels are for binary, categorical and label columns")
        return self

    @property
    def is_data(self) -> bool:
        """Whether the node reads this column's cells (numeric, binary, categorical, label)."""
        return self.kind in DATA_KINDS

    @property
    def is_required(self) -> bool:
        """Whether every export must have this column."""
        return self.is_data if self.required is None else self.required

    @property
    def codes(self) -> dict[str, str]:
        """The levels a cell may hold (a binary column without levels: 0 = no, 1 = yes)."""
        if self.kind == "binary" and not self.levels:
            return {"0": "no", "1": "yes"}
        return dict(self.levels)

    def describe(self) -> str:
        """``serum cholesterol, mg/dl`` or just the name."""
        parts = [p for p in (self.description, self.unit) if p]
        return ", ".join(parts) if parts else self.name

    def levels_text(self) -> str:
        """``1 (typical angina), 2 (atypical angina)``: the codes a cell may hold."""
        return ", ".join(f"{code} ({meaning})" if meaning else code for code, meaning in self.codes.items())


class DataContract(BaseModel):
    """What every site's export holds: its columns, and what may be dropped.

    Parameters
    ----------
    name : str
        The contract's name (lower case letters, digits, '.', '_', '-').
    version : int
        Raised whenever a column, a range or a level changes.
    description : str
        What the data is (not part of the fingerprint).
    columns : tuple[Column, ...]
        In the order a headerless export lists them; exactly one ``label``.
    ignore : tuple[str, ...]
        Shell-style patterns of extra columns a site may leave in its export (identifiers, free
        text); they are dropped unread. Any other extra column is refused.
    missing_markers : tuple[str, ...]
        Cell contents read as missing (without case).
    min_train_rows, min_test_rows : int
        Fewest rows a site may train and report on (a node's ``min-test-rows`` may ask for more).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: int = Field(ge=1)
    description: str = ""
    columns: tuple[Column, ...]
    ignore: tuple[str, ...] = ()
    missing_markers: tuple[str, ...] = DEFAULT_MISSING
    min_train_rows: int = Field(default=20, ge=1)
    min_test_rows: int = Field(default=10, ge=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.fullmatch(value):
            raise ValueError("use lower case letters, digits, '.', '_' and '-' (at most 64), e.g. 'heart-disease'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DataContract:
        seen: dict[str, str] = {}
        for column in self.columns:
            for name in (column.name, *column.aliases):
                key = normalize_name(name)
                if key in seen and seen[key] != column.name:
                    raise ValueError(f"{name!r} names both {seen[key]!r} and {column.name!r}")
                seen[key] = column.name
        if len({c.name for c in self.columns}) != len(self.columns):
            raise ValueError("column names must be unique")
        labels = [c.name for c in self.columns if c.kind == "label"]
        if len(labels) != 1:
            raise ValueError(f"a contract has exactly one label column (found {len(labels)}: {', '.join(labels)})")
        if not self.features:
            raise ValueError("a contract needs at least one numeric, binary or categorical column")
        return self

    # --------------------------------------------------------------------------- lookups

    @property
    def label(self) -> Column:
        """The label column."""
        return next(c for c in self.columns if c.kind == "label")

    @property
    def data_columns(self) -> tuple[Column, ...]:
        """The columns the node reads, in contract order (features and the label)."""
        return tuple(c for c in self.columns if c.is_data)

    @property
    def features(self) -> tuple[Column, ...]:
        """The model's input columns, in contract order."""
        return tuple(c for c in self.columns if c.is_data and c.kind != "label")

    @property
    def positional(self) -> tuple[Column, ...]:
        """The columns of a headerless export, in order: every required column."""
        return tuple(c for c in self.columns if c.is_required)

    def lookup(self, header: str) -> Column | None:
        """The column a header cell names (by name or alias, without case, spaces, '_' or '-')."""
        key = normalize_name(header)
        for column in self.columns:
            if key in {normalize_name(n) for n in (column.name, *column.aliases)}:
                return column
        return None

    def is_ignorable(self, header: str) -> bool:
        """Whether an extra column may be dropped (it matches one of ``ignore``)."""
        name = header.replace("\ufeff", "").strip().casefold()
        return any(fnmatch.fnmatchcase(name, pattern.casefold()) for pattern in self.ignore)

    def is_missing(self, cell: str) -> bool:
        """Whether a cell's content means "not recorded"."""
        return cell.strip().casefold() in _folded(self.missing_markers)

    # --------------------------------------------------------------------------- identity

    def canonical(self) -> dict[str, Any]:
        """The contract without its descriptions: what the fingerprint covers."""
        data = self.model_dump(mode="json")
        data.pop("description", None)
        for column in data["columns"]:
            column.pop("description", None)
        return data

    @property
    def fingerprint(self) -> str:
        """First 12 hex digits of the SHA-256 of the canonical JSON (descriptions left out)."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def __hash__(self) -> int:
        return hash((self.fingerprint, self.description))

    @property
    def ref(self) -> str:
        """``heart-disease v1 (3f9a1c0e2b4d)``: how messages and reports name the contract."""
        return f"{self.name} v{self.version} ({self.fingerprint})"

    def to_json(self) -> str:
        """The contract as JSON (what a start-up kit's ``contract.json`` holds)."""
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    def schema(self, num_classes: int | None = None) -> DataSchema:
        """The model's input: numeric and binary columns, then one value per categorical level."""
        plain = tuple(c.name for c in self.features if c.kind != "categorical")
        onehot = tuple(f"{c.name}={code}" for c in self.features if c.kind == "categorical" for code in c.codes)
        classes = num_classes if num_classes is not None else len(self.label.codes)
        return DataSchema("tabular", (len(plain) + len(onehot),), classes, plain + onehot)


def open_contract(header: list[str], label: str) -> DataContract:
    """The contract of a CSV the federation declared none for: every column numeric, ``label`` the label."""
    columns = [Column(name=h, kind="label" if h == label else "numeric") for h in header]
    return DataContract(name="undeclared", version=1, columns=tuple(columns))


def _problems(exc: ValidationError) -> list[str]:
    out = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        out.append(f"{where}: {message}" if where else message)
    return out


def parse_contract(value: dict[str, Any], source: str) -> DataContract:
    """Validate a contract given as a mapping (a TOML table, JSON object).

    Raises
    ------
    ConfigError
        Naming ``source`` and every bad key.
    """
    try:
        return DataContract.model_validate(value)
    except ValidationError as exc:
        raise ConfigError(source, _problems(exc)) from None


def load_contract(path: str | Path) -> DataContract:
    """Read a contract file (``.toml`` or ``.json``).

    Raises
    ------
    ConfigError
        The file is missing, not TOML/JSON, or not a valid contract (every problem listed).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(str(path), ["data contract not found; use the contract.json from the start-up kit"])
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), [f"not a valid {path.suffix.lstrip('.') or 'TOML'} file: {exc}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["a data contract is an object with name, version and columns"])
    return parse_contract(data, str(path))
