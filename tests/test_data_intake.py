"""Hospital exports as they come: the corpus in tests/data_intake, read against the heart-disease contract.

Every file is accepted with the right parse or refused with every problem listed at once; no
identifier or free-text value ever appears in any output; columns in another order are read by
name and train the same model.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flowerbed.client.data_report import DataCheckFailed
from flowerbed.client.local_data import resolve_site
from flowerbed.client.node import check_node_data
from flowerbed.client.node_config import parse_node_config
from flowerbed.client.training import train_local
from flowerbed.exception import DataError
from flowerbed.experiment import DataConfig, Experiment
from flowerbed.tasks import resolve_task
from flowerbed.tasks.data.catalog import load_node_data
from flowerbed.tasks.data.heart import CONTRACT
from flowerbed.tasks.data.intake import DialectOptions, IntakeError, read_table

CORPUS = Path(__file__).parent / "data_intake"
EXPECTED = tomllib.loads((CORPUS / "expected.toml").read_text())
FILES = EXPECTED["files"]
SECRETS = EXPECTED["secrets"]


def _codes(problems, severity: str) -> list[str]:
    return sorted(f"{p.code}:{p.column}" if p.column else p.code for p in problems if p.severity == severity)


def _reference() -> np.ndarray:
    return read_table(CORPUS / EXPECTED["reference"], CONTRACT).values


def test_the_corpus_is_listed_whole() -> None:
    on_disk = {p.name for p in CORPUS.iterdir() if p.name not in ("expected.toml", "README.md")}
    assert on_disk == set(FILES) and len(on_disk) >= 20
    assert {spec["outcome"] for spec in FILES.values()} == {"accepted", "refused"}


@pytest.mark.parametrize("name", sorted(name for name, spec in FILES.items() if spec["outcome"] == "accepted"))
def test_accepted_exports_are_read_right(name: str, tmp_path: Path) -> None:
    spec = FILES[name]
    check = check_node_data(CORPUS / name, "cleveland", report_dir=tmp_path)
    report = check.report
    assert report is not None and not report.blocking and report.verdict == "ok"
    dialect = report.table.dialect.to_dict()
    for key, value in spec.get("dialect", {}).items():
        assert dialect[key] == value, (name, key)
    if spec.get("same"):
        assert np.array_equal(report.table.values, _reference(), equal_nan=True)
    for column, count in spec.get("missing", {}).items():
        assert int(np.isnan(report.table.column(column)).sum()) == count == report.table.stats[column].missing
    assert _codes(report.problems, "warning") == sorted(spec.get("warnings", []))
    assert _codes(report.problems, "note") == sorted(spec.get("notes", []))
    assert check.num_train + check.num_test == report.rows and check.num_test >= 10
    assert {p.name for p in tmp_path.iterdir()} == {"data-report.md", "data-report.json"}


@pytest.mark.parametrize("name", sorted(name for name, spec in FILES.items() if spec["outcome"] == "refused"))
def test_refused_exports_list_every_problem_at_once(name: str, tmp_path: Path) -> None:
    spec = FILES[name]
    with pytest.raises(DataCheckFailed) as failed:
        check_node_data(CORPUS / name, "cleveland", report_dir=tmp_path)
    report = failed.value.report
    assert _codes(report.blocking, "error") == sorted(spec["errors"])
    if "warnings" in spec:
        assert _codes(report.problems, "warning") == sorted(spec["warnings"])
    if "notes" in spec:
        assert _codes(report.problems, "note") == sorted(spec["notes"])
    for key, value in spec.get("dialect", {}).items():
        assert report.table.dialect.to_dict()[key] == value, (name, key)
    message = str(failed.value)
    assert str(CORPUS / name) in message and f"{len(report.blocking)} blocking problem" in message
    for problem in report.blocking:  # each with its file, line(s), column and what to do
        assert problem.describe(CORPUS / name) in message
        if problem.lines:
            assert f"line {problem.lines[0]}" in message or f"lines {problem.lines[0]}" in message
        if problem.column:
            assert f"'{problem.column}'" in message
        assert problem.action
    written = json.loads((tmp_path / "data-report.json").read_text())
    assert written["verdict"] == "refused" and written["counts"]["errors"] == len(report.blocking)
    markdown = (tmp_path / "data-report.md").read_text()
    assert all(p.headline().replace("|", "\\|") in markdown for p in report.problems)
    assert str(tmp_path / "data-report.md") in message


def test_a_messy_export_gives_one_error_with_every_problem() -> None:
    path = CORPUS / "messy_export.csv"
    with pytest.raises(IntakeError) as err:
        read_table(path, CONTRACT).raise_if_blocking()
    message = str(err.value)
    assert f"{path}, line 11, column 'age': '250' is outside the valid range 0 to 120 years" in message
    assert f"{path}, line 16, column 'num': '7' is not one of the label's values 0, 1, 2, 3, 4" in message
    assert f"{path}, line 23, column 'oldpeak': '1,4,2' is not a number" in message
    assert f"{path}, line 28, column 'cp': '5' is not one of the levels 1, 2, 3, 4" in message
    assert f"{path}, column 'bmi': is not in the data contract {CONTRACT.ref}" in message
    assert "5 blocking problems" in message


def test_missing_values_are_counted_and_say_what_happens() -> None:
    table = read_table(CORPUS / "empty_cells.csv", CONTRACT)
    chol = next(p for p in table.problems if p.code == "missing" and p.column == "chol")
    assert chol.headline() == "5 rows: 'chol' empty"
    assert chol.action == "will be imputed with the site's training median"
    thal = next(p for p in table.problems if p.code == "missing" and p.column == "thal")
    assert thal.action == "will be read as no level (all-zero one-hot)"


def test_a_repeated_value_is_reported_on_every_line_and_counted_every_time(tmp_path: Path) -> None:
    header = "age,sex,cp,trestbps,chol,fbs,restecg,thalach,exang,oldpeak,slope,ca,thal,num"
    rows = [
        "63,1,1,145,233,1,2,150,0,2.3,3,0,6,0",
        "63,1,1,0,233,1,2,150,0,2.3,3,0,6,0",  # trestbps 0: read as not measured
        "90,1,1,145,233,1,2,150,0,2.3,3,0,6,1",
        "63,1,1,0,233,1,2,150,0,2.3,3,0,6,0",
        "63,1,1,145,700,1,2,150,0,2.3,3,0,6,1",  # chol 700: an outlier, used
        "63,1,1,145,700,1,2,150,0,2.3,3,0,6,0",
    ]
    path = tmp_path / "repeats.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    table = read_table(path, CONTRACT)
    by_code = {(p.code, p.column): p for p in table.problems}
    assert by_code[("zero-missing", "trestbps")].lines == [3, 5]
    assert by_code[("outlier", "chol")].lines == [6, 7]
    assert table.stats["trestbps"].present == 4 and table.stats["trestbps"].missing == 2
    assert table.stats["chol"].present == 6 and table.stats["chol"].outliers == 2
    assert table.stats["age"].present == 6 and table.stats["num"].present == 6
    assert table.values[:, 0].tolist() == [63, 63, 90, 63, 63, 63]


def test_the_csv_sniffer_is_asked_only_to_break_a_tie(monkeypatch) -> None:
    import csv

    from flowerbed.tasks.data import intake

    asked = []

    class Sniffer(csv.Sniffer):
        def sniff(self, sample: str, delimiters: str | None = None) -> type[csv.Dialect]:
            asked.append(sample)
            return super().sniff(sample, delimiters)

    monkeypatch.setattr(csv, "Sniffer", Sniffer)
    assert intake.detect_delimiter(["63;1;145", "67;1;160", "41;0;130"]) == ";"
    assert not asked  # one separator splits the lines best: nothing to break
    assert intake.detect_delimiter(["1,2;3", "4,5;6"]) in (",", ";")
    assert len(asked) == 1  # ',' and ';' split every line in two: the sniffer decides


def test_the_dialect_can_be_set_in_the_node_config(tmp_path: Path) -> None:
    path = CORPUS / "excel_semicolon_decimal_comma.csv"
    config = {"csv-delimiter": ";", "csv-decimal": ",", "csv-header": True}
    check = check_node_data(path, "cleveland", node_config=config)
    assert check.report.table.dialect.explicit == ("csv-delimiter", "csv-decimal", "csv-header")
    assert "set in the node config" in check.report.table.dialect.describe()
    with pytest.raises(DataCheckFailed) as failed:  # a wrong setting: every decimal comma is named
        check_node_data(path, "cleveland", node_config={"csv-decimal": "."})
    problem = next(p for p in failed.value.report.blocking if p.column == "oldpeak")
    assert problem.code == "not-a-number" and "csv-decimal = ','" in problem.action
    tab = read_table(CORPUS / "tabs.tsv", CONTRACT, DialectOptions(delimiter="\t", header=True))
    assert not tab.blocking and np.array_equal(tab.values, _reference(), equal_nan=True)
    assert parse_node_config({"csv-delimiter": "tab"}).csv_delimiter == "\t"


def test_reordered_columns_give_the_same_trained_model() -> None:
    data = DataConfig()
    original = load_node_data(data, CORPUS / "uci_original.data", "cleveland")
    reordered = load_node_data(data, CORPUS / "reordered.csv", "cleveland")
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(original, field), getattr(reordered, field))
    task = resolve_task("tabular-mlp")
    weights = []
    for site in (original, reordered):
        model = task.build_model(site.schema, seed=7)
        train_local(model, task, site.x_train, site.y_train, Experiment().train, seed=3, device=torch.device("cpu"))
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _cli():
    """The ``flowerbed`` app with its commands (registered once per process)."""
    from flowerbed.cli import _register, app

    if not app.registered_groups:
        _register()
    return app


def _outputs(name: str, tmp_path: Path) -> str:
    """Everything a check of this file prints or writes, and the reason a node would send."""
    app = _cli()
    state = tmp_path / name
    result = CliRunner().invoke(
        app, ["node", "check", "--data", str(CORPUS / name), "--site", "cleveland", "--state", str(state),
              "--write-shareable"],
    )  # fmt: skip
    texts = [result.output, str(result.exception or "")]
    texts += [p.read_text() for p in state.glob("*")] if state.exists() else []
    config = parse_node_config({"data-path": str(CORPUS / name), "site": "cleveland"})
    try:
        resolve_site(config, Experiment())
    except DataError as exc:
        texts.append(str(exc))
    try:
        read_table(CORPUS / name, CONTRACT).raise_if_blocking()
    except DataError as exc:
        texts.append(str(exc))
    return "\n".join(texts)


def test_no_identifier_or_free_text_value_appears_in_any_output(tmp_path: Path) -> None:
    shown = ""
    for name in sorted(FILES):
        output = _outputs(name, tmp_path)
        leaked = [secret for secret in SECRETS if secret.casefold() in output.casefold()]
        assert not leaked, (name, leaked)
        shown += output
    assert "dropped: an identifier, never read or shown" in shown  # the checks did run


def test_a_node_refusal_names_no_row_line_or_value() -> None:
    config = parse_node_config({"data-path": str(CORPUS / "messy_export.csv"), "site": "cleveland"})
    with pytest.raises(DataError) as err:
        resolve_site(config, Experiment())
    reason = str(err.value)
    assert CONTRACT.ref in reason and "5 blocking problems" in reason and "flowerbed node check" in reason
    assert "line" not in reason and "'250'" not in reason and "age" not in reason


def test_node_check_exits_non_zero_and_writes_the_report_beside_the_ledger(tmp_path: Path) -> None:
    app = _cli()
    ledger = tmp_path / "var" / "ledger.db"
    args = ["node", "check", "--site", "cleveland", "--ledger", str(ledger)]
    bad = CliRunner().invoke(app, [*args, "--data", str(CORPUS / "messy_export.csv")])
    assert bad.exit_code == 1, bad.output
    assert "refused" in bad.output and "5 blocking problems" in bad.output
    assert "semicolon-separated, decimal comma, header row, CRLF line endings" in bad.output
    assert "4 rows: 'chol' empty" in bad.output and "will be imputed with the site's training median" in bad.output
    assert (ledger.parent / "data-report.md").exists() and (ledger.parent / "data-report.json").exists()
    good = CliRunner().invoke(app, [*args, "--data", str(CORPUS / "header.csv"), "--write-shareable"])
    assert good.exit_code == 0, good.output
    assert "ok" in good.output and "nothing was sent anywhere" in good.output
    shared = json.loads((ledger.parent / "data-report.shareable.json").read_text())
    assert shared["rows"] == 48 and "lines" not in json.dumps(shared) and "labels" not in shared
    assert set(shared["columns"]["chol"]) == {"missing", "invalid", "out_of_range", "outliers"}
