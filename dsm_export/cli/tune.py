"""Subcommand ``tune``: the schedule (and precision) with the least KL (1 - cosine for embedding
models) at a FLOP or speed-up target."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from ..errors import DSMError
from ._common import add_weights_args, model_from_args


def add(sub):
    p = sub.add_parser("tune", help="search the schedule (x precision) with the least KL at a FLOP or speed-up target")
    p.add_argument("model", help="timm model name")
    add_weights_args(p)
    p.add_argument("--images", required=True, help="image folder; calibration and held-apart images")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-flops-ratio", type=float, help="e.g. 1.7 for 1.7x fewer FLOPs")
    target.add_argument("--target-speedup", type=float,
                        help="speed-up measured on this machine over the fastest unmerged engine of --backend: ONNX "
                             "Runtime's fp32 unmerged model (timm's arithmetic: every block on every token), or "
                             "OpenVINO's default compile of it")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8", "int8-dynamic", "int8-dynamic-all", "auto"),
                   default=None,
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
                        "for embedding models) on the calibration images (as --min-agreement) is at most K")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "openvino"),
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


def _check(args) -> None:
    """Every user mistake, before minutes of search."""
    target = args.target_flops_ratio or args.target_speedup
    if not 1.0 < target < 10:
        raise DSMError(f"the target must be above 1, got {target}")
    if args.calibration is not None:  # the old spelling: a count, where build's --calibration is a folder
        if args.calibration_count is not None:
            raise DSMError("give --calibration-count only (--calibration N is its old name)")
        args.calibration_count = args.calibration
    openvino = args.backend == "openvino"
    if args.precision is None:
        args.precision = "auto" if openvino and args.target_speedup else "fp32"
    ov_precisions, ort_precisions = ("fp32", "bf16", "int8", "auto"), ("fp32", "int8", "int8-dynamic",
                                                                       "int8-dynamic-all", "auto")
    if args.precision not in (ov_precisions if openvino else ort_precisions):
        raise DSMError(f"--precision {args.precision} is not a{'n OpenVINO' if openvino else 'n ONNX Runtime'} "
                       f"precision: choose one of {', '.join(ov_precisions if openvino else ort_precisions)}")
    if openvino:
        if not args.target_speedup:
            raise DSMError("--backend openvino needs --target-speedup (it measures OpenVINO engines)")
        if args.export and not args.export.endswith(".xml"):
            raise DSMError(f"--export {args.export!r}: an OpenVINO engine is an IR, give a .xml path")
        if args.provider != "cpu":
            raise DSMError("--provider is an ONNX Runtime execution provider: not with --backend openvino")
    elif args.export and args.export.endswith(".xml"):
        raise DSMError(f"--export {args.export!r}: an .xml engine needs --backend openvino")
    if args.calibration_count is None:
        args.calibration_count = 64 if args.quick else 128
    if args.rungs is None:
        args.rungs = 3 if args.quick else 4
    if args.mirror and not args.target_speedup:
        raise DSMError("--mirror is for --target-speedup (--target-flops-ratio scores mirror images unless --no-mirror)")
    if args.target_speedup:
        args.no_mirror = not args.mirror
    if args.quick:
        args.no_mirror = True
        args.max_grid = args.max_grid or (8 if args.target_speedup else 24)
        args.refine_steps = args.refine_steps if args.refine_steps is not None else (4 if args.target_speedup else 12)
    if not 1 <= args.calibration_count <= 128:
        raise DSMError("--calibration-count must be between 1 and 128 images")
    if args.precision == "auto" and not args.target_speedup:
        raise DSMError("--precision auto needs --target-speedup (FLOPs do not change with precision)")
    if args.repeats < 5:
        raise DSMError("--repeats must be at least 5 (the median of 5 or more runs)")
    if args.min_speed_per_flop is not None:
        if not args.target_flops_ratio or not args.export:
            raise DSMError("--min-speed-per-flop needs --target-flops-ratio and --export (it times the exported "
                           "candidates; --target-speedup measures speed itself)")
        if not 0 <= args.min_speed_per_flop <= 2:
            raise DSMError(f"--min-speed-per-flop must be between 0 and 2, got {args.min_speed_per_flop:g}")
    if args.speed_candidates < 1:
        raise DSMError(f"--speed-candidates must be at least 1, got {args.speed_candidates}")
    if args.rungs < 1:
        raise DSMError("--rungs must be at least 1")
    args.strides = _strides(args.strides)
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 100:
        raise DSMError(f"--min-agreement is a percentage from 0 to 100, got {args.min_agreement:g}")
    if args.max_kl is not None and not args.max_kl >= 0:
        raise DSMError(f"--max-kl must be 0 or more, got {args.max_kl:g}")
    from ..engine_search import Budget

    args.budget = Budget(None if args.min_agreement is None else args.min_agreement / 100.0, args.max_kl)
    for path in (args.output, args.report, args.export):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise DSMError(f"output folder of {path!r} does not exist")


def _strides(text) -> tuple[int, ...]:
    """``--strides 1,2`` as ``(1, 2)``.

    Raises:
        DSMError: anything but distinct whole numbers from 1 to 6.
    """
    try:
        out = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        out = ()
    if not out or any(not 1 <= k <= 6 for k in out) or len(set(out)) != len(out):
        raise DSMError(f"--strides {text!r}: expected distinct whole numbers from 1 to 6, e.g. 1,2")
    return out


def run(args) -> int:
    from ..data import list_images, split_calibration
    from ..evaluate import divergence_name, load_pixels, model_logits, schedule_metrics
    from ..fileio import write_json
    from .. import checks

    _check(args)
    for path, what in ((args.output, "--output"), (args.report, "--report"), (args.export, "--export")):
        checks.output_file(path, what)  # fail before minutes of search, not after
    checks.input_file(args.weights, "weights file")
    args.runtime = None
    if args.target_speedup:
        from ..engine_runtimes import make_runtime

        # OpenVINO missing or an unavailable provider: fail before minutes of search, not after
        args.runtime = make_runtime(args.backend, args.provider, batch=32, repeats=args.repeats)
        if args.precision == "bf16" and not args.runtime.bf16:
            raise DSMError("--precision bf16: this CPU has no BF16 (AVX-512 BF16 or AMX), OpenVINO would run "
                           "it as f32; tune fp32 here, or on the CPU that will serve it")
    if _speed_floor(args):
        from ..providers import resolve_providers

        resolve_providers(args.provider)
    images, skipped = checks.readable_images(list_images(args.images), args.skip_unreadable)
    model = model_from_args(args, args.model, require_weights=True)
    if len(images) < args.calibration_count + 1:
        raise DSMError(f"{args.images} holds {len(images)} images: need more than --calibration-count")
    calib, held = split_calibration(images, args.calibration_count)
    if args.holdout:
        held = held.subset(range(min(args.holdout, len(held))))
    calib_pixels = load_pixels(calib, model)
    held_pixels = load_pixels(held, model)
    base = model_logits(model, held_pixels)
    depth = len(model.blocks)
    with tempfile.TemporaryDirectory(prefix="dsm-tune-") as work:
        if args.target_speedup:
            report, chosen_path = _search_engines(args, model, calib_pixels, work)
        else:
            report, chosen_path = _search_flops(args, model, calib_pixels, work)
        div = divergence_name(model)
        agree = "agreement" if div == "KL" else "retrieval overlap"
        schedule = report["schedule_obj"]
        if schedule is None:  # nothing reached the target within the budget: say what did, write no engine
            return _missed(args, report, div, agree, len(calib), len(held), skipped)
        if chosen_path:  # the engine as it will be served, on photos the search never saw
            from ..engine_search import ort_logits
            from ..models import is_embedding_model
            from ..validate import output_metrics

            outputs = (args.runtime.outputs(chosen_path, held_pixels.numpy()) if args.runtime
                       else ort_logits(chosen_path, held_pixels.numpy()))
            held_metrics = output_metrics(outputs, base, held.labels, embeddings=is_embedding_model(model))
            held_metrics["flops_ratio"] = report["calibration"]["flops_ratio"]
        else:
            held_metrics = schedule_metrics(model, schedule, held_pixels, base, held.labels)
        if div != "KL":
            agree = f"retrieval overlap@{held_metrics.get('knn_k', 5)}"
        print(f"chosen: {schedule.spec()}, {report['precision']}")
        print(json.dumps(schedule.to_dict(depth)))
        budget = args.budget.describe(div, agree)
        if budget:
            print(f"accuracy budget on the calibration images: {budget} (kept)")
        cal = report["calibration"]
        measured = bool(args.target_speedup)
        if measured:
            runs = cal.get("speedup_runs")
            timing = (f"mean of two runs timed apart, {runs[0]:.2f}x and {runs[1]:.2f}x, each the median of "
                      f"{args.repeats}" if runs else f"median of {args.repeats}")
            rt = args.runtime
            print(f"measured {rt.label} speed-up: {cal['speedup']:.2f}x over {rt.baseline_label} "
                  f"(batch 32, {timing}, {report['machine']['cpu']}, {report['machine']['threads']} threads)")
            if "speedup_onnxruntime" in cal:
                print(f"  and {cal['speedup_onnxruntime']:.2f}x over ONNX Runtime's fp32 unmerged model, timed in "
                      f"the same runs (OpenVINO's baseline runs {report['machine']['baseline_precision']})")
        elif "speed_per_flop" in cal:
            print(f"measured ONNX Runtime speed-up (fp32): {cal['speedup']:.2f}x, {cal['speed_per_flop']:.2f} of "
                  f"the FLOP ratio, lower quartile {cal['speed_per_flop_low']:.2f} (speed check above)")
        views = "" if args.no_mirror or measured else " and their mirror images"
        print(f"calibration ({len(calib)} images{views}): {div} {cal['divergence']:.4f}, "
              f"{agree} {100 * cal['agreement']:.1f} %, {cal['flops_ratio']:.2f}x fewer FLOPs")
        acc = held_metrics.get("top1_accuracy")
        print(f"held apart ({len(held)} images): {div} {held_metrics['divergence']:.4f}, "
              f"{agree} {100 * held_metrics['agreement']:.1f} %"
              + (f", top-1 {100 * acc:.1f} % (unmerged {100 * held_metrics['baseline_top1_accuracy']:.1f} %)"
                 if acc is not None else ""))
        if budget and not args.budget.admits(held_metrics):
            print(f"note: on the held-apart images the engine misses the budget ({budget}): scores on the "
                  "images a choice was made on are optimistic")
        variants = _judge_variants(report.get("variants") or [], model, held_pixels, base, held.labels)
        if variants:
            print(f"merge variants on the best grid schedule ({div}: calibration / held apart):")
            for row in variants:
                held_div = f"{row['held_divergence']:.4f}" if "held_divergence" in row else "-"
                print(f"  {row['variant']:<22} {div} {row['divergence']:.4f} / {held_div}  "
                      f"{agree} {100 * row['agreement']:.1f} %  {row['spec']}")
            winner = min(variants, key=lambda r: (r["divergence"], -r["agreement"]))
            plain = variants[0]
            if winner is not plain and "held_divergence" in winner:
                print(f"variant {winner['variant']} won: held-apart {div} {winner['held_divergence']:.4f} against "
                      f"{plain['held_divergence']:.4f} for the plain schedule "
                      f"({100 * (winner['held_divergence'] / plain['held_divergence'] - 1):+.0f} %)")
            else:
                print("no variant beat the plain schedule on the calibration images")
        _print_front(report, measured, div, agree, args.budget)
        if args.export:
            from ..fileio import atomic_path

            if chosen_path.endswith(".xml"):  # the weights first: a .xml never names a missing .bin
                with atomic_path(args.export[:-4] + ".bin") as tmp:
                    shutil.copyfile(chosen_path[:-4] + ".bin", tmp)
            with atomic_path(args.export) as tmp:
                shutil.copyfile(chosen_path, tmp)
            print(f"wrote {args.export}: {report['precision']}, {schedule.spec()}")
    if skipped:
        print(f"skipped {len(skipped)} unreadable images: {', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}")
    if args.output:
        write_json(args.output, {**schedule.to_dict(depth), "spec": schedule.spec(), "precision": report["precision"]})
    if args.report:
        write_json(args.report, {
            "schedule": schedule.spec(), "precision": report["precision"], "divergence": div,
            "budget": budget or None, "calibration": report["calibration"],
            "held_apart": held_metrics, "pareto": report["pareto"], "evaluated": report["evaluated"],
            "variants": variants, "speed_check": report.get("speed_check"),
            "machine": report.get("machine"), "calibration_files": list(calib.files),
            "held_apart_images": len(held), "skipped_unreadable": skipped})
    return 0


def _print_front(report: dict, measured: bool, div: str, agree: str, budget) -> None:
    """The search's Pareto front, one row per line; the rows outside the accuracy ``budget``
    (:class:`~dsm_export.engine_search.Budget`) are marked (a row printed at 93.0 % may hold
    92.97 %)."""
    def outside(row) -> str:
        return "" if budget.admits(row) else "  (outside the budget)"

    if measured:
        ort = any("speedup_onnxruntime" in row for row in report["pareto"])
        print(f"Pareto front (calibration {div} against measured speed-up): speed-up"
              f"{' (over ONNX Runtime fp32)' if ort else ''}, {div}, {agree}, precision, schedule")
        for row in report["pareto"]:
            also = f" ({row['speedup_onnxruntime']:.2f}x)" if "speedup_onnxruntime" in row else ""
            print(f"  {row['speedup']:.2f}x{also}  {div} {row['divergence']:.4f}  {100 * row['agreement']:.1f} %  "
                  f"{row['precision']}  {row['spec']}{outside(row)}")
    else:
        print(f"Pareto front (calibration): FLOPs reduction, {div}, {agree}, schedule")
        for row in report["pareto"]:
            print(f"  {row['flops_ratio']:.3f}x  {div} {row['divergence']:.4f}  {100 * row['agreement']:.1f} %  "
                  f"{row['spec']}{outside(row)}")


def _missed(args, report: dict, div: str, agree: str, n_calib: int, n_held: int, skipped) -> int:
    """No engine reached the target within the accuracy budget: print the front and the best the
    search did find, write ``--report`` (``schedule`` null), write no engine or schedule, exit 1."""
    from ..fileio import write_json

    measured = bool(args.target_speedup)
    target = (f"a {args.target_speedup:.2f}x measured speed-up" if measured
              else f"{args.target_flops_ratio:.2f}x fewer FLOPs")
    budget = args.budget.describe(div, agree)
    _print_front(report, measured, div, agree, args.budget)
    best = report.get("fastest_within")
    if measured:
        label = "the fastest within it" if budget else "the fastest"
        found = ("none of the engines measured" if best is None else
                 f"{label}: {best['speedup']:.2f}x, {div} {best['divergence']:.4f}, "
                 f"{agree} {100 * best['agreement']:.1f} % ({best['precision']}, {best['spec']})")
    else:
        cal = report["calibration"]
        found = (f"the least-{div} schedule at the target: {div} {cal['divergence']:.4f}, {agree} "
                 f"{100 * cal['agreement']:.1f} % ({report['spec']})")
    if args.report:
        write_json(args.report, {
            "schedule": None, "precision": None, "divergence": div, "target": target, "budget": budget or None,
            "fastest_within_budget": best, "pareto": report["pareto"], "evaluated": report["evaluated"],
            "machine": report.get("machine"), "calibration_images": n_calib, "held_apart_images": n_held,
            "skipped_unreadable": skipped})
    within = f" within {budget}" if budget else ""
    print(f"dsm-export: no {'engine' if measured else 'schedule'} reached {target}{within} on the {n_calib} "
          f"calibration images; {found}",
          file=sys.stderr)
    return 1


def _speed_floor(args) -> float:
    """The speed check's floor (:mod:`..speed_check`): ``--min-speed-per-flop``, by default 0.9 with
    ``--target-flops-ratio`` and ``--export``, else 0 (no check)."""
    from ..speed_check import SPEED_PER_FLOP

    if args.min_speed_per_flop is not None:
        return args.min_speed_per_flop
    return SPEED_PER_FLOP if args.target_flops_ratio and args.export else 0.0


def _search_flops(args, model, calib_pixels, work: str) -> tuple[dict, str | None]:
    """``--target-flops-ratio``: the PyTorch schedule search; with ``--export`` the speed check
    (:func:`..speed_check.speed_check`) and the chosen schedule exported (and quantized)."""
    from ..export import export_model
    from ..tune import tune

    result = tune(model, calib_pixels, args.target_flops_ratio, max_grid=args.max_grid or 48,
                  refine_steps=args.refine_steps if args.refine_steps is not None else 24,
                  progress=not args.no_progress, mirror=not args.no_mirror)
    if not args.budget.admits(result.best_metrics):
        return {"schedule_obj": None, "spec": result.best.spec(), "calibration": result.best_metrics,
                "pareto": result.pareto, "evaluated": result.evaluated}, None
    report = {"schedule_obj": result.best, "precision": args.precision, "calibration": result.best_metrics,
              "pareto": result.pareto, "evaluated": result.evaluated, "variants": result.variants}
    path = None
    if args.export:
        floor = _speed_floor(args)
        path = os.path.join(work, "fp32.onnx")
        if floor:
            path = _speed_checked(args, model, result, report, floor, work) or path
        if not os.path.exists(path):
            export_model(model, args.model, path, report["schedule_obj"], weights=args.weights,
                         pretrained=args.pretrained, num_classes=args.num_classes)
        if args.precision != "fp32":
            from ..engine_search import precision_options
            from ..quantize import quantize_int8

            quantize_int8(path, os.path.join(work, "int8.onnx"), calib_pixels.numpy()[:64],  # static mode's
                          precision_options(args.precision))
            path = os.path.join(work, "int8.onnx")
    return report, path


def _speed_checked(args, model, result, report: dict, floor: float, work: str) -> str | None:
    """Run the speed check on ``result``'s evaluated schedules, print it, record it in ``report``
    (``speed_check``, ``machine``; the choice replaces ``schedule_obj`` and ``calibration``) and
    return the chosen schedule's fp32 export (None: nothing timed)."""
    from ..schedule import Schedule
    from ..speed_check import speed_check

    check = speed_check(model, args.model, args.weights, result.evaluated, args.target_flops_ratio, work,
                        min_quotient=floor, count=args.speed_candidates, repeats=args.repeats, provider=args.provider,
                        pretrained=args.pretrained, num_classes=args.num_classes, budget=args.budget)
    if not check.rows:
        return None
    mach = check.machine
    print(f"speed check (ONNX Runtime {mach['provider']}, fp32 against timm's unmerged model timed right before "
          f"each, batch {mach['batch']}, {mach['repeats']} pairs, {mach['cpu']}, {mach['threads']} threads): "
          f"speed-up / FLOP ratio of the least-KL schedules, median and lower quartile; kept: the least-KL "
          f"schedule whose lower quartile is at least {floor:.2f}")
    for row in check.rows:
        again = " (timed twice)" if row.get("timed_twice") else ""
        print(f"  {row['flops_ratio']:.3f}x FLOPs  {row['speedup']:.2f}x{again}  {row['speed_per_flop']:.2f} "
              f"(low {row['speed_per_flop_low']:.2f})  KL {row['divergence']:.4f}  {row['spec']}")
    chosen = check.chosen
    report["speed_check"] = [{k: v for k, v in r.items() if k != "path"} for r in check.rows]
    report["machine"] = mach
    if chosen is None:
        best = max(check.rows, key=lambda r: r["speed_per_flop_low"])
        print(f"note: none of the {len(check.rows)} schedules timed reached {floor:.2f} of its FLOP ratio in its "
              f"lower quartile (best {best['speed_per_flop_low']:.2f}); kept the least-KL schedule")
        least = check.rows[0]
        if least["spec"] != result.best.spec():
            return None
        return least["path"]
    if chosen["spec"] != result.best.spec():
        first = check.rows[0]
        print(f"speed check: {chosen['spec']} chosen over the least-KL {first['spec']} "
              f"(lower quartile {chosen['speed_per_flop_low']:.2f} against {first['speed_per_flop_low']:.2f} of the "
              f"FLOP ratio; "
              f"KL {chosen['divergence']:.4f} against {first['divergence']:.4f})")
    report["schedule_obj"] = Schedule.parse(chosen["spec"])
    report["calibration"] = {k: v for k, v in chosen.items() if k != "path"}
    return chosen["path"]


def _judge_variants(rows: list[dict], model, held_pixels, base, labels) -> list[dict]:
    """The variant stage's rows, with the plain schedule and the calibration winner also scored on
    the held-apart images (``held_divergence``, ``held_agreement``)."""
    from ..evaluate import schedule_metrics
    from ..schedule import Schedule

    if not rows:
        return []
    rows = [dict(r) for r in rows]
    winner = min(rows, key=lambda r: (r["divergence"], -r["agreement"]))
    for row in {id(rows[0]): rows[0], id(winner): winner}.values():
        m = schedule_metrics(model, Schedule.parse(row["spec"]), held_pixels, base, labels)
        row["held_divergence"], row["held_agreement"] = m["divergence"], m["agreement"]
    return rows


def _search_engines(args, model, calib_pixels, work: str) -> tuple[dict, str]:
    """``--target-speedup``: schedule x precision measured with ONNX Runtime (:mod:`..engine_search`)."""
    from ..engine_search import fastest_within, row_schedule, search_engines

    runtime = args.runtime
    precisions = runtime.auto if args.precision == "auto" else (args.precision,)
    result = search_engines(model, args.model, args.weights, calib_pixels, args.target_speedup, work,
                            precisions=precisions, rungs=args.rungs, max_grid=args.max_grid or 16,
                            refine_steps=args.refine_steps if args.refine_steps is not None else 8,
                            repeats=args.repeats, provider=args.provider, pretrained=args.pretrained,
                            num_classes=args.num_classes, progress=not args.no_progress, strides=args.strides,
                            budget=args.budget, mirror=not args.no_mirror, runtime=runtime)
    for note in result.machine.get("notes", ()):
        print(note)
    if result.machine.get("variant_keys") is not None:
        keys = ",".join(f"{k}={v}" for k, v in result.machine["variant_keys"].items()) or "none"
        print(f"merge variants searched at the {result.machine['variant_rung']:.2f}x rung; every rung uses "
              f"its keys: {keys}")
    strip = [{k: v for k, v in r.items() if k != "path"} for r in result.candidates]
    pareto = [{k: v for k, v in r.items() if k != "path"} for r in result.pareto]
    best = result.best
    if best is None:
        fastest = fastest_within(result.candidates, args.budget)
        return {"schedule_obj": None, "pareto": pareto, "evaluated": strip, "machine": result.machine,
                "fastest_within": fastest and {k: v for k, v in fastest.items() if k != "path"}}, None
    return {"schedule_obj": row_schedule(best), "precision": best["precision"],
            "calibration": {k: v for k, v in best.items() if k != "path"}, "pareto": pareto,
            "evaluated": strip, "machine": result.machine}, best["path"]
