"""The experiment file: every problem is reported with its key, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowerbed.exception import ConfigError
from flowerbed.experiment import load_experiment, parse_experiment
from flowerbed.strategies.registry import build_strategy

from .conftest import HEART_TOML


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_bundled_heart_experiment_is_valid():
    experiment = load_experiment(HEART_TOML)
    assert experiment.data.dataset == "heart-disease"
    assert experiment.rounds >= 10
    assert experiment.strategy.name == "FedAvg"


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: invalid configuration") as err:
        load_experiment(tmp_path / "nope.toml")
    assert "file not found" in str(err.value)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_experiment(write(tmp_path, "rounds = 2\n[train]\nlocal_epoch = 3\n"))
    assert "train.local_epoch: unknown key" in str(err.value)


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_experiment(write(tmp_path, 'rounds = "many"\n'))
    assert "rounds = 'many'" in str(err.value)


def test_all_problems_reported_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_experiment(write(tmp_path, "rounds = 0\n[train]\nlr = -1\n"))
    assert len(err.value.problems) == 2


def test_dp_needs_exactly_one_noise_source(tmp_path):
    with pytest.raises(ConfigError, match="set exactly one of privacy.target_epsilon"):
        load_experiment(write(tmp_path, "[privacy]\nenabled = true\n"))


def test_overrides_are_typed(tmp_path):
    experiment = load_experiment(HEART_TOML, ["rounds=3", "strategy.name=FedAdam", "train.lr=0.1"])
    assert (experiment.rounds, experiment.strategy.name, experiment.train.lr) == (3, "FedAdam", 0.1)


def test_unknown_strategy_lists_the_choices():
    experiment = load_experiment(HEART_TOML, ["strategy.name=FedMagic"])
    with pytest.raises(ConfigError) as err:
        build_strategy(experiment.strategy)
    assert "strategy.name = 'FedMagic' is unknown" in str(err.value)
    assert "FedAdam" in str(err.value)


def test_strategy_args_are_checked():
    experiment = load_experiment(HEART_TOML, ["strategy.name=FedAdam", "strategy.args={etaa=0.1}"])
    with pytest.raises(ConfigError, match="strategy.args.etaa: FedAdam has no such argument"):
        build_strategy(experiment.strategy)


def test_sampling_arguments_are_reserved():
    experiment = load_experiment(HEART_TOML, ["strategy.args={fraction_train=0.5}"])
    with pytest.raises(ConfigError, match="use train.clients_per_round"):
        build_strategy(experiment.strategy)


@pytest.mark.parametrize("name", ["../../x", "/etc/cron.d/x", "a/b", "", ".hidden", "x" * 65])
def test_a_run_name_is_a_plain_folder_name(name):
    with pytest.raises(ConfigError, match="folder name"):
        parse_experiment({"name": name})
