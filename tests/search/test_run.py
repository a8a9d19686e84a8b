from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tiny_search import tiny_loaded, tiny_search_config

from tmpq.errors import TmpqError
from tmpq.quant import CalibConfig
from tmpq.sampling.schedules import NoiseSchedule
from tmpq.search import Budget, FitnessConfig, run_search
from tmpq.search.profile import change_profile
from tmpq.search.run import share_prepared
from tmpq.search.space import GROUPINGS, SearchSpace, group_starts
from tmpq.search.summary import RunSummary

_loaded, _cfg = tiny_loaded, tiny_search_config


def test_run_search_end_to_end_then_resume(make_tiny_unet, tmp_path):
    cfg = _cfg()
    res = run_search(_loaded(make_tiny_unet), cfg, tmp_path, progress=False)
    assert res.best.bitops <= res.budget
    out = json.loads((tmp_path / "search.json").read_text())
    assert out["config"] == cfg.to_dict() and "versions" in out["provenance"]
    assert out["search_cost"]["fitness_forwards"] == 4 * 4 * len(res.records)
    assert out["search_cost"]["overhead_forwards"] > 0  # calibration, sensitivity, FP reference all counted
    assert len(out["best"]["quant_configs"]) == 1
    for name in ("calib.safetensors", "supernet/supernet.json", "sensitivity.json", "proxy_reference.safetensors"):
        assert (tmp_path / name).is_file()
    again = run_search(_loaded(make_tiny_unet), cfg, tmp_path, progress=False)  # everything reused
    assert again.best.candidate == res.best.candidate and again.forwards == res.forwards
    # the prepared files were reused, and the record of what they cost survives the re-run
    again_cost = json.loads((tmp_path / "search.json").read_text())["search_cost"]
    assert again_cost["overhead_forwards"] == out["search_cost"]["overhead_forwards"]


def test_single_lever_runs_keep_their_fixed_half(make_tiny_unet, tmp_path):
    bits = run_search(_loaded(make_tiny_unet), _cfg(lever="bits"), tmp_path / "b", progress=False)
    assert all(r.candidate.timesteps == bits.records[0].candidate.timesteps for r in bits.records)
    ts = run_search(
        _loaded(make_tiny_unet),
        _cfg(lever="timesteps", fixed_precision="W6A6", budget=Budget.like("W8A8", 4)),
        tmp_path / "t",
        progress=False,
    )
    assert len({r.candidate.bits for r in ts.records}) == 1


def test_lever_auto_searches_the_timesteps_at_a_like_budgets_precision(make_tiny_unet, tmp_path):
    """--lever auto (the default): a --like budget names the precision to keep, so only the timesteps are searched at
    it, on a super-network calibrated at that width alone, or on a wider one the run directory already holds."""
    cfg = _cfg(lever="auto", budget=Budget.like("W4A8", 4))
    assert cfg.search_lever == "timesteps" and cfg.timesteps_precision == "W4A8"
    res = run_search(_loaded(make_tiny_unet), cfg, tmp_path / "auto", progress=False)
    assert len({r.candidate.bits for r in res.records}) == 1 and len({r.candidate for r in res.records}) > 1
    assert (res.supernet.spec.w_bits, res.supernet.spec.a_bits) == ((4,), (8,))
    summary = RunSummary.read(tmp_path / "auto")
    assert summary.lever == "timesteps" and summary.config.lever == "auto"  # the choice, and the config as given
    assert summary.best.bitops == res.budget  # uniform W4A8 at 4 steps is the budget itself
    res.supernet.unwrap()
    # a run directory calibrated at every width (a joint search's) is reused as it is, not recalibrated
    joint = run_search(_loaded(make_tiny_unet), _cfg(), tmp_path / "joint", progress=False)
    joint.supernet.unwrap()
    share_prepared(tmp_path / "joint", tmp_path / "lent")
    lent = run_search(_loaded(make_tiny_unet), cfg, tmp_path / "lent", progress=False)
    assert lent.supernet.spec.w_bits == (4, 6, 8) and lent.best.candidate == res.best.candidate
    ledger = tmp_path / "lent" / "overhead.json"  # what this run made itself: not the calibration
    assert "calibration" not in (json.loads(ledger.read_text()) if ledger.is_file() else {})


def test_lever_auto_searches_jointly_where_no_precision_is_named():
    assert _cfg(lever="auto", budget=Budget.gbitops(1.0)).search_lever == "joint"
    assert _cfg(lever="auto", staged=True).search_lever == "joint"
    assert _cfg(lever="auto", fixed_precision="W8A8").timesteps_precision == "W8A8"
    with pytest.raises(TmpqError, match="--fixed-precision WxAy"):
        _cfg(lever="timesteps", budget=Budget.gbitops(1.0))


def test_bad_budget_and_lever(make_tiny_unet, tmp_path):
    with pytest.raises(TmpqError, match="cheapest candidate"):
        run_search(_loaded(make_tiny_unet), _cfg(budget=Budget.gbitops(1e-6)), tmp_path, progress=False)
    with pytest.raises(TmpqError, match="lever"):
        _cfg(lever="both")
    with pytest.raises(TmpqError, match="WxAy"):
        Budget.like("8bit", 10)


def test_fid_against_a_folder_of_the_users_images(make_tiny_unet, tmp_path, monkeypatch):
    """--fid-reference: the search's FID is measured against the user's own images, not Fashion-MNIST."""
    import torch
    from PIL import Image

    monkeypatch.setenv("TMPQ_CACHE", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(0)
    values = {}
    for name, scale in (("noise", 255), ("dark", 20)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(6):
            px = (torch.rand(32, 32, generator=g) * scale).to(torch.uint8).numpy()
            Image.fromarray(px, mode="L").save(folder / f"{i}.png")
        cfg = _cfg(fitness=FitnessConfig(kind="fid", num_samples=4), fid_reference=str(folder))
        res = run_search(_loaded(make_tiny_unet), cfg, tmp_path / f"run_{name}", progress=False)
        assert all(0 < r.value < float("inf") for r in res.records)
        values[name] = res.records[0].value  # the same seeded first candidate in both runs
    assert values["noise"] != values["dark"]  # scored against each folder, not against Fashion-MNIST
    fit = FitnessConfig(kind="fid", num_samples=4)
    with pytest.raises(TmpqError, match="neither 'fashion-mnist' nor a folder"):
        run_search(_loaded(make_tiny_unet), _cfg(fitness=fit, fid_reference=str(tmp_path / "nope")), tmp_path / "s")


def test_median_proxy_is_robust_to_one_diverged_sample():
    import torch

    from tmpq.errors import TmpqError
    from tmpq.search.fitness import FitnessConfig, SampleFitness

    ref = torch.zeros(8, 1, 4, 4)
    images = torch.full_like(ref, 0.1)
    images[0] = 5.0  # one sample that diverged
    scores = {}
    for stat in ("mean", "median"):
        f = SampleFitness.__new__(SampleFitness)
        f.config = FitnessConfig("proxy", 8, proxy_space="pixels", proxy_stat=stat)
        f.reference = ref
        scores[stat] = f.distance(images)
    assert scores["median"] == pytest.approx(0.01) and scores["mean"] > 3
    with pytest.raises(TmpqError, match="proxy_stat"):
        FitnessConfig("proxy", proxy_stat="max")


def _files(run_dir) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "change, named",
    [
        ({"calib": CalibConfig(num_samples=3, num_steps=4)}, "calib.num_samples"),
        ({"fitness": FitnessConfig(kind="proxy", proxy_space="features", num_samples=4)}, "fitness.proxy_space"),
        ({"grouping": "uniform"}, "grouping"),
    ],
)
def test_resume_under_other_settings_is_refused_before_touching_anything(make_tiny_unet, tmp_path, change, named):
    """A finished run re-run with other calibration, fitness or space settings must not remake its files and keep
    the old best: it is refused, naming the setting, and every file stays byte-identical."""
    run_search(_loaded(make_tiny_unet), _cfg(), tmp_path, progress=False)
    before = _files(tmp_path)
    with pytest.raises(TmpqError, match=named.replace(".", r"\.")):
        run_search(_loaded(make_tiny_unet), _cfg(**change), tmp_path, progress=False)
    assert _files(tmp_path) == before


def test_final_rescoring_settings_may_change_on_resume(make_tiny_unet, tmp_path):
    run_search(_loaded(make_tiny_unet), _cfg(), tmp_path, progress=False)
    run_search(_loaded(make_tiny_unet), _cfg(final_top=1), tmp_path, progress=False)  # not a search setting


def test_run_dir_of_another_model_is_refused_without_its_model_json(make_tiny_unet, tmp_path):
    """model.json is not the only tie: deleting it does not let another model adopt the run's search or inputs."""
    run_search(_loaded(make_tiny_unet), _cfg(), tmp_path, progress=False)
    (tmp_path / "model.json").unlink()
    before = _files(tmp_path)
    other = tiny_loaded(lambda: make_tiny_unet(seed=1))
    with pytest.raises(TmpqError, match="another model"):
        run_search(other, _cfg(), tmp_path, progress=False)
    assert _files(tmp_path) == before


def test_calibration_set_of_another_model_is_not_reused(make_tiny_unet, tmp_path):
    from tmpq.quant.prepare import prepare_supernet

    spec = _cfg().quant
    _, calib, _ = prepare_supernet(_loaded(make_tiny_unet), tmp_path, CalibConfig(4, 4), spec, progress=False)
    (tmp_path / "model.json").unlink()
    other = tiny_loaded(lambda: make_tiny_unet(seed=1))
    _, calib2, info = prepare_supernet(other, tmp_path, CalibConfig(4, 4), spec, progress=False)
    assert info["collect_forwards"] > 0 and calib2.config.model != calib.config.model


def test_overhead_survives_a_kill(make_tiny_unet, tmp_path):
    """Killed after the prepared files were made: the resumed run still reports what they cost."""
    full = run_search(_loaded(make_tiny_unet), _cfg(), tmp_path / "a", progress=False)
    assert full is not None
    expected = json.loads((tmp_path / "a" / "search.json").read_text())["search_cost"]["overhead_forwards"]
    run_search(_loaded(make_tiny_unet), _cfg(), tmp_path / "b", progress=False)
    (tmp_path / "b" / "search.json").unlink()
    state = json.loads((tmp_path / "b" / "search_state.json").read_text())
    state["done"] = False  # as if killed during the last generation
    (tmp_path / "b" / "search_state.json").write_text(json.dumps(state))
    run_search(_loaded(make_tiny_unet), _cfg(), tmp_path / "b", progress=False)
    resumed = json.loads((tmp_path / "b" / "search.json").read_text())["search_cost"]["overhead_forwards"]
    assert resumed == expected > 0


def test_run_dir_that_is_a_file_is_refused(make_tiny_unet, tmp_path):
    f = tmp_path / "results"
    f.write_text("mine")
    with pytest.raises(TmpqError, match="is a file"):
        run_search(_loaded(make_tiny_unet), _cfg(), f, progress=False)
    assert f.read_text() == "mine"


def test_grouping_auto_picks_the_best_starting_schedule_and_searches_it(make_tiny_unet, tmp_path):
    """auto scores the search's start (uniform PTQ at the budget's precision) on each grouping's default schedule with
    the search's fitness, keeps the best, records why (FP's scores beside), and then searches exactly as the explicit
    choice would; a re-run resumes instead of refusing."""
    auto = run_search(_loaded(make_tiny_unet), _cfg(grouping="auto"), tmp_path / "auto", progress=False)
    summary = json.loads((tmp_path / "auto" / "search.json").read_text())
    choice = summary["grouping_choice"]
    assert set(choice["scores"]) == set(choice["fp_scores"]) == {"quad", "uniform", "change"}
    assert choice["basis"] == "W6A6" and choice["scores"] != choice["fp_scores"]
    assert choice["chosen"] == min(choice["scores"], key=choice["scores"].get) == summary["grouping"]
    assert summary["config"]["grouping"] == "auto"
    explicit = run_search(_loaded(make_tiny_unet), _cfg(grouping=choice["chosen"]), tmp_path / "x", progress=False)
    assert auto.best.candidate == explicit.best.candidate and auto.best.value == explicit.best.value
    again = run_search(_loaded(make_tiny_unet), _cfg(grouping="auto"), tmp_path / "auto", progress=False)
    assert again.best.candidate == auto.best.candidate


def test_final_table_shows_fp_on_every_rule_schedule_and_ptq_where_fp_scored_best(make_tiny_unet, tmp_path):
    """Beside the search's own grouping, FP on the other rule schedules; when FP scored best on one of them, uniform
    PTQ on that schedule too, so the strongest obvious alternative is measured (and shipped if it wins)."""
    sn = run_search(_loaded(make_tiny_unet), _cfg(final_samples=4, final_top=1), tmp_path, progress=False).supernet
    rows = {r["label"]: r for r in json.loads((tmp_path / "search.json").read_text())["final"]["rows"]}
    assert "FP, 4 steps (quad)" in rows and "FP, 4 steps (uniform)" in rows
    # every grouping's default schedule has its FP row, the measured 'change' one too, whatever the search's grouping
    prof = json.loads((tmp_path / "change_profile.json").read_text())["value"]
    # measured on the FP model, though the search (done before the table is built) left its last candidate on
    sn.set_fp()
    fp_prof = change_profile(sn, NoiseSchedule(), (1, 32, 32))
    assert tuple(prof) == fp_prof
    expected = {tuple(reversed(group_starts(g, 4, len(prof), prof))) for g in GROUPINGS}
    assert {tuple(r["timesteps"]) for r in rows.values() if r["kind"] == "fp" and len(r["timesteps"]) == 4} == expected
    best_fp = min((r for r in rows.values() if r["kind"] == "fp" and len(r["timesteps"]) == 4), key=lambda r: r["fid"])
    ptq = {label: r for label, r in rows.items() if label.startswith("baseline")}
    assert best_fp["timesteps"] in [r["timesteps"] for r in ptq.values()]  # PTQ on the best FP schedule is a row
    assert len(ptq) == (1 if best_fp["timesteps"] == rows["baseline"]["timesteps"] else 2)
    assert len({json.dumps(r["candidate"]["bits"]) for r in ptq.values()}) == 1  # the same uniform precision


def test_fp_rows_are_reused_by_a_search_with_other_flags_and_equal_fresh_ones(make_tiny_unet, tmp_path):
    """The final table's FP rows depend on the model, steps, samples and seeds only: a search with another fitness
    in a run that borrowed RUN/final_fp (share_prepared) reuses them instead of sampling FP again; with other
    sample counts they are made afresh."""
    from tmpq.search.run import share_prepared

    def fp_rows(run):
        rows = json.loads((run / "search.json").read_text())["final"]["rows"]
        return {r["label"]: (r["fid"], r["wall_s"]) for r in rows if r["kind"] == "fp"}

    cfg = _cfg(final_samples=4, final_top=1)
    run_search(_loaded(make_tiny_unet), cfg, tmp_path / "a", progress=False)
    first = fp_rows(tmp_path / "a")
    assert {"FP, 100 steps", "FP, 4 steps (quad)", "FP, 4 steps (uniform)"} <= set(first)
    share_prepared(tmp_path / "a", tmp_path / "b")
    other = _cfg(final_samples=4, final_top=1, fitness=FitnessConfig(kind="proxy", proxy_space="pixels",
                 num_samples=4, reference_steps=6))  # fmt: skip
    run_search(_loaded(make_tiny_unet), other, tmp_path / "b", progress=False)
    assert fp_rows(tmp_path / "b") == first  # the same rows, not re-timed: reused
    share_prepared(tmp_path / "a", tmp_path / "d")
    run_search(_loaded(make_tiny_unet), _cfg(final_samples=6, final_top=1), tmp_path / "d", progress=False)
    assert all(fid != first[k][0] for k, (fid, _) in fp_rows(tmp_path / "d").items())  # 6 samples: made afresh


def test_fp_steps_advice_warns_only_when_more_steps_are_clearly_worse():
    from tmpq.search.run import fp_steps_advice

    assert fp_steps_advice({10: 155.0, 20: 113.0, 50: 126.0, 100: 197.0}, 100).endswith("--proxy-reference-steps 20")
    assert fp_steps_advice({10: 155.0, 20: 113.0, 50: 100.0, 100: 98.0}, 100) is None  # a sound model
    assert fp_steps_advice({10: 155.0, 20: 100.0, 100: 105.0}, 100) is None  # within the tolerance


def test_the_automatic_proxy_target_is_where_fp_scores_best():
    from tmpq.search.run import proxy_target

    assert proxy_target({10: 155.0, 20: 113.0, 50: 126.0, 100: 197.0}) == 20  # degrades with steps: its peak
    assert proxy_target({10: 155.0, 20: 113.0, 50: 100.0, 100: 98.0}) == 100  # a sound model: full steps
    assert proxy_target({10: 155.0, 20: 100.0, 100: 105.0}) == 100  # within the tolerance: the more steps


def test_a_search_left_to_choose_its_proxy_target_measures_and_records_it(make_tiny_unet, tmp_path):
    from tmpq.search.run import proxy_target

    cfg = _cfg(fitness=FitnessConfig(kind="proxy", proxy_space="features", num_samples=4))
    assert cfg.fitness.reference_steps is None  # the default: chosen by the search
    run_search(_loaded(make_tiny_unet), cfg, tmp_path, progress=False)
    out = json.loads((tmp_path / "search.json").read_text())
    rec = out["fp_steps"]
    fids = {int(n): f for n, f in rec["fid"].items()}
    assert sorted(fids) == [4, 20, 50, 100] and rec["target"] == proxy_target(fids) and rec["advice"] is None
    assert out["config"]["fitness"]["reference_steps"] is None  # the config as given; the choice sits beside it
    # the proxy reference was made at the chosen target (its file is keyed on the concrete fitness config)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "proxy_reference.safetensors"), framework="pt") as fh:
        assert json.loads(fh.metadata()["fitness"])["reference_steps"] == rec["target"]


def test_search_records_fp_quality_by_step_count(make_tiny_unet, tmp_path):
    cfg = _cfg(fitness=FitnessConfig(kind="proxy", proxy_space="features", num_samples=4, reference_steps=8))
    run_search(_loaded(make_tiny_unet), cfg, tmp_path, progress=False)
    rec = json.loads((tmp_path / "search.json").read_text())["fp_steps"]
    assert sorted(int(n) for n in rec["fid"]) == [4, 8, 20, 50] and rec["samples"] == 4
    assert all(v > 0 for v in rec["fid"].values()) and "advice" in rec


def test_final_rows_record_their_fid_to_fp_at_full_steps(make_tiny_unet, tmp_path):
    """Every final row but FP-100 itself is also scored against FP-100's samples from the same seeds; those samples
    are kept in RUN/final_fp/ once, so a re-scoring in a run that borrowed the folder does not sample them again."""
    from tmpq.search.run import share_prepared

    run_search(_loaded(make_tiny_unet), _cfg(final_samples=4, final_top=1), tmp_path / "a", progress=False)
    rows = {r["label"]: r for r in json.loads((tmp_path / "a" / "search.json").read_text())["final"]["rows"]}
    assert rows["FP, 100 steps"]["fid_to_fp"] is None
    others = [r for label, r in rows.items() if label != "FP, 100 steps"]
    assert len(others) >= 3 and all(r["fid_to_fp"] > 0 for r in others)
    kept = list((tmp_path / "a" / "final_fp").glob("images_*.safetensors"))
    assert len(kept) == 1
    share_prepared(tmp_path / "a", tmp_path / "b")
    made = (tmp_path / "b" / "final_fp" / kept[0].name).stat().st_mtime_ns
    run_search(_loaded(make_tiny_unet), _cfg(final_samples=4, final_top=2), tmp_path / "b", progress=False)
    again = {r["label"]: r for r in json.loads((tmp_path / "b" / "search.json").read_text())["final"]["rows"]}
    assert (tmp_path / "b" / "final_fp" / kept[0].name).stat().st_mtime_ns == made  # read, not sampled again
    assert again["top1"]["fid_to_fp"] == rows["top1"]["fid_to_fp"]
    assert again["top2"]["fid_to_fp"] > 0


def test_a_search_on_fidelity_scores_by_fid_to_the_fp_models_own_samples(make_tiny_unet, tmp_path):
    """--fitness fid_to_fp: the target step count is measured and chosen as for the proxy, the FP samples there are
    made once (RUN/proxy_reference.safetensors), and a candidate's fitness is the FID of its samples against them,
    which is what an independent computation from the same seeds gives; --grouping auto scores by it too."""
    from tmpq.evaluate import reference_metric
    from tmpq.quant.prepare import prepare_supernet
    from tmpq.search import SampleFitness, SearchSpace

    cfg = _cfg(fitness=FitnessConfig(kind="fid_to_fp", num_samples=4), grouping="auto")
    res = run_search(_loaded(make_tiny_unet), cfg, tmp_path, progress=False)
    out = json.loads((tmp_path / "search.json").read_text())
    target = out["fp_steps"]["target"]
    assert RunSummary.read(tmp_path).fitness_label == f"FID to FP-{target} @ 4 samples"  # as the report names it
    assert out["grouping_choice"]["fitness"] == "fid_to_fp" and (tmp_path / "proxy_reference.safetensors").is_file()
    loaded = _loaded(make_tiny_unet)
    sn, _, _ = prepare_supernet(loaded, tmp_path, cfg.calib, cfg.quant, progress=False)
    change = None  # the measured profile, when auto chose the 'change' grouping (it does on some machines)
    if out["grouping"] == "change":
        change = tuple(json.loads((tmp_path / "change_profile.json").read_text())["value"])
    space = SearchSpace.from_supernet(
        sn,
        num_train_timesteps=1000,
        steps=(4,),
        grouping=out["grouping"],
        phase_bounds=cfg.phase_bounds,
        change=change,
    )
    metric = reference_metric("fashion-mnist")
    fit = SampleFitness(sn, space, loaded.schedule, loaded.sample_shape, metric, FitnessConfig("fid", 4))
    fp = fit.fp_samples(loaded.schedule.timesteps("uniform", target))
    with torch.no_grad():
        images = fit.samples(res.best.candidate)
    assert res.best.value == pytest.approx(metric.fid_between(images, fp), rel=1e-5)
    assert res.best.value > 1e-3 > metric.fid_between(fp, fp)  # quantized samples differ; FP itself scores 0
    chosen = out["grouping_choice"]  # scored on the search's start, uniform W6A6, with FP's scores beside it
    ts = tuple(chosen["timesteps"][chosen["chosen"]])
    assert chosen["basis"] == "W6A6"
    assert chosen["fp_scores"][chosen["chosen"]] == pytest.approx(metric.fid_between(fit.fp_samples(ts), fp), rel=1e-5)
    with torch.no_grad():
        start = fit.samples(space.candidate(ts, space.uniform_bits(6, 6)))
    assert chosen["scores"][chosen["chosen"]] == pytest.approx(metric.fid_between(start, fp), rel=1e-5)


def test_a_final_pool_re_ranks_the_search_best_on_fresh_seeds_before_the_final_table(make_tiny_unet, tmp_path):
    """--final-pool N: the search's best N are scored by the same fitness on seeds after the final table's, and the
    final table takes the best of them by that score alone; the scores are kept (RUN/race.json) and reused."""
    from tmpq.quant.prepare import prepare_supernet
    from tmpq.search import SampleFitness
    from tmpq.search.run import RACE_FILE

    cfg = _cfg(final_samples=4, final_top=1, final_pool=3)
    res = run_search(_loaded(make_tiny_unet), cfg, tmp_path, progress=False)
    race = json.loads((tmp_path / RACE_FILE).read_text())
    loaded = _loaded(make_tiny_unet)
    sn, _, _ = prepare_supernet(loaded, tmp_path, cfg.calib, cfg.quant, progress=False)
    space = SearchSpace.from_supernet(sn, num_train_timesteps=1000, steps=(4,), grouping="quad")
    baseline = space.candidate(space.default_timesteps(4), space.uniform_bits(6, 6))  # a row of its own, not raced
    pool = [r for r in res.top(4) if r.candidate.key != baseline.key][:3]
    assert set(race["scores"]) == {r.candidate.key for r in pool} and race["key"]["fitness"]["seed"] == 4
    winner = min(pool, key=lambda r: (race["scores"][r.candidate.key], r.bitops))
    rows = {r["label"]: r for r in json.loads((tmp_path / "search.json").read_text())["final"]["rows"]}
    assert rows["top1"]["candidate"]["timesteps"] == list(winner.candidate.timesteps)
    assert rows["top1"]["candidate"]["bits"] == [[list(b) for b in p] for p in winner.candidate.bits]
    assert "top2" not in rows
    # the fresh score is the fitness on seeds 4..7: an independent computation agrees
    fcfg = replace(cfg.fitness, seed=4)
    fit = SampleFitness(sn, space, loaded.schedule, loaded.sample_shape, None, fcfg)
    with torch.no_grad():
        fresh = fit.score(fit.samples(winner.candidate))
    assert race["scores"][winner.candidate.key] == pytest.approx(fresh, rel=1e-5)
    stamp = (tmp_path / RACE_FILE).stat().st_mtime_ns
    run_search(_loaded(make_tiny_unet), cfg, tmp_path, progress=False)  # resumed: the race is read back, not re-run
    assert (tmp_path / RACE_FILE).stat().st_mtime_ns == stamp


def test_a_final_pool_no_larger_than_the_final_top_is_refused():
    with pytest.raises(TmpqError, match="--final-pool 3 must be 0 .* more than --final-top 3"):
        _cfg(final_samples=4, final_top=3, final_pool=3)


def test_the_final_tables_top_rows_are_search_results_not_the_baseline_again():
    """The uniform baseline is a row of its own: when the search ranks it among its best, the top rows pass over it
    (with or without a pool), so each of them re-scores a candidate the search found."""
    from types import SimpleNamespace

    from tmpq.search.evolution import Record, SearchResult
    from tmpq.search.run import race_top
    from tmpq.search.space import Candidate

    recs = [Record(Candidate((900 - i, 0), (((6, 6),),)), float(i), 10, 1, 0.0, 0) for i in range(4)]
    result = SearchResult(recs[0], [], recs, [], 4, 0.0, 10)
    ctx = SimpleNamespace(cfg=_cfg(final_samples=4, final_top=2, final_pool=0))  # no race: the search's own order
    top, forwards = race_top(ctx, None, result, exclude={recs[0].candidate.key})
    assert [r.value for r in top] == [1.0, 2.0] and forwards == 0
    assert [r.value for r in race_top(ctx, None, result)[0]] == [0.0, 1.0]


def _race_ctx(cfg, run_dir, fresh: dict[str, float]):
    """A search context for `race_top` whose fitness scores candidate key k as `fresh[k]`, and the list of the keys
    it sampled, in order."""
    from types import SimpleNamespace

    scored: list[str] = []

    class Fit:
        reference_forwards = 0

        def samples(self, candidate):
            scored.append(candidate.key)
            return candidate.key

        def score(self, key):
            return fresh[key]

    sn = SimpleNamespace(fingerprint="fp")
    return SimpleNamespace(cfg=cfg, sn=sn, run_dir=run_dir, progress=False, fitness=lambda c, s: Fit()), scored


def test_the_race_takes_its_pool_after_passing_over_the_baseline(tmp_path):
    """The baseline's own row is scored on the final table's samples, so racing it would spend a fitness evaluation
    on a score nobody reads: the pool is the search's best `final_pool` among the other candidates."""

    from tmpq.search.evolution import Record, SearchResult
    from tmpq.search.run import RACE_FILE, race_top
    from tmpq.search.space import Candidate

    recs = [Record(Candidate((900 - i, 0), (((6, 6),),)), float(i), 10, 1, 0.0, 0) for i in range(5)]
    fresh = {recs[1].candidate.key: 3.0, recs[2].candidate.key: 1.0}  # the fresh seeds reverse the search's order
    cfg = _cfg(final_samples=4, final_top=1, final_pool=2)
    ctx, scored = _race_ctx(cfg, tmp_path, fresh)
    result = SearchResult(recs[0], [], recs, [], 5, 0.0, 10)
    top, forwards = race_top(ctx, None, result, exclude={recs[0].candidate.key})
    assert scored == [recs[1].candidate.key, recs[2].candidate.key]  # the baseline (best by fitness) is not raced
    assert [r.value for r in top] == [2.0] and forwards == 2 * 2 * cfg.fitness.num_samples  # 2 candidates × 2 steps
    assert set(json.loads((tmp_path / RACE_FILE).read_text())["scores"]) == set(fresh)


def test_the_race_always_holds_the_seeded_candidates(tmp_path):
    """A seeded search's seeds (a staged search's single-lever winners) are raced whatever their rank on the search's
    seeds: the joint search's mutations of them can crowd them out of the best `final_pool`, and a fresh score is
    where they are compared fairly. Without a race nothing changes: the top rows are the search's own best."""

    from tmpq.search.evolution import Record, SearchResult
    from tmpq.search.run import race_top
    from tmpq.search.space import Candidate

    recs = [Record(Candidate((900 - i, 0), (((6, 6),),)), float(i), 10, 1, 0.0, 0) for i in range(6)]
    keys = [r.candidate.key for r in recs]
    fresh = {keys[1]: 3.0, keys[2]: 2.0, keys[5]: 1.0}  # the seed ranked last by the search wins on fresh seeds
    ctx, _ = _race_ctx(_cfg(final_samples=4, final_top=1, final_pool=2), tmp_path, fresh)
    result = SearchResult(recs[0], [], recs, [], 6, 0.0, 10)
    top, _ = race_top(ctx, None, result, exclude={keys[0]}, include={keys[5], keys[0], "a repaired seed"})
    assert [r.candidate.key for r in top] == [keys[5]]
    assert set(json.loads((tmp_path / "race.json").read_text())["scores"]) == {keys[1], keys[2], keys[5]}
    ctx.cfg = _cfg(final_samples=4, final_top=1, final_pool=0)
    assert [r.candidate.key for r in race_top(ctx, None, result, exclude={keys[0]}, include={keys[5]})[0]] == [keys[1]]


def test_a_staged_search_races_its_stage_winners_and_shows_only_the_current_rows(make_tiny_unet, tmp_path):
    """End to end: a staged search's final pool holds the candidates the stages seeded (RUN/seeded.json), and the
    final table lists each of its rows once, labelled as this run ranks them."""
    from tmpq.search.space import Candidate

    cfg = _cfg(final_samples=4, final_top=1, final_pool=2, staged=True)
    res = run_search(_loaded(make_tiny_unet), cfg, tmp_path, progress=False)
    rows = json.loads((tmp_path / "search.json").read_text())["final"]["rows"]
    base = Candidate.from_json(next(r for r in rows if r["label"] == "baseline")["candidate"]).key
    seeded = set(json.loads((tmp_path / "seeded.json").read_text())) - {base}
    raced = set(json.loads((tmp_path / "race.json").read_text())["scores"])
    assert seeded and seeded & {r.candidate.key for r in res.records} <= raced
    # a row an earlier race ranked on top, left in final.json: a resumed run lists only the rows of its own table
    final = json.loads((tmp_path / "final.json").read_text())
    top1 = next(k for k, r in final["rows"].items() if r["label"] == "top1")
    final["rows"]["stale"] = {**final["rows"][top1], "label": "top1"}
    (tmp_path / "final.json").write_text(json.dumps(final))
    run_search(_loaded(make_tiny_unet), cfg, tmp_path, progress=False)
    again = json.loads((tmp_path / "search.json").read_text())["final"]["rows"]
    assert again == rows
    labels = [r["label"] for r in rows]
    assert len(labels) == len(set(labels)) and labels.count("top1") == 1 and "top2" not in labels


def test_a_search_on_kid_scores_each_candidate_by_its_kid_against_the_data(make_tiny_unet, tmp_path):
    """--fitness kid: a candidate's fitness is the KID of its samples from the fitness seeds, what an independent
    computation gives; the final table still ranks by FID (what the user is shown)."""
    from tmpq.evaluate import reference_metric
    from tmpq.quant.prepare import prepare_supernet
    from tmpq.search import SampleFitness, SearchSpace

    cfg = _cfg(fitness=FitnessConfig(kind="kid", num_samples=4))
    res = run_search(_loaded(make_tiny_unet), cfg, tmp_path, progress=False)
    loaded = _loaded(make_tiny_unet)
    sn, _, _ = prepare_supernet(loaded, tmp_path, cfg.calib, cfg.quant, progress=False)
    space = SearchSpace.from_supernet(sn, num_train_timesteps=1000, steps=(4,), grouping=cfg.grouping)
    metric = reference_metric("fashion-mnist")
    fit = SampleFitness(sn, space, loaded.schedule, loaded.sample_shape, metric, FitnessConfig("kid", 4))
    with torch.no_grad():
        images = fit.samples(res.best.candidate)
    assert res.best.value == pytest.approx(metric.kid(images), rel=1e-6)
    assert res.best.value != pytest.approx(metric.fid(images), rel=1e-2)  # not FID under another name
    assert not (tmp_path / "proxy_reference.safetensors").is_file()  # KID needs no FP reference
    assert RunSummary.read(tmp_path).fitness_label == "KID @ 4 samples"  # as the report and the CLI name it
