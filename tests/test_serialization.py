"""One serialization convention: every config round-trips through to_dict/from_dict, unknown settings and other
format versions are refused with one clear message, and search results written before the version key still open."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tmpq.errors import TmpqError
from tmpq.evaluate import EvalConfig
from tmpq.models.train_config import TrainConfig
from tmpq.quant.calibration import CalibConfig
from tmpq.quant.config import QuantConfig, QuantSpec
from tmpq.sampling.schedules import NoiseSchedule
from tmpq.search import Budget, Candidate, EvolutionConfig, FitnessConfig, Record, SearchConfig
from tmpq.search.summary import (
    FinalRow,
    FinalScores,
    FpSteps,
    GroupingChoice,
    RunSummary,
    SearchCost,
    SeedSearch,
)
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


def _summary() -> RunSummary:
    """A search result with every part filled in (two phases, a final table, a seed search, an auto grouping)."""
    cand = Candidate((900, 500, 100), (((6, 6), (8, None)), ((4, 8), (8, None))))
    rec = Record(cand, 0.25, 123_456, 640, 1.5, 2, {"proxy": 0.25})
    rows = (
        FinalRow(
            "FP, 100 steps", "fp", None, tuple(range(990, -1, -10)), 40.0, 10**9, 2.5, 100_000, 3.0, "final/a.png"
        ),
        FinalRow("baseline", "quantized", cand, cand.timesteps, 90.0, 120_000, None, 3000, 1.0, "final/b.png"),
        FinalRow("top1", "quantized", cand, cand.timesteps, 80.0, 123_456, 2.0, 3000, 1.0, "final/c.png"),
    )
    return RunSummary(
        best=rec,
        quant_configs=(
            QuantConfig.from_mapping({"a": (6, 6), "b": (8, None)}),
            QuantConfig.from_mapping({"a": (4, 8), "b": (8, None)}),
        ),
        budget_bitops=130_000,
        budget="W6A6@10",
        fp_bitops_full_100=10**9,
        config=CONFIGS[0],
        model="builtin:fashion",
        pareto=(rec,),
        top=(rec,),
        history=({"generation": 0, "best_value": 0.25},),
        final=FinalScores(1000, rows),
        search_cost=SearchCost(640, 64, 6000, 10, 12.5, 13.0),
        seed_searches=(SeedSearch("runs/a", SearchCost(evaluations=3)),),
        grouping="quad",
        grouping_choice=GroupingChoice(
            "quad",
            {"quad": 1.0, "uniform": 2.0},
            {"quad": (900, 100)},
            2,
            "proxy",
            "W6A6",
            {"quad": 3.0, "uniform": 2.5},
        ),
        fp_steps=FpSteps({10: 150.0, 100: 90.0}, 64, None),
        model_options={"dtype": "float32"},
        noise_schedule=NoiseSchedule(beta_end=0.012),
        provenance={"inputs_sha256": {"model": "abc"}},
    )


def test_run_summary_round_trips_through_its_file_typed(tmp_path):
    summary = _summary()
    path = summary.write(tmp_path)
    back = RunSummary.read(tmp_path)
    assert back == summary and back.to_dict() == json.loads(path.read_text())
    assert back.final.best.label == "top1" and back.final.baseline.fid == 90.0  # derived, not stored twice
    assert back.best.candidate.bits[1][0] == (4, 8) and back.quant_configs[1]["a"] == (4, 8)
    assert back.model_sha256 == "abc" and back.fp_steps.fid[10] == 150.0
    assert back.noise_schedule.beta_end == 0.012 and isinstance(back.config.budget, Budget)
    assert (
        back.grouping_choice.describe() == "quad (W6A6 at 2 steps, proxy: quad 1, uniform 2; FP: quad 3, uniform 2.5)"
    )


def test_a_grouping_choice_made_on_fp_alone_reads_back_as_such():
    old = {"chosen": "uniform", "scores": {"uniform": 1.0}, "timesteps": {"uniform": [1]}, "steps": 1, "fitness": "fid"}
    back = GroupingChoice.from_dict(old)  # RUN/search.json from before the start was scored
    assert (
        back.basis == "FP" and back.fp_scores is None and back.describe() == "uniform (FP at 1 steps, fid: uniform 1)"
    )


def test_search_results_from_before_the_version_key_open_and_newer_ones_are_refused(tmp_path):
    old = _summary().to_dict()
    for key in (VERSION_KEY, "grouping", "grouping_choice", "fp_steps", "seed_searches", "model_options", "top"):
        del old[key]  # what search.json held before these were recorded
    (tmp_path / "search.json").write_text(json.dumps(old))
    back = RunSummary.read(tmp_path)
    assert back.config == CONFIGS[0] and back.grouping is None and back.top == () and back.model_options == {}
    (tmp_path / "search.json").write_text(json.dumps({**old, VERSION_KEY: 7}))
    with pytest.raises(TmpqError, match="format 7"):
        RunSummary.read(tmp_path)


@pytest.mark.parametrize(
    "damage, why",
    [
        ("{not json", "not valid JSON"),
        ('{"best": {}}', "no best candidate or config"),
        ("BEST", "incomplete or damaged"),
    ],
)
def test_a_damaged_search_result_gets_one_clear_message(tmp_path, damage, why):
    text = json.dumps({**_summary().to_dict(), "best": {"value": 1}}) if damage == "BEST" else damage
    (tmp_path / "search.json").write_text(text)
    with pytest.raises(TmpqError, match=why) as e:
        RunSummary.read(tmp_path, "the fix")
    assert "re-run" in str(e.value) and "the fix" in str(e.value)


def test_the_old_search_config_to_json_warns_and_equals_to_dict():
    cfg = CONFIGS[0]
    with pytest.warns(DeprecationWarning, match=r"\.to_dict\(\)"):
        assert cfg.to_json() == cfg.to_dict()


def test_the_final_verdict_says_plainly_what_won():
    final = _summary().final
    text = final.verdict()
    assert "beat uniform PTQ at the budget (FID 90.00)" in text and "FP, 100 steps" not in text  # other step counts
    rows = final.rows
    base_best = FinalScores(final.samples, (rows[0], replace(rows[1], fid=70.0), rows[2]))
    assert base_best.verdict().startswith("uniform PTQ (FID 70.00) scored best: the search found nothing better")
    on_uniform = replace(rows[1], label="baseline (uniform schedule)", fid=65.0)  # PTQ where FP scored best
    text = FinalScores(final.samples, (rows[0], replace(rows[1], fid=70.0), on_uniform, rows[2])).verdict()
    assert text.startswith("uniform PTQ on the uniform schedule (FID 65.00) scored best: the search found nothing")
    text = FinalScores(final.samples, (rows[0], rows[1], replace(on_uniform, fid=85.0), rows[2])).verdict()
    assert "beat uniform PTQ at the budget (FID 85.00)" in text  # measured against the better PTQ row
    fp3 = FinalRow("FP, 3 steps (uniform)", "fp", None, (900, 500, 100), 60.0, 10**8)
    text = FinalScores(final.samples, (*rows, fp3)).verdict()
    assert "against FP, 3 steps (uniform) (FID 60.00) it is 20.00 worse at 810x fewer BitOPs" in text


def test_a_final_table_on_fidelity_ranks_and_ships_by_fid_to_fp():
    """A search on --fitness fid_to_fp ships the row closest to FP-100, even where another scores a better FID
    against the data; the criterion survives the file's round trip, and files from before it rank by FID."""
    rows = _summary().final.rows
    rows = (
        rows[0],
        replace(rows[1], fid=90.0, fid_to_fp=5.0),
        replace(rows[2], fid=80.0, fid_to_fp=12.0),
        FinalRow("FP, 3 steps (uniform)", "fp", None, (900, 500, 100), 60.0, 10**8, fid_to_fp=8.0),
    )
    by_fid, by_fidelity = FinalScores(1000, rows), FinalScores(1000, rows, "fid_to_fp")
    assert by_fid.best.label == "top1" and by_fidelity.best.label == "baseline"
    text = by_fidelity.verdict()
    assert text.startswith("uniform PTQ (FID to FP-100 5.00) scored best")
    assert "against FP, 3 steps (uniform) (FID to FP-100 8.00) it is 3.00 better" in text
    assert FinalScores.from_dict(by_fidelity.to_dict()) == by_fidelity
    old = by_fidelity.to_dict()
    del old["criterion"]
    assert FinalScores.from_dict(old).criterion == "fid"
    with pytest.raises(TmpqError, match="final criterion"):
        FinalScores(1000, rows, "psnr")
