"""The bundled hospital data and the loaders' errors on bad files."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from flowerbed.exception import DataError
from flowerbed.experiment import DataConfig
from flowerbed.tasks.data import heart as heart_disease
from flowerbed.tasks.data.catalog import load_federation, load_node_data

from .conftest import HEART_DATA

PUBLISHED_MD5 = {
    "cleveland": "2d91a8ff69cfd9616aa47b59d6f843db",
    "hungarian": "22e96bee155b5973568101c93b3705f6",
    "switzerland": "9a87f7577310b3917730d06ba9349e20",
    "va": "4249d03ca7711e84f4444768c9426170",
}


def test_bundled_files_are_the_published_ones():
    for site, digest in PUBLISHED_MD5.items():
        data = heart_disease.bundled_path(site).read_bytes()
        assert hashlib.md5(data).hexdigest() == digest
    assert "CC BY 4.0" in (HEART_DATA / "README.md").read_text()


def test_four_sites_with_documented_sizes():
    sites = heart_disease.load_federation()
    sizes = {s.name: s.num_train + len(s.y_test) for s in sites}
    assert sizes == {"cleveland": 303, "hungarian": 294, "switzerland": 123, "va": 200}
    for site in sites:
        assert site.x_train.dtype == np.float32 and np.isfinite(site.x_train).all()
        assert site.x_train.shape[1] == heart_disease.SCHEMA.num_features
        assert set(np.unique(site.y_test)) == {0, 1}


def test_scaling_is_fitted_on_the_training_split_only():
    site = heart_disease.load_federation()[0]
    numeric = len(heart_disease.NUMERIC)
    assert np.allclose(site.x_train[:, :numeric].mean(axis=0), 0, atol=1e-5)
    assert not np.allclose(site.x_test[:, :numeric].mean(axis=0), 0, atol=1e-3)


def test_split_is_seeded_and_fixed():
    a = heart_disease.load_federation(split_seed=3)[1]
    b = heart_disease.load_federation(split_seed=3)[1]
    c = heart_disease.load_federation(split_seed=4)[1]
    assert np.array_equal(a.y_train, b.y_train) and np.array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)


def test_missing_values_are_handled_and_explained():
    switzerland = {s.name: s for s in heart_disease.load_federation()}["switzerland"]
    assert any("chol" in note and "treated as missing" in note for note in switzerland.notes)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist; set data-path"):
        load_node_data(DataConfig(), tmp_path / "absent.data", "absent")


def test_wrong_column_count_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.data"
    bad.write_text("63,1,1,145,233,1,2,150,0,2.3,3,0,6,0\n67,1,4,160,286\n")
    with pytest.raises(DataError, match=r"bad.data, line 2: expected 14 comma-separated columns"):
        heart_disease.read_raw(bad)


def test_non_numeric_value_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.data"
    bad.write_text("63,1,1,145,abc,1,2,150,0,2.3,3,0,6,0\n")
    with pytest.raises(DataError, match=r"line 1, column 'chol': 'abc' is not a number"):
        heart_disease.read_raw(bad)


def test_single_class_site_is_refused(tmp_path):
    rows = [f"{40 + i},1,1,145,233,1,2,150,0,2.3,3,0,6,0" for i in range(20)]
    one_class = tmp_path / "healthy.data"
    one_class.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="every row has label 0"):
        heart_disease.load_site(one_class, "healthy")


def test_csv_errors_name_file_and_line(tmp_path):
    path = tmp_path / "site.csv"
    path.write_text("a,b,label\n1,2,0\n3,x,1\n")
    config = DataConfig(dataset="csv")
    with pytest.raises(DataError, match=r"site.csv, line 3, column 'b': 'x' is not a number"):
        load_node_data(config, path, "site")
    path.write_text("a,b,label\n1,2,0\n3,4\n")
    with pytest.raises(DataError, match=r"line 3: expected 3 columns"):
        load_node_data(config, path, "site")


def test_partitioned_builtin_datasets_load():
    digits = load_federation(DataConfig(dataset="digits", partition={"kind": "iid", "num_clients": 5}), seed=1)
    assert len(digits) == 5 and digits[0].x_train.shape[1:] == (1, 8, 8)
    assert sum(s.num_train + len(s.y_test) for s in digits) == 1797


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"\xff\xfeage,sex\n\xe9\xe8", b""])
def test_an_unreadable_export_is_a_clear_error_naming_the_file(tmp_path, content):
    from flowerbed.client.node import check_node_data
    from flowerbed.exception import DataError

    path = tmp_path / "export.data"
    path.write_bytes(content)
    with pytest.raises(DataError, match=str(path)) as err:
        check_node_data(path, "cleveland")
    assert "Traceback" not in str(err.value)
