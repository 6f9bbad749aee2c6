"""Schedule search on real weights and photos (small budget)."""

import contextlib
import dataclasses
import json
from dataclasses import replace
import os

import numpy as np
import pytest
import torch

from dsm_export.cli import main
from dsm_export.check.evaluate import flops_ratio, model_logits, schedule_metrics
from dsm_export.core.schedule import Schedule
from dsm_export.search.candidates import Budget, Candidate, pareto_front
from dsm_export.search import tuning
from dsm_export.search.schedule_search import ScheduleSearchSettings, search_schedules
from dsm_export.search.tuning import SPEEDUP_MAX_KL, ResolvedTuneOptions, TuneOptions, TuneReport

from conftest import DEIT


def test_tune_meets_target_and_beats_constant_r(deit, pixels):
    from dsm_export.search.schedule_search import with_mirrors

    views = with_mirrors(pixels)  # the photos, then each one mirrored left to right
    assert views.shape == (2 * len(pixels), *pixels.shape[1:])
    assert torch.equal(views[:len(pixels)], pixels) and torch.equal(views[len(pixels):, :, :, 0], pixels[:, :, :, -1])
    result = search_schedules(deit, pixels, ScheduleSearchSettings(1.7, max_grid=10, refine_steps=4, progress=False))
    assert flops_ratio(deit, result.best) >= 1.7
    # Scored on both views of every photo; the mirror images change what merges, so the KL differs.
    base = model_logits(deit, views)
    both = schedule_metrics(deit, result.best, views, base)
    assert abs(both["kl"] - result.best_metrics.divergence) < 1e-9
    assert abs(schedule_metrics(deit, result.best, pixels, base[:len(pixels)])["kl"] - both["kl"]) > 1e-6
    # ToMe's constant r=13 (1.74x) is a grid candidate, always evaluated: the search can only do better.
    tome = schedule_metrics(deit, Schedule(r=13), views, base)
    assert result.best_metrics.divergence <= tome["kl"]
    assert result.pareto and all(r in result.evaluated for r in result.pareto)


def test_tune_grid_goes_coarse_to_fine(deit, pixels):
    """Past ``max_grid`` candidates: half spread over the grid with ToMe's constant r among them,
    then each next schedule the unevaluated one nearest the best so far."""
    from dsm_export.search.schedule_search import grid_candidates, grid_distance, spread_sample

    cands = grid_candidates(deit, 1.7, 0.05)
    first, rest = spread_sample(cands, 4)
    assert len(cands) > 8 and len(first) + len(rest) == len(cands)
    tome = [s for s in cands if s.spec() == f"r={s.r}"]
    assert tome and all(s in first for s in tome)
    result = search_schedules(deit, pixels[:4], ScheduleSearchSettings(1.7, max_grid=8, refine_steps=0, progress=False,
                                                                  variants=False))
    specs = [m.spec for m in result.evaluated]
    assert len(specs) == 8 and specs[:len(first)] == [s.spec() for s in first]
    by_spec = {s.spec(): s for s in cands}
    for k in range(len(first), 8):  # each fine-stage pick is nearest the best of those before it
        seen = result.evaluated[:k]
        best = by_spec[min(seen, key=lambda m: (m.divergence, -m.agreement)).spec]
        left = [s for s in cands if s.spec() not in specs[:k]]
        assert grid_distance(by_spec[specs[k]], best) == min(grid_distance(s, best) for s in left)


def test_pareto_front():
    rows = [Candidate.from_json(dict(flops_ratio=f, kl=kl, agreement=0.9))
            for f, kl in ((1.5, 0.02), (1.7, 0.05), (1.6, 0.06), (1.7, 0.04))]
    assert pareto_front(rows, "flops_ratio") == [rows[0], rows[3]]
    assert rows[0].divergence == 0.02 and rows[0].to_json()["kl"] == 0.02  # a classifier's KL is its divergence


def test_tune_cli(deit, weights, images_dir, tmp_path, capsys):
    out = tmp_path / "schedule.json"
    code = main(["tune", DEIT, "--weights", weights, "--images", images_dir, "--target-flops-ratio", "1.5",
                 "--calibration-count", "8", "--holdout", "8", "--max-grid", "4", "--refine-steps", "2",
                 "--output", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "held apart (8 images)" in text and "calibration (8 images and their mirror images)" in text
    schedule = Schedule.parse(str(out))
    assert flops_ratio(deit, schedule) >= 1.5
    assert json.loads(out.read_text())["blocks"]


def test_speed_check_candidates_confirmation_and_choice():
    """Which schedules the speed check times, which it times twice, and which it keeps."""
    from dsm_export.search.candidates import Budget
    import pytest

    from dsm_export.search.candidates import first_fast_enough, near_floor
    from dsm_export.search.speed_check import speed_candidates, speed_stats

    def row(spec, kl, fr=1.71, agree=0.9):
        return Candidate(spec=spec, divergence=kl, agreement=agree, flops_ratio=fr)

    rows = [row("r=33,r_end=0,delay=3,metric=heads", 0.030),
            row('{"blocks":["none","none","none","global 40","global 30","global 20","global 10","global 5",'
                '"global 5","global 3","global 3","global 0"],"metric":"heads"}', 0.031),
            row("r=33,r_end=0,delay=3,metric=heads,protect=8", 0.029),
            row("r=34,r_end=0,delay=3,metric=heads", 0.032),  # a third metric=heads: capped at two
            row("r=33,r_end=0,delay=3", 0.040),
            row("r=33,r_end=0,delay=3", 0.040),  # same spec twice: timed once
            row("r=30,r_end=0,delay=3", 0.020, fr=1.6),  # below the target
            row("r=33,r_end=0,delay=3,protect=16", 0.035, agree=0.5)]
    got = [r.spec for r in speed_candidates(rows, 1.7, count=6)]
    assert got == [rows[2].spec, rows[0].spec, rows[1].spec, rows[7].spec, rows[4].spec]
    assert [r.spec for r in speed_candidates(rows, 1.7, count=2)] == got[:2]
    assert rows[7].spec not in [r.spec for r in speed_candidates(rows, 1.7, budget=Budget(0.8))]

    # paired speed-ups summed up: median and lower quartile, both over the FLOP ratio
    stats = speed_stats([1.5, 1.8, 1.4, 1.6, 1.7], 1.6)
    assert stats["speedup"] == pytest.approx(1.6) and stats["speed_per_flop"] == pytest.approx(1.0)
    assert stats["speed_per_flop_low"] == pytest.approx(1.5 / 1.6) and stats["speedup_runs"][1] == 1.8
    with pytest.raises(ValueError, match="no speed-ups"):
        speed_stats([], 1.6)

    # the choice goes by the lower quartile: a median above the floor is not enough
    timed = [Candidate(spec=s, divergence=0.03, agreement=0.9, speed_per_flop_low=q, speed_per_flop=q + 0.05)
             for s, q in zip("abcde", (0.80, 0.88, 0.93, 0.96, 0.99))]
    assert first_fast_enough(timed, 0.9).spec == "c"
    assert first_fast_enough(timed, 0.9, key="speed_per_flop").spec == "b"
    assert first_fast_enough(timed, 1.0) is None
    # within 0.05 below the floor, up to the first at or above it: only b could still rise over it
    assert [r.spec for r in near_floor(timed, 0.9, 0.05)] == ["b"]
    assert [r.spec for r in near_floor(timed, 0.95, 0.05)] == ["c"]
    assert near_floor(timed, 0.7, 0.05) == []


def test_speed_check_times_real_exports(deit, weights, pixels, tmp_path):
    """Two real candidates exported and timed against timm's unmerged model in ONNX Runtime."""
    from dsm_export.graph.export import read_metadata
    from dsm_export.search.candidates import first_fast_enough
    from dsm_export.search.speed_check import SpeedCheckSettings, speed_check

    import onnx

    base = model_logits(deit, pixels[:8])
    rows = [Candidate.from_json(schedule_metrics(deit, Schedule.parse(s), pixels[:8], base) | {"spec": s})
            for s in ("r=13", "r=34,r_end=0,delay=3,local=1,protect=16")]
    check = speed_check(deit, rows, str(tmp_path), SpeedCheckSettings(1.7, DEIT, weights=weights, min_quotient=0.5,
                                                                      count=2))
    assert [r.spec for r in check.rows] == sorted((r.spec for r in rows),
                                                  key=lambda s: next(r.to_json()["kl"] for r in rows if r.spec == s))
    for r in check.rows:
        assert r.speedup > 1.2 and abs(r.speed_per_flop - r.speedup / r.flops_ratio) < 1e-9
        assert len(r.speedup_runs) in (5, 10) and r.speed_per_flop_low <= r.speed_per_flop
        assert read_metadata(onnx.load(r.path)).schedule.to_dict(12) == Schedule.parse(r.spec).to_dict(12)
    assert check.chosen is first_fast_enough(check.rows, 0.5)
    assert check.machine["batch"] == 32 and check.machine["repeats"] == 5


def test_tune_export_speed_check_cli(weights, images_dir, tmp_path, capsys):
    out, report = tmp_path / "tuned.onnx", tmp_path / "report.json"
    code = main(["tune", DEIT, "--weights", weights, "--images", images_dir, "--target-flops-ratio", "1.5",
                 "--calibration-count", "8", "--holdout", "8", "--max-grid", "2", "--refine-steps", "0",
                 "--speed-candidates", "2", "--export", str(out), "--report", str(report), "--no-progress",
                 "--no-mirror"])
    text = capsys.readouterr().out
    assert code == 0 and "calibration (8 images):" in text and "speed check (ONNX Runtime cpu" in text and "lower quartile is at least 0.90" in text
    timed = json.loads(report.read_text())["speed_check"]
    assert len(timed) == 2 and all(0 < r["speed_per_flop_low"] <= r["speed_per_flop"] for r in timed)
    kept = next((r for r in timed if r["speed_per_flop_low"] >= 0.9), timed[0])
    import onnx
    from dsm_export.graph.export import read_metadata

    assert read_metadata(onnx.load(out)).schedule.to_dict(12) == Schedule.parse(kept["spec"]).to_dict(12)
    assert json.loads(report.read_text())["schedule"] == kept["spec"]


def test_bootstrap_interval():
    from dsm_export.check.evaluate import bootstrap_interval

    assert bootstrap_interval(np.full(50, 0.25)) == (0.25, 0.25)
    agree = (np.arange(372) % 100 < 91).astype(float)  # 91 % agreement on 372 photos
    low, high = bootstrap_interval(agree)
    p, n = agree.mean(), agree.size
    half = 1.96 * np.sqrt(p * (1 - p) / n)  # the normal approximation's half-width
    assert low < p < high and abs((high - low) / (2 * half) - 1) < 0.15
    assert bootstrap_interval(agree, seed=3) == bootstrap_interval(agree, seed=3)
    # Paired differences: two schedules sharing the photos' difficulty vary far less than either
    rng = np.random.default_rng(0)
    hard = rng.exponential(0.1, 372)
    a, b = hard, hard * 1.1 + rng.normal(0, 0.002, 372)
    paired = bootstrap_interval(b - a)
    alone = bootstrap_interval(b)
    assert paired[0] > 0 and paired[1] - paired[0] < 0.5 * (alone[1] - alone[0])
    for bad in (dict(values=[]), dict(values=np.ones((2, 3))), dict(values=[1.0], level=1.0),
                dict(values=[1.0], resamples=10)):
        with pytest.raises(ValueError):
            bootstrap_interval(**bad)


def test_a_choice_past_the_target_gets_a_rung_between_it_and_the_short_one_below():
    """A rung timed just under the target (noise) makes the next rung the choice, well past it: the
    search measures one rung between the two (their geometric mean), unless one near it was measured."""
    from dsm_export.search.engine_search import between_rung

    rows = [Candidate(rung=rung, precision=p, speedup=speed, divergence=0.01, agreement=0.95)
            for rung, p, speed in ((1.0, "fp32", 1.0), (1.7, "fp32", 1.57), (1.95, "fp32", 1.81), (1.6, "int8", 1.5))]
    chosen = rows[2]
    assert between_rung(rows, chosen, [1.7, 1.95], 1.6) == pytest.approx(np.sqrt(1.7 * 1.95), abs=1e-3)
    assert between_rung(rows, chosen, [1.7, 1.95, 1.83], 1.6) is None  # measured already
    assert between_rung(rows, replace(chosen, speedup=1.66), [1.7, 1.95], 1.6) is None  # only 4 % past the target
    assert between_rung(rows, replace(chosen, precision="bf16"), [1.7, 1.95], 1.6) is None  # nothing short below
    assert between_rung(rows, None, [1.7], 1.6) is None


def test_aimed_rungs_follow_the_measured_speed():
    """The engine search places each rung where a precision is predicted to reach the target: a
    log-log line through the points that bracket it, or speed proportional to FLOPs from one point."""
    from dsm_export.search.engine_search import aim_rung

    assert aim_rung([(1.0, 1.0)], 1.6) == pytest.approx(1.6)  # one point: speed in proportion to FLOPs
    assert aim_rung([(1.0, 1.5)], 1.6) == pytest.approx(1.6 / 1.5)
    assert aim_rung([(1.0, 2.0)], 1.6) == 1.05  # INT8 alone already reaches it: the gentlest rung
    # bracketed by 1.5x FLOPs -> 1.3x speed and 2.0x -> 1.8x (slope 1.13); the unmerged point is not used
    got = aim_rung([(1.0, 1.0), (2.0, 1.8), (1.5, 1.3)], 1.6)
    slope = np.log(1.8 / 1.3) / np.log(2.0 / 1.5)
    assert got == pytest.approx(1.5 * (1.6 / 1.3) ** (1 / slope))
    # a slope outside 0.5-1.2 (timing noise between close rungs) is held there
    assert aim_rung([(1.0, 1.0), (1.1, 1.5)], 2.0) == pytest.approx(1.1 * (2.0 / 1.5) ** (1 / 1.2))
    assert aim_rung([(1.0, 1.0)], 9.0) == 4.0
    with pytest.raises(ValueError):
        aim_rung([], 1.6)


def test_tune_backend_and_precision_mistakes_exit_2_before_any_work(tmp_path, capsys):
    """Refused from the arguments alone: no weights, images or runtime are looked at first."""
    common = ["tune", DEIT, "--weights", str(tmp_path / "missing.pth"), "--images", str(tmp_path / "none")]
    cases = [
        (["--target-flops-ratio", "1.5", "--backend", "openvino"], "--backend openvino needs --target-speedup"),
        (["--target-speedup", "1.6", "--backend", "openvino", "--export", str(tmp_path / "x.onnx")], "give a .xml"),
        (["--target-speedup", "1.6", "--backend", "openvino", "--precision", "int8-dynamic"],
         "not an OpenVINO precision"),
        (["--target-speedup", "1.6", "--precision", "bf16"], "not an ONNX Runtime precision"),
        (["--target-speedup", "1.6", "--export", str(tmp_path / "x.xml")], "needs --backend openvino"),
        (["--target-speedup", "1.6", "--backend", "openvino", "--provider", "cuda"], "--provider"),
        (["--target-flops-ratio", "1.5", "--mirror"], "--mirror is for --target-speedup"),
        (["--target-flops-ratio", "1.5", "--calibration", "8", "--calibration-count", "8"], "--calibration-count only"),
        (["--target-flops-ratio", "1.5", "--calibration-count", "500"], "--calibration-count must be"),
    ]
    for flags, needle in cases:
        assert main([*common, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, (flags, err)
    assert not list(tmp_path.iterdir())


def test_alternating_throughput_times_the_reference_before_every_engine():
    from dsm_export.search.timing import alternating_throughput

    calls = []
    runs = {k: (lambda k=k: calls.append(k)) for k in ("baseline", "a", "b")}
    rates = alternating_throughput(runs, batch=4, repeats=5, warmup=0, reference="baseline")
    assert calls == ["baseline", "a", "baseline", "b"] * 5 and set(rates) == set(runs)
    with pytest.raises(KeyError):
        alternating_throughput(runs, batch=4, reference="c")


def test_a_precision_dominated_at_every_rung_is_dropped_and_never_all():
    from dsm_export.search.engine_search import dominated_precisions

    def row(p, rung, speed, kl):
        return Candidate(precision=p, rung=rung, speedup=speed, divergence=kl, agreement=0.95, stride=1)

    # int8 slower and less accurate than fp32 at both rungs: dropped
    rows = [row("fp32", 1.0, 1.0, 0.0), row("int8", 1.0, 0.9, 0.01),
            row("fp32", 1.8, 1.6, 0.03), row("int8", 1.8, 1.4, 0.06)]
    assert dominated_precisions(rows, ["fp32", "int8"]) == ["int8"]
    # faster at one rung: kept
    rows[3].speedup = 1.7
    assert dominated_precisions(rows, ["fp32", "int8"]) == []
    # two identical precisions dominate each other: only one goes
    twins = [row("a", 1.0, 1.0, 0.0), row("b", 1.0, 1.0, 0.0)]
    assert dominated_precisions(twins, ["a", "b"]) == ["a"]


def test_a_precision_is_dropped_after_the_unmerged_rung_only_when_clearly_beaten():
    from dsm_export.search.engine_search import CLEAR_MARGIN, dominated_precisions

    def row(precision, speedup, kl, rung=1.0):
        return Candidate(precision=precision, speedup=speedup, divergence=kl, agreement=0.95, rung=rung)

    # OpenVINO on a CPU without VNNI: int8 28 % slower than f32 and less accurate
    rows = [row("fp32", 1.11, 0.0), row("int8", 0.80, 0.0088)]
    assert dominated_precisions(rows, ["fp32", "int8"], CLEAR_MARGIN) == ["int8"]
    # ONNX Runtime: static INT8 4 % slower than dynamic-all at the same KL is within one timing's noise
    rows = [row("int8", 1.78, 0.0035), row("int8-dynamic-all", 1.85, 0.0034)]
    assert dominated_precisions(rows, ["int8", "int8-dynamic-all"], CLEAR_MARGIN) == []
    assert dominated_precisions(rows, ["int8", "int8-dynamic-all"]) == ["int8"]  # the rule after merged rungs


def test_no_rung_is_aimed_past_one_that_reaches_the_target():
    """Run on a CPU with VNNI (OpenVINO, target 1.6): int8 at 1.08x fewer FLOPs timed slower than
    unmerged int8, and bf16 aimed far past it. Every aim lies past the rungs a precision fell short
    at, and no aim lies past a rung where an engine already reaches the target."""
    from dsm_export.search.candidates import Budget
    from dsm_export.search.engine_search import aim_rung, wanted_rungs

    def row(rung, precision, speedup, kl=0.01):
        return Candidate(rung=rung, flops_ratio=rung, precision=precision, speedup=speedup, divergence=kl,
                         agreement=0.95)

    rows = [row(1.0, "bf16", 1.09), row(1.0, "int8", 1.59), row(1.077, "bf16", 1.06), row(1.077, "int8", 1.41)]
    # speed fell with more merging: speed proportional to FLOPs from the most-merged point, not back to 1.05
    assert aim_rung([(1.0, 1.59), (1.077, 1.41)], 1.6) == pytest.approx(1.077 * 1.6 / 1.41)
    assert wanted_rungs(rows, ["bf16", "int8"], [1.077], 1.6) == pytest.approx(
        sorted([1.077 * 1.6 / 1.41, 1.077 * 1.6 / 1.06]))
    rows.append(row(1.22, "int8", 1.7, kl=0.02))  # int8 reaches it at 1.22: bf16's aim past it is dropped
    assert wanted_rungs(rows, ["bf16", "int8"], [1.077, 1.22], 1.6) == []
    # ... unless that engine is outside the accuracy budget
    assert len(wanted_rungs(rows, ["bf16", "int8"], [1.077, 1.22], 1.6, Budget(None, 0.015))) == 1


def test_alternating_throughput_keeps_the_pairs_timed_at_full_speed():
    """A slow stretch of a shared machine slows the reference and slows a merged engine more: with
    ``quiet`` those pairs are left out, repetitions go on until enough are kept, and a run with no
    quiet pair at all falls back to every pair."""
    import time

    from dsm_export.search.timing import alternating_throughput

    state = {"n": 0}  # repetitions 2-4 run in a slow stretch

    def reference():
        time.sleep(0.016 if 2 <= state["n"] <= 4 else 0.008)

    def engine():
        time.sleep(0.016 if 2 <= state["n"] <= 4 else 0.004)
        state["n"] += 1

    stats = {}
    rates = alternating_throughput({"baseline": reference, "merged": engine}, batch=8, repeats=5, warmup=0,
                                   reference="baseline", quiet=0.8, stats=stats)
    assert stats["kept"] == {"merged": 5} and stats["repetitions"] >= 8 and not stats["fallback"]
    assert rates["merged"] / rates["baseline"] == pytest.approx(2.0, rel=0.2)  # the quiet ratio, not 1
    # known full speed, every pair slow: times on to the limit, then counts every pair
    state["n"] = 2
    stats = {}
    alternating_throughput({"baseline": reference, "merged": engine}, batch=8, repeats=3, warmup=0,
                           reference="baseline", quiet=0.8, full_speed=8 / 0.008, max_repeats=3, stats=stats)
    assert stats["fallback"] and stats["repetitions"] == 3 and stats["kept"] == {"merged": 3}
    with pytest.raises(ValueError):
        alternating_throughput({"a": reference}, batch=8, quiet=0.9)


def test_tune_options_check_returns_a_resolved_frozen_copy(tmp_path):
    """check() leaves the options as given and returns every default resolved, one field per choice."""
    given = TuneOptions(model=DEIT, images=str(tmp_path), weights="w.pth", target_speedup=1.6, backend="openvino",
                        quick=True, calibration=16)
    quick = given.check()
    assert isinstance(quick, ResolvedTuneOptions) and quick.measured
    assert given.precision is None and given.calibration == 16 and given.calibration_count is None  # as given
    assert quick.precision == "auto" and quick.calibration_count == 16 and quick.mirror is False
    assert (quick.max_grid, quick.refine_steps, quick.rungs, quick.speed_floor) == (8, 4, 3, 0.0)
    assert quick.runtime_class.label == "OpenVINO" and quick.strides == (1,)
    assert not {"no_mirror", "calibration", "quick", "min_agreement", "max_kl", "no_progress"} & {
        f.name for f in dataclasses.fields(ResolvedTuneOptions)}
    for frozen in (given, quick):
        with pytest.raises(dataclasses.FrozenInstanceError):
            frozen.precision = "fp32"
    flops = TuneOptions(model=DEIT, images=str(tmp_path), weights="w.pth", target_flops_ratio=1.7, min_agreement=90,
                        max_kl=0.05, export=str(tmp_path / "x.onnx")).check()
    assert (flops.precision, flops.calibration_count, flops.mirror, flops.max_grid, flops.refine_steps) == (
        "fp32", 128, True, 48, 24)
    assert flops.speed_floor == 0.9 and flops.budget.min_agreement == 0.9 and flops.budget.max_divergence == 0.05
    assert dataclasses.replace(flops, export=None).export is None  # a resolved copy, not the options changed
    speed = TuneOptions(model=DEIT, images="i", pretrained=True, target_speedup=1.6, mirror=True, strides="1,2",
                        no_progress=True).check()
    assert (speed.mirror, speed.max_grid, speed.refine_steps, speed.rungs, speed.strides, speed.progress) == (
        True, 16, 8, 4, (1, 2), False)
    assert TuneOptions(model=DEIT, images="i", pretrained=True, target_flops_ratio=1.7, no_mirror=True).check().mirror is False


def test_a_tuned_engine_is_copied_with_every_file_of_it_the_engine_last(tmp_path, monkeypatch):
    """--export takes every file of the chosen engine (the registry's engine_files): companions first, renamed
    after the export where they carry the engine's name, the engine file last, each through atomic_path."""
    work = tmp_path / "work"
    work.mkdir()
    files = [work / "ov_int8_r1.xml", work / "ov_int8_r1.bin", work / "shared.cache"]
    for f in files:
        f.write_text(f.name)
    monkeypatch.setattr(tuning, "engine_files", lambda path: tuple(str(f) for f in files))
    written, real = [], tuning.atomic_path

    @contextlib.contextmanager
    def recording(path):
        with real(path) as tmp:
            yield tmp
        written.append(os.path.basename(path))

    monkeypatch.setattr(tuning, "atomic_path", recording)
    tuning.copy_engine(str(files[0]), str(tmp_path / "tuned.xml"))
    assert written == ["tuned.bin", "shared.cache", "tuned.xml"]
    assert [(tmp_path / n).read_text() for n in written] == ["ov_int8_r1.bin", "shared.cache", "ov_int8_r1.xml"]


def test_a_measured_target_keeps_within_the_default_guard_unless_lifted():
    """--target-speedup without --max-kl or --min-agreement keeps within KL <= SPEEDUP_MAX_KL, said as
    the default guard; --max-kl inf lifts it; a bound the user gives replaces it; FLOP targets have none."""
    def budget(**kw):
        return TuneOptions(model=DEIT, images="i", pretrained=True, **kw).check().budget

    guard = budget(target_speedup=1.6)
    assert guard.max_divergence == SPEEDUP_MAX_KL and guard.min_agreement is None and guard.guard
    assert guard.describe() == f"KL <= {SPEEDUP_MAX_KL:g} (the default guard of a measured target; --max-kl inf lifts it)"
    assert budget(target_speedup=1.6, max_kl=float("inf")) == Budget()
    assert budget(target_speedup=1.6, max_kl=0.1) == Budget(None, 0.1)
    assert budget(target_speedup=1.6, min_agreement=90) == Budget(0.9, None)
    assert budget(target_flops_ratio=1.6) == Budget()
    assert not Budget(None, 0.05).admits({"agreement": 1.0, "divergence": 0.41})


def test_a_miss_names_the_engine_that_reached_the_target_only_past_the_budget(capsys):
    """No engine reached the target within the budget, but one did outside it: the one line says so."""
    from dsm_export.cli.tune import _missed

    opts = TuneOptions(model=DEIT, images="i", pretrained=True, target_speedup=1.6).check()
    within = {"speedup": 1.31, "divergence": 0.021, "agreement": 0.96, "precision": "int8", "spec": "r=16"}
    past = {"speedup": 1.65, "divergence": 0.412, "agreement": 0.76, "precision": "bf16", "spec": "r=40"}
    rep = TuneReport(schedule=None, precision=None, divergence="KL", agreement_name="agreement",
                     budget=opts.budget.describe(), target="a 1.60x measured speed-up", measured=True, depth=12,
                     calibration_files=["a"] * 8, fastest_within_budget=within, fastest_past_budget=past)
    assert _missed(rep, opts) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "within KL <= 0.05 (the default guard" in err
    assert "the fastest within it: 1.31x, KL 0.0210" in err
    assert "reached only past the budget: 1.65x, KL 0.4120, agreement 76.0 % (bf16, r=40)" in err
