"""The federation's data contract: its format and fingerprint, user contracts for CSV data, the kit's
copy, the node's checks at admission and before it joins, and an honest word on a kit in use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flowerbed.client.data_report import DataCheckFailed
from flowerbed.client.local_data import resolve_site
from flowerbed.client.node import NodeSettings, check_node_data, explain_exit
from flowerbed.client.node_config import parse_node_config
from flowerbed.client.preflight import node_lock, preflight
from flowerbed.exception import ConfigError, DataError, NodeError
from flowerbed.experiment import DataConfig, Experiment
from flowerbed.kit import NodeKit
from flowerbed.tasks.data.catalog import dataset_schema, load_federation, load_node_data, resolve_contract
from flowerbed.tasks.data.contract import DataContract, load_contract, parse_contract
from flowerbed.tasks.data.heart import CONTRACT, SCHEMA

CORPUS = Path(__file__).parent / "data_intake"

SEPSIS = """
name = "sepsis-screen"
version = 1
description = "A screening table"
ignore = ["*_id"]

[[columns]]
name = "lactate"
kind = "numeric"
unit = "mmol/l"
valid = [0, 30]
plausible = [0.3, 15]

[[columns]]
name = "temp"
kind = "numeric"
unit = "degC"
valid = [25, 45]
aliases = ["temperature"]

[[columns]]
name = "ward"
kind = "categorical"
levels = { 1 = "icu", 2 = "ed", 3 = "general" }

[[columns]]
name = "sepsis"
kind = "label"
levels = { 0 = "no", 1 = "yes" }
"""


@pytest.fixture
def sepsis(tmp_path: Path) -> DataContract:
    path = tmp_path / "sepsis.toml"
    path.write_text(SEPSIS)
    return load_contract(path)


def _sepsis_csv(path: Path, rows: int = 80, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = ["patient_id;Temperature;ward;sepsis;lactate"]  # another order, a name alias, an ignorable id
    for i in range(rows):
        label = int(rng.random() < 0.4)
        lactate = f"{rng.uniform(0.5, 4) + 2 * label:.1f}".replace(".", ",")
        temp = f"{rng.normal(37.5 + label, 0.6):.1f}".replace(".", ",")
        lines.append(f"P{i:04d};{temp};{1 + i % 3};{label};{lactate}")
    path.write_text("\r\n".join(lines) + "\r\n")
    return path


def test_the_heart_contract_names_every_uci_column() -> None:
    assert [c.name for c in CONTRACT.data_columns] == [
        "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak", "slope", "ca",
        "thal", "num",
    ]  # fmt: skip
    assert CONTRACT.schema(2) == SCHEMA  # the model's input follows from the contract
    chol = CONTRACT.lookup("Serum Cholesterol")
    assert chol is not None and chol.unit == "mg/dl" and chol.zero_means_missing and chol.plausible == (100, 600)
    assert CONTRACT.lookup("CP").levels_text().startswith("1 (typical angina), 2 (atypical angina)")
    assert CONTRACT.label.name == "num" and list(CONTRACT.label.codes) == ["0", "1", "2", "3", "4"]
    assert [c.kind for c in CONTRACT.columns if not c.is_data] == ["identifier", "identifier", "text"]
    assert len(CONTRACT.fingerprint) == 12 and CONTRACT.ref == f"heart-disease v1 ({CONTRACT.fingerprint})"


def test_the_fingerprint_covers_what_reads_a_row_and_nothing_else() -> None:
    data = CONTRACT.model_dump(mode="json")
    reworded = {**data, "description": "another text", "columns": [{**c, "description": "x"} for c in data["columns"]]}
    assert parse_contract(reworded, "t").fingerprint == CONTRACT.fingerprint
    assert parse_contract({**data, "version": 2}, "t").fingerprint != CONTRACT.fingerprint
    narrower = json.loads(json.dumps(data))
    narrower["columns"][0]["valid"] = [0, 110]
    assert parse_contract(narrower, "t").fingerprint != CONTRACT.fingerprint
    assert parse_contract(json.loads(CONTRACT.to_json()), "kit").fingerprint == CONTRACT.fingerprint


def test_a_bad_contract_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        'name = "Bad Name"\nversion = 0\n[[columns]]\nname = "ward"\nkind = "categorical"\n'
        '[[columns]]\nname = "x"\nkind = "numeric"\nvalid = [5, 1]\n'
    )
    with pytest.raises(ConfigError) as err:
        load_contract(path)
    text = str(err.value)
    assert "name:" in text and "version:" in text and "needs levels" in text and "low > high" in text
    with pytest.raises(ConfigError, match="exactly one label"):
        parse_contract({"name": "x", "version": 1, "columns": [{"name": "a", "kind": "numeric"}]}, "t")
    with pytest.raises(ConfigError, match="not found"):
        load_contract(tmp_path / "absent.json")


def test_a_user_contract_reads_a_csv_by_name_in_any_dialect(sepsis: DataContract, tmp_path: Path) -> None:
    data = DataConfig(dataset="csv", contract=sepsis.model_dump(mode="json"), num_classes=2)
    site = load_node_data(data, _sepsis_csv(tmp_path / "site.csv"), "geneva")
    assert site.schema == sepsis.schema(2) == dataset_schema(data)
    assert site.schema.feature_names == ("lactate", "temp", "ward=1", "ward=2", "ward=3")
    assert np.allclose(site.x_train[:, :2].mean(axis=0), 0, atol=1e-5)  # scaled on the training split
    assert set(np.unique(site.x_train[:, 2:].sum(axis=1))) == {1.0}  # one level each
    assert resolve_contract(data) == sepsis


def test_a_user_contract_refuses_what_it_does_not_know(sepsis: DataContract, tmp_path: Path) -> None:
    path = _sepsis_csv(tmp_path / "site.csv")
    path.write_text(path.read_text().replace("ward;sepsis", "ward;outcome").replace("\nP0003;", "\nP0003;99,0;"))
    data = DataConfig(dataset="csv", contract=sepsis.model_dump(mode="json"), num_classes=2)
    with pytest.raises(DataError) as err:
        load_node_data(data, path, "geneva")
    text = str(err.value)
    assert "column 'outcome': is not in the data contract sepsis-screen v1" in text
    assert "column 'sepsis': is missing from the header row" in text
    assert "line 5: expected 5 columns as in the header, found 6" in text


def test_a_simulation_reads_a_pooled_csv_against_its_contract(sepsis: DataContract, tmp_path: Path) -> None:
    pooled = _sepsis_csv(tmp_path / "pooled.csv", rows=120)
    pooled.write_text(pooled.read_text().replace("patient_id;", "hospital;"))
    text = "\r\n".join(f"{i % 2 + 1}{line[line.index(';') :]}" if i else line for i, line in enumerate(
        pooled.read_text().splitlines()))  # fmt: skip
    pooled.write_text(text + "\r\n")
    data = DataConfig(dataset="csv", path=str(pooled), contract=sepsis.model_dump(mode="json"), site_column="hospital")
    sites = load_federation(data, seed=0)
    assert [s.name for s in sites] == ["site-1", "site-2"] and all(s.schema == sepsis.schema(2) for s in sites)
    unsplit = DataConfig(
        dataset="csv", path=str(_sepsis_csv(tmp_path / "all.csv", rows=150)), contract=sepsis.model_dump(mode="json"),
        partition={"kind": "iid", "num_clients": 3},
    )  # fmt: skip
    clients = load_federation(unsplit, seed=0)
    assert len(clients) == 3 and all(c.x_train.shape[1] == 5 for c in clients)


def test_an_experiment_names_a_built_in_contract_or_gives_its_own(sepsis: DataContract) -> None:
    assert resolve_contract(DataConfig()) == CONTRACT == resolve_contract(DataConfig(contract="heart-disease"))
    assert resolve_contract(DataConfig(dataset="csv")) is None
    with pytest.raises(ConfigError, match="not a built-in contract"):
        resolve_contract(DataConfig(contract="diabetes"))
    with pytest.raises(ConfigError, match="reads its files as heart-disease v1"):
        resolve_contract(DataConfig(contract=sepsis.model_dump(mode="json")))
    with pytest.raises(ConfigError, match="has 2 values, but data.num_classes = 3"):
        resolve_contract(DataConfig(dataset="csv", num_classes=3, contract=sepsis.model_dump(mode="json")))


def test_a_node_holding_the_kits_contract_refuses_a_run_with_another(sepsis: DataContract, tmp_path: Path) -> None:
    kit_contract = tmp_path / "contract.json"
    kit_contract.write_text(CONTRACT.to_json())
    data_path = str(CORPUS / "header.csv")
    config = parse_node_config({"data-path": data_path, "site": "cleveland", "data-contract": str(kit_contract)})
    assert resolve_site(config, Experiment()).num_train == 36
    other = Experiment.model_validate(
        {"data": {"dataset": "csv", "contract": sepsis.model_dump(mode="json"), "num_classes": 2}}
    )
    with pytest.raises(DataError, match=r"the run's data contract is sepsis-screen v1 .* this node holds heart-dis"):
        resolve_site(config, other)
    with pytest.raises(DataError, match="the run declares none"):
        resolve_site(config, Experiment.model_validate({"data": {"dataset": "csv"}}))
    with pytest.raises(DataCheckFailed) as failed:  # node check says so too, with everything else it found
        check_node_data(data_path, "cleveland", Experiment(), contract=sepsis)
    assert "contract-mismatch" in {p.code for p in failed.value.report.blocking}


def test_the_kit_carries_the_federations_contract(tmp_path: Path) -> None:
    from flowerbed.kit import load_kit
    from flowerbed.server.federation_config import load_federation as load_federation_file
    from flowerbed.server.provisioning import provision

    (tmp_path / "sepsis.toml").write_text(SEPSIS)
    for contract, expected in (('"heart-disease"', CONTRACT.fingerprint), ('"sepsis.toml"', None)):
        path = tmp_path / "federation.toml"
        path.write_text(
            f'name = "f"\noutput = "out"\ncontract = {contract}\n[coordinator]\naddress = "fl.example.org:9093"\n'
            '[[sites]]\nname = "geneva"\n'
        )
        provision(load_federation_file(path))
        kit = load_kit(tmp_path / "out" / "kits" / "geneva")
        assert kit.contract == kit.folder / "contract.json"
        held = load_contract(kit.contract)
        assert held.fingerprint == (expected or load_contract(tmp_path / "sepsis.toml").fingerprint)


def _settings(tmp_path: Path, data: Path, kit: NodeKit | None = None) -> NodeSettings:
    return NodeSettings("cleveland", "127.0.0.1:9", data, tmp_path / "state", kit=kit, insecure=kit is None)


def test_preflight_keeps_a_node_with_bad_data_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(NodeError) as err:
        preflight(_settings(tmp_path, CORPUS / "messy_export.csv"))
    text = str(err.value)
    assert "did not pass the pre-flight check, so the node does not join" in text and "5 blocking problems" in text
    assert str(tmp_path / "state" / "data-report.md") in text
    assert "1 row: 'age' is outside the valid range 0 to 120 years" in text
    check = preflight(_settings(tmp_path, CORPUS / "excel_semicolon_decimal_comma.csv"))
    assert check.num_train == 36
    assert f"fits {CONTRACT.ref}: 48 rows (36 training, 12 test)" in capsys.readouterr().out


def test_preflight_reads_the_kits_contract(sepsis: DataContract, tmp_path: Path) -> None:
    kit = _kit(tmp_path)
    (kit.folder / "contract.json").write_text(sepsis.to_json())
    kit = NodeKit(**{**kit.__dict__, "contract": kit.folder / "contract.json"})
    check = preflight(_settings(tmp_path, _sepsis_csv(tmp_path / "site.csv"), kit))
    assert check.dataset == "csv" and check.report.table.contract == sepsis
    with pytest.raises(NodeError, match="names none of the contract's columns"):
        preflight(_settings(tmp_path, CORPUS / "header.csv", kit))


def _kit(tmp_path: Path) -> NodeKit:
    folder = tmp_path / "kit"
    folder.mkdir(exist_ok=True)
    (folder / "kit.toml").write_text('site = "cleveland"\n')
    return NodeKit(folder, "cleveland", "f", "127.0.0.1:9", folder / "ca.pem", folder / "node.key")


def test_a_kit_already_in_use_is_reported_as_such(tmp_path: Path) -> None:
    settings = _settings(tmp_path, CORPUS / "header.csv", _kit(tmp_path))
    with node_lock(settings):
        other_state = NodeSettings(**{**settings.__dict__, "state_dir": tmp_path / "elsewhere"})
        in_use = r"the kit .* is already in use by a node running on this machine \(process \d+\)"
        with pytest.raises(NodeError, match=in_use), node_lock(other_state):
            pass
        same_state = NodeSettings(**{**settings.__dict__, "kit": None})
        with pytest.raises(NodeError, match="state folder .* is already in use"), node_lock(same_state):
            pass
    with node_lock(settings):  # released when the node stops
        pass
    refused = explain_exit("[code: 2004] Failed to activate SuperNode.", settings)
    assert "a node with this kit is already connected" in refused and "key is not registered" in refused
