"""Schedule search on real weights and photos (small budget)."""

import json

from dsm_export.cli import main
from dsm_export.evaluate import flops_ratio, model_logits, schedule_metrics
from dsm_export.schedule import Schedule
from dsm_export.tune import pareto_front, tune

from conftest import DEIT


def test_tune_meets_target_and_beats_constant_r(deit, pixels):
    result = tune(deit, pixels, 1.7, max_grid=10, refine_steps=4, progress=False)
    assert flops_ratio(deit, result.best) >= 1.7
    # ToMe's constant r=13 (1.74x) is a grid candidate, always evaluated: the search can only do better.
    tome = schedule_metrics(deit, Schedule(r=13), pixels, model_logits(deit, pixels))
    assert result.best_metrics["kl"] <= tome["kl"]
    assert result.pareto and all(r in result.evaluated for r in result.pareto)


def test_tune_grid_goes_coarse_to_fine(deit, pixels):
    """Past ``max_grid`` candidates: half spread over the grid with ToMe's constant r among them,
    then each next schedule the unevaluated one nearest the best so far."""
    from dsm_export.tune import grid_candidates, grid_distance, spread_sample

    cands = grid_candidates(deit, 1.7, 0.05)
    first, rest = spread_sample(cands, 4)
    assert len(cands) > 8 and len(first) + len(rest) == len(cands)
    tome = [s for s in cands if s.spec() == f"r={s.r}"]
    assert tome and all(s in first for s in tome)
    result = tune(deit, pixels[:4], 1.7, max_grid=8, refine_steps=0, progress=False, variants=False)
    specs = [m["spec"] for m in result.evaluated]
    assert len(specs) == 8 and specs[:len(first)] == [s.spec() for s in first]
    by_spec = {s.spec(): s for s in cands}
    for k in range(len(first), 8):  # each fine-stage pick is nearest the best of those before it
        seen = result.evaluated[:k]
        best = by_spec[min(seen, key=lambda m: (m["kl"], -m["top1_agreement"]))["spec"]]
        left = [s for s in cands if s.spec() not in specs[:k]]
        assert grid_distance(by_spec[specs[k]], best) == min(grid_distance(s, best) for s in left)


def test_pareto_front():
    rows = [{"flops_ratio": 1.5, "kl": 0.02}, {"flops_ratio": 1.7, "kl": 0.05},
            {"flops_ratio": 1.6, "kl": 0.06}, {"flops_ratio": 1.7, "kl": 0.04}]
    assert pareto_front(rows) == [rows[0], rows[3]]


def test_tune_cli(deit, weights, images_dir, tmp_path, capsys):
    out = tmp_path / "schedule.json"
    code = main(["tune", DEIT, "--weights", weights, "--images", images_dir, "--target-flops-ratio", "1.5",
                 "--calibration", "8", "--holdout", "8", "--max-grid", "4", "--refine-steps", "2",
                 "--output", str(out), "--no-progress"])
    assert code == 0
    assert "held apart (8 images)" in capsys.readouterr().out
    schedule = Schedule.parse(str(out))
    assert flops_ratio(deit, schedule) >= 1.5
    assert json.loads(out.read_text())["blocks"]
