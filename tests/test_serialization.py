"""One serialization convention: every config round-trips through to_dict/from_dict, unknown settings and other
format versions are refused with one clear message, and search results written before the version key still open."""

from __future__ import annotations

import json

import pytest

from tmpq.errors import TmpqError
from tmpq.evaluate import EvalConfig
from tmpq.models.train_config import TrainConfig
from tmpq.quant.calibration import CalibConfig
from tmpq.quant.config import QuantSpec
from tmpq.search import Budget, EvolutionConfig, FitnessConfig, SearchConfig
from tmpq.search.summary import read_summary
from tmpq.serialization import VERSION_KEY

CONFIGS = [
    SearchConfig(
        steps=(8, 12),
        phase_bounds=(500,),
        seed_from=("runs/a",),
        budget=Budget.parse("W4A8@20"),
        quant=QuantSpec(w_bits=(4, 8), pin=(("*conv_in", 8, None),), reconstruction="adaround"),
        fitness=FitnessConfig("fid", 32, proxy_stat="median"),
        evolution=EvolutionConfig.reference(seed=3),
        calib=CalibConfig(16, 8),
        extra={"note": [1, 2]},
    ),
    EvalConfig(timesteps=(999, 500, 0), num_samples=10),
    TrainConfig(block_out_channels=(32, 32, 64), steps=10),
    Budget.fraction(0.05),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_configs_round_trip_through_plain_json(config):
    d = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(d) == config
    assert type(config).from_dict({**d, VERSION_KEY: 1}) == config


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_unknown_settings_and_other_versions_are_refused(config):
    d = config.to_dict()
    with pytest.raises(TmpqError, match="newer tmpq"):
        type(config).from_dict({**d, "warp_drive": 1})
    with pytest.raises(TmpqError, match="format 2"):
        type(config).from_dict({**d, VERSION_KEY: 2})


def test_search_results_from_before_the_version_key_open_and_newer_ones_are_refused(tmp_path):
    old = {"best": {}, "config": SearchConfig().to_dict()}  # what search.json held before the key existed
    (tmp_path / "search.json").write_text(json.dumps(old))
    assert read_summary(tmp_path)["config"] == old["config"]
    (tmp_path / "search.json").write_text(json.dumps({**old, VERSION_KEY: 7}))
    with pytest.raises(TmpqError, match="format 7"):
        read_summary(tmp_path)


def test_the_old_search_config_to_json_warns_and_equals_to_dict():
    cfg = CONFIGS[0]
    with pytest.warns(DeprecationWarning, match=r"\.to_dict\(\)"):
        assert cfg.to_json() == cfg.to_dict()
