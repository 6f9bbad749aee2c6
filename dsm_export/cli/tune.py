"""Subcommand ``tune``: the schedule (and precision) with the least KL (1 - cosine for embedding
models) at a FLOP or speed-up target."""

from __future__ import annotations

import argparse
import json
import sys

from ..search.runtimes import RUNTIMES, TUNE_PRECISIONS
from ..search.tuning import TuneOptions, tune
from ._common import add_weights_args


def add(sub):
    """Add the ``tune`` subcommand to ``sub`` (argparse subparsers)."""
    p = sub.add_parser("tune", help="search the schedule (x precision) with the least KL at a FLOP or speed-up target")
    p.add_argument("model", help="timm model name, or a Hugging Face Transformers model (a save_pretrained folder, or a hub id in the local cache)")
    add_weights_args(p)
    p.add_argument("--images", required=True, help="image folder; calibration and held-apart images")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-flops-ratio", type=float, help="e.g. 1.7 for 1.7x fewer FLOPs")
    target.add_argument("--target-speedup", type=float,
                        help="speed-up measured on this machine over the fastest unmerged engine of --backend: ONNX "
                             "Runtime's fp32 unmerged model (timm's arithmetic: every block on every token), or "
                             "OpenVINO's default compile of it")
    p.add_argument("--precision", choices=TUNE_PRECISIONS, default=None,
                   help="engine precision. onnxruntime (default fp32): fp32, int8 (static QDQ, TensorRT-compatible), "
                        "int8-dynamic (dynamic quantization, first block fp32), int8-dynamic-all (dynamic, every "
                        "layer quantized), or auto (all four; --target-speedup only), every INT8 form smoothed "
                        "first (SmoothQuant). openvino (default auto: bf16, or fp32 on a CPU without BF16, and int8): fp32 (f32 forced), bf16 "
                        "(OpenVINO's default on a CPU with BF16), int8 (NNCF, matching path kept out)")
    p.add_argument("--export", metavar="OUT.onnx", help="write the chosen engine here, ready to serve")
    p.add_argument("--min-speed-per-flop", type=float, default=None, metavar="Q",
                   help="--target-flops-ratio with --export: time the least-KL candidates with ONNX Runtime "
                        "(fp32, paired with timm's unmerged model) and keep the least-KL one whose measured "
                        "speed-up is at least Q times its FLOP ratio in its lower quartile, i.e. in about "
                        "three timings in four (default 0.9; 0 turns the check off)")
    p.add_argument("--speed-candidates", type=int, default=6, metavar="N",
                   help="schedules the speed check times at most, least KL first (default 6)")
    p.add_argument("--min-agreement", type=float, metavar="PCT",
                   help="accuracy budget: choose only an engine whose top-1 agreement with the unmerged model "
                        "(retrieval overlap for embedding models) on the calibration images (with --target-flops-ratio "
                        "also their mirror images, unless --no-mirror) is at least PCT %%")
    p.add_argument("--max-kl", type=float, metavar="K",
                   help="accuracy budget: choose only an engine whose KL to the unmerged model (1 - cosine "
                        "for embedding models) on the calibration images (as --min-agreement) is at most K; "
                        "--target-speedup without either bound keeps within KL <= 0.05 (a guard: inf lifts it)")
    p.add_argument("--backend", default="onnxruntime", choices=tuple(RUNTIMES),
                   help="runtime the engines are built and measured in with --target-speedup (openvino: an IR, "
                        "--export X.xml; needs the openvino extra)")
    p.add_argument("--quick", action="store_true",
                   help="a faster search that gives up: half the calibration images (64: a noisier KL, a choice "
                        "fitted to fewer photos), their mirror images (--target-flops-ratio), one of the four "
                        "rungs (--target-speedup) and half the schedules searched")
    p.add_argument("--provider", default="cpu",
                   help="ONNX Runtime execution provider timed by --target-speedup and the speed check: cpu, cuda, tensorrt, openvino "
                        "or a full name (default cpu)")
    p.add_argument("--calibration-count", type=int, default=None,
                   help="calibration images taken from --images (at most 128; default 128, 64 with --quick)")
    p.add_argument("--calibration", type=int, default=None, help=argparse.SUPPRESS)  # the old name of --calibration-count
    p.add_argument("--no-mirror", action="store_true",
                   help="--target-flops-ratio: score schedules on the calibration images only, not also on their "
                        "horizontal mirror images (half the search time; the choice fits the calibration photos "
                        "more closely and new photos less)")
    p.add_argument("--mirror", action="store_true",
                   help="--target-speedup: also score schedules on the mirror images (off by default there: every "
                        "engine's KL is measured on the calibration images, and mirrors double the search time)")
    p.add_argument("--holdout", type=int, default=None, help="held-apart images (default: all the rest)")
    p.add_argument("--max-grid", type=int, default=None,
                   help="grid schedules per search, half spread over the grid and half nearest the best "
                        "so far (default 48; 16 per rung with --target-speedup)")
    p.add_argument("--refine-steps", type=int, default=None, help="per-block moves (default 24; 8 per rung)")
    p.add_argument("--rungs", type=int, default=None,
                   help="merged FLOP-ratio rungs measured at most, each placed where a precision is predicted to "
                        "reach the target (--target-speedup; default 4, 3 with --quick; each is one export)")
    p.add_argument("--repeats", type=int, default=5, help="timing repetitions, median taken (at least 5)")
    p.add_argument("--strides", default="1",
                   help="merge strides tried at each rung with --target-speedup (default 1, every merging "
                        "block; 1,2 also tries merging in every second one with r raised to the same FLOPs, "
                        "which doubles the search)")
    p.add_argument("--output", "-o", help="write the chosen schedule as JSON here")
    p.add_argument("--report", help="write the full report (Pareto front, held-apart metrics) as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out images that cannot be decoded (counted in the report) instead of stopping")
    p.set_defaults(func=run)


def run(args) -> int:
    """Tune (:func:`dsm_export.search.tuning.tune`) and print the choice; 1 when nothing reached the target."""
    opts = TuneOptions.from_namespace(args).check()
    rep = tune(opts)
    div, agree = rep.divergence, rep.agreement_name
    n_calib, n_held = len(rep.calibration_files), rep.held_apart_images
    if rep.schedule is None:
        return _missed(rep, opts)
    schedule, cal, held = rep.schedule, rep.calibration, rep.held_apart
    print(f"chosen: {schedule.spec()}, {rep.precision}")
    print(json.dumps(schedule.to_dict(rep.depth)))
    if rep.budget:
        print(f"accuracy budget on the calibration images: {rep.budget} (kept)")
    if rep.measured:
        runs, mach = cal.get("speedup_runs"), rep.machine
        timing = (f"mean of {len(runs)} runs timed apart, {', '.join(f'{x:.2f}x' for x in runs)}, each the median "
                  f"of {opts.repeats}" if runs else f"median of {opts.repeats}")
        runtime = opts.runtime_class
        print(f"measured {runtime.label} speed-up: {cal['speedup']:.2f}x over {runtime.baseline_label} "
              f"(batch 32, {timing}, {mach['cpu']}, {mach['threads']} threads)")
        if "speedup_onnxruntime" in cal:
            print(f"  and {cal['speedup_onnxruntime']:.2f}x over ONNX Runtime's fp32 unmerged model, timed in "
                  f"the same runs (OpenVINO's baseline runs {mach['baseline_precision']})")
        if mach.get("phase_seconds"):
            print("search time by phase: " + ", ".join(f"{k} {v:.0f} s" for k, v in mach["phase_seconds"].items()))
        if mach.get("quiet"):
            print(f"timing: {mach['timing_runs']} alternating runs, {mach['repetitions']} repetitions; a pair counts "
                  f"where the baseline ran at {mach['quiet']:.0%} or more of its full speed (runs with no such pair, "
                  f"every pair counted: {mach['fallbacks']})")
    elif "speed_per_flop" in cal:
        print(f"measured ONNX Runtime speed-up (fp32): {cal['speedup']:.2f}x, {cal['speed_per_flop']:.2f} of "
              f"the FLOP ratio, lower quartile {cal['speed_per_flop_low']:.2f} (speed check above)")
    views = " and their mirror images" if opts.mirror and not rep.measured else ""
    print(f"calibration ({n_calib} images{views}): {div} {cal['divergence']:.4f}, "
          f"{agree} {100 * cal['agreement']:.1f} %, {cal['flops_ratio']:.2f}x fewer FLOPs")
    acc = held.get("top1_accuracy")
    print(f"held apart ({n_held} images): {div} {held['divergence']:.4f}, {agree} {100 * held['agreement']:.1f} %"
          + (f", top-1 {100 * acc:.1f} % (unmerged {100 * held['baseline_top1_accuracy']:.1f} %)"
             if acc is not None else ""))
    if rep.budget and not opts.budget.admits(held):
        print(f"note: on the held-apart images the engine misses the budget ({rep.budget}): scores on the "
              "images a choice was made on are optimistic")
    _print_variants(rep, div, agree)
    _print_front(rep, opts.budget)
    if rep.exported:
        print(f"wrote {rep.exported}: {rep.precision}, {schedule.spec()}")
    skipped = rep.skipped_unreadable
    if skipped:
        print(f"skipped {len(skipped)} unreadable images: {', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}")
    return 0


def _print_variants(rep, div: str, agree: str) -> None:
    """The variant stage: calibration and held-apart scores of each merge variant, and the winner."""
    if not rep.variants:
        return
    print(f"merge variants on the best grid schedule ({div}: calibration / held apart):")
    for row in rep.variants:
        held_div = f"{row['held_divergence']:.4f}" if "held_divergence" in row else "-"
        print(f"  {row['variant']:<22} {div} {row['divergence']:.4f} / {held_div}  "
              f"{agree} {100 * row['agreement']:.1f} %  {row['spec']}")
    winner = rep.winning_variant
    plain = rep.variants[0]
    if winner is not plain and "held_divergence" in winner:
        print(f"variant {winner['variant']} won: held-apart {div} {winner['held_divergence']:.4f} against "
              f"{plain['held_divergence']:.4f} for the plain schedule "
              f"({100 * (winner['held_divergence'] / plain['held_divergence'] - 1):+.0f} %)")
    else:
        print("no variant beat the plain schedule on the calibration images")


def _print_front(rep, budget) -> None:
    """The search's Pareto front, one row per line; rows outside the accuracy ``budget``
    (:class:`~dsm_export.search.candidates.Budget`) are marked (one printed at 93.0 % may hold 92.97 %)."""
    div, agree = rep.divergence, rep.agreement_name

    def outside(row) -> str:
        return "" if budget.admits(row) else "  (outside the budget)"

    if rep.measured:
        ort = any("speedup_onnxruntime" in row for row in rep.pareto)
        print(f"Pareto front (calibration {div} against measured speed-up): speed-up"
              f"{' (over ONNX Runtime fp32)' if ort else ''}, {div}, {agree}, precision, schedule")
        for row in rep.pareto:
            also = f" ({row['speedup_onnxruntime']:.2f}x)" if "speedup_onnxruntime" in row else ""
            print(f"  {row['speedup']:.2f}x{also}  {div} {row['divergence']:.4f}  {100 * row['agreement']:.1f} %  "
                  f"{row['precision']}  {row['spec']}{outside(row)}")
    else:
        print(f"Pareto front (calibration): FLOPs reduction, {div}, {agree}, schedule")
        for row in rep.pareto:
            print(f"  {row['flops_ratio']:.3f}x  {div} {row['divergence']:.4f}  {100 * row['agreement']:.1f} %  "
                  f"{row['spec']}{outside(row)}")


def _missed(rep, opts) -> int:
    """No engine reached the target within the accuracy budget: print the front and the best the
    search did find (tune wrote ``--report`` with ``schedule`` null, and no engine), exit 1."""
    div, agree = rep.divergence, rep.agreement_name
    _print_front(rep, opts.budget)
    best = rep.fastest_within_budget
    if rep.measured:
        label = "the fastest within it" if rep.budget else "the fastest"
        found = ("none of the engines measured" if best is None else
                 f"{label}: {best['speedup']:.2f}x, {div} {best['divergence']:.4f}, "
                 f"{agree} {100 * best['agreement']:.1f} % ({best['precision']}, {best['spec']})")
    else:
        found = (f"the least-{div} schedule at the target: {div} {rep.calibration['divergence']:.4f}, {agree} "
                 f"{100 * rep.calibration['agreement']:.1f} % ({rep.nearest})")
    within = f" within {rep.budget}" if rep.budget else ""
    past = rep.fastest_past_budget
    if past:  # the target was reached, but only outside the budget
        found += (f"; reached only past the budget: {past['speedup']:.2f}x, {div} {past['divergence']:.4f}, "
                  f"{agree} {100 * past['agreement']:.1f} % ({past['precision']}, {past['spec']})")
    print(f"dsm-export: no {'engine' if rep.measured else 'schedule'} reached {rep.target}{within} on the "
          f"{len(rep.calibration_files)} calibration images; {found}", file=sys.stderr)
    return 1
