"""Subcommand ``tune``: the schedule with the least KL at a FLOP or speed-up target."""

from __future__ import annotations

import json

from ..errors import DSMError


def add(sub):
    p = sub.add_parser("tune", help="search the schedule with the least KL at a FLOP target")
    p.add_argument("model", help="timm model name")
    p.add_argument("--weights", required=True)
    p.add_argument("--images", required=True, help="image folder; calibration and held-apart images")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-flops-ratio", type=float, help="e.g. 1.7 for 1.7x fewer FLOPs")
    target.add_argument("--target-speedup", type=float,
                        help="measured ONNX Runtime speed-up over the unmerged export on this machine")
    p.add_argument("--backend", default="onnxruntime", help="engine measured for --target-speedup")
    p.add_argument("--calibration", type=int, default=128, help="calibration images (at most 128)")
    p.add_argument("--holdout", type=int, default=None, help="held-apart images (default: all the rest)")
    p.add_argument("--max-grid", type=int, default=48)
    p.add_argument("--refine-steps", type=int, default=24)
    p.add_argument("--output", "-o", help="write the chosen schedule as JSON here")
    p.add_argument("--report", help="write the full report (Pareto front, held-apart metrics) as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out images that cannot be decoded (counted in the report) instead of stopping")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data import list_images, split_calibration
    from ..evaluate import load_pixels, model_logits, schedule_metrics
    from ..fileio import write_json
    from ..models import create_model
    from ..tune import tune, tune_for_speedup

    target = args.target_flops_ratio or args.target_speedup
    if not 1.0 < target < 10:
        raise DSMError(f"the target must be above 1, got {target}")
    if args.backend != "onnxruntime":
        raise DSMError(f"--backend {args.backend}: only onnxruntime can be measured here")
    if not 1 <= args.calibration <= 128:
        raise DSMError("--calibration must be between 1 and 128 images")
    from .. import checks

    checks.output_file(args.output, "--output")  # fail before minutes of search, not after
    checks.output_file(args.report, "--report")
    checks.input_file(args.weights, "weights file")
    images, skipped = checks.readable_images(list_images(args.images), args.skip_unreadable)
    model = create_model(args.model, args.weights)
    if len(images) < args.calibration + 1:
        raise DSMError(f"{args.images} holds {len(images)} images: need more than --calibration")
    calib, held = split_calibration(images, args.calibration)
    if args.holdout:
        held = held.subset(range(min(args.holdout, len(held))))
    calib_pixels = load_pixels(calib, model)
    if args.target_speedup:
        result = tune_for_speedup(model, args.model, args.weights, calib_pixels, args.target_speedup,
                                  max_grid=args.max_grid, refine_steps=args.refine_steps,
                                  progress=not args.no_progress)
    else:
        result = tune(model, calib_pixels, args.target_flops_ratio, max_grid=args.max_grid,
                      refine_steps=args.refine_steps, progress=not args.no_progress)
    held_pixels = load_pixels(held, model)
    base = model_logits(model, held_pixels)
    held_metrics = schedule_metrics(model, result.best, held_pixels, base, held.labels)
    depth = len(model.blocks)
    print(f"chosen schedule: {result.best.spec()}")
    print(json.dumps(result.best.to_dict(depth)))
    if "ort_speedup" in result.best_metrics:
        print(f"measured ONNX Runtime speed-up: {result.best_metrics['ort_speedup']:.2f}x (batch 32)")
    print(f"calibration ({len(calib)} images): KL {result.best_metrics['kl']:.4f}, "
          f"agreement {100 * result.best_metrics['top1_agreement']:.1f} %, "
          f"{result.best_metrics['flops_ratio']:.2f}x fewer FLOPs")
    acc = held_metrics.get("top1_accuracy")
    print(f"held apart ({len(held)} images): KL {held_metrics['kl']:.4f}, "
          f"agreement {100 * held_metrics['top1_agreement']:.1f} %"
          + (f", top-1 {100 * acc:.1f} % (unmerged {100 * held_metrics['baseline_top1_accuracy']:.1f} %)"
             if acc is not None else ""))
    print("Pareto front (calibration): FLOPs reduction, KL, agreement, schedule")
    if skipped:
        print(f"skipped {len(skipped)} unreadable images: {', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}")
    for row in result.pareto:
        print(f"  {row['flops_ratio']:.3f}x  KL {row['kl']:.4f}  {100 * row['top1_agreement']:.1f} %  {row['spec']}")
    if args.output:
        write_json(args.output, {**result.best.to_dict(depth), "spec": result.best.spec()})
    if args.report:
        write_json(args.report, {
            "schedule": result.best.spec(), "calibration": result.best_metrics, "held_apart": held_metrics,
            "pareto": result.pareto, "evaluated": result.evaluated,
            "calibration_files": list(calib.files), "held_apart_images": len(held),
            "skipped_unreadable": skipped})
    return 0
