"""Subcommands beyond export/validate/inspect: schedule tuning."""

from __future__ import annotations

import json
import os

from .errors import DSMError


def _add_tune(sub):
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
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args) -> int:
    from .data import list_images, split_calibration
    from .evaluate import load_pixels, model_logits, schedule_metrics
    from .fileio import write_json
    from .models import create_model
    from .tune import tune, tune_for_speedup

    target = args.target_flops_ratio or args.target_speedup
    if not 1.0 < target < 10:
        raise DSMError(f"the target must be above 1, got {target}")
    if args.backend != "onnxruntime":
        raise DSMError(f"--backend {args.backend}: only onnxruntime can be measured here")
    if not 1 <= args.calibration <= 128:
        raise DSMError("--calibration must be between 1 and 128 images")
    for path in (args.output, args.report):  # fail before minutes of search, not after
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise DSMError(f"output folder of {path!r} does not exist")
    model = create_model(args.model, args.weights)
    images = list_images(args.images)
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
    for row in result.pareto:
        print(f"  {row['flops_ratio']:.3f}x  KL {row['kl']:.4f}  {100 * row['top1_agreement']:.1f} %  {row['spec']}")
    if args.output:
        write_json(args.output, {**result.best.to_dict(depth), "spec": result.best.spec()})
    if args.report:
        write_json(args.report, {
            "schedule": result.best.spec(), "calibration": result.best_metrics, "held_apart": held_metrics,
            "pareto": result.pareto, "evaluated": result.evaluated,
            "calibration_files": list(calib.files), "held_apart_images": len(held)})
    return 0


def _add_visualize(sub):
    p = sub.add_parser("visualize", help="draw the merged-token groups at chosen blocks over an image")
    p.add_argument("model", help="timm model name")
    p.add_argument("--weights", help="local state dict (without it: random init)")
    p.add_argument("--image", required=True)
    p.add_argument("--schedule", required=True)
    p.add_argument("--blocks", required=True, help="comma-separated block indices, e.g. 3,6,11")
    p.add_argument("--output", "-o", required=True, help="PNG file")
    p.set_defaults(func=_cmd_visualize)


def _cmd_visualize(args) -> int:
    from .models import create_model
    from .schedule import Schedule
    from .visualize import visualize

    try:
        blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
    except ValueError:
        raise DSMError(f"--blocks {args.blocks!r}: expected comma-separated integers") from None
    if not blocks:
        raise DSMError("--blocks names no block")
    if not os.path.isfile(args.image):
        raise DSMError(f"image {args.image!r} does not exist")
    model = create_model(args.model, args.weights)
    counts = visualize(model, Schedule.parse(args.schedule), args.image, blocks, args.output)
    print(f"wrote {args.output}: " + ", ".join(f"block {b}: {n} tokens" for b, n in counts.items()))
    return 0


def _add_analyze(sub):
    p = sub.add_parser("analyze", help="per-block attention, key-similarity, outlier and merge-cost statistics")
    p.add_argument("model", help="timm model name")
    p.add_argument("--weights", required=True)
    p.add_argument("--images", required=True, help="calibration image folder")
    p.add_argument("--limit", type=int, default=64, help="calibration images (default 64)")
    p.add_argument("--r", type=int, default=16, help="tokens merged by one block for the merge cost")
    p.add_argument("--output", "-o", default="analysis", help="folder for the PNG plots and analysis.json")
    p.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args) -> int:
    from .analyze import analyze, plot_analysis
    from .data import list_images
    from .evaluate import load_pixels
    from .fileio import write_json
    from .models import create_model

    model = create_model(args.model, args.weights)
    images = list_images(args.images, args.limit)
    grid = model.patch_embed.grid_size
    if not 1 <= args.r <= grid[0] * grid[1] // 2:
        raise DSMError(f"--r must be between 1 and {grid[0] * grid[1] // 2}")
    report = analyze(model, load_pixels(images, model), r=args.r)
    os.makedirs(args.output, exist_ok=True)
    plot_analysis(report, args.output, args.model)
    write_json(os.path.join(args.output, "analysis.json"), {"model": args.model, **report})
    print(f"{'block':>5} {'entropy':>8} {'key sim':>8} {'outliers':>9} {'merge KL':>9} {'agree':>6}")
    for i in range(len(report["merge_kl"])):
        print(f"{i:>5} {report['attention_entropy'][i]:>8.3f} {report['key_match_similarity'][i]:>8.3f} "
              f"{report['outlier_ratio'][i]:>9.1f} {report['merge_kl'][i]:>9.4f} "
              f"{100 * report['merge_agreement'][i]:>5.1f}%")
    print(f"recommended delay: {report['recommended_delay']} ({report['reason']})")
    print(f"wrote {args.output}/analysis.json and 4 PNG plots")
    return 0


def _add_build(sub):
    p = sub.add_parser("build", help="build an engine (TensorRT plan, or ONNX Runtime optimized/fp16 model)")
    p.add_argument("onnx", help="ONNX file written by dsm-export export")
    p.add_argument("--backend", choices=("tensorrt", "onnxruntime"), required=True)
    p.add_argument("--output", "-o", required=True, help=".plan (tensorrt) or .onnx (onnxruntime)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--workspace-mib", type=int, default=1024, help="TensorRT workspace pool limit")
    p.add_argument("--timing-cache", help="TensorRT timing-cache file (read, then updated)")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=64)
    p.set_defaults(func=_cmd_build)


def _cmd_build(args) -> int:
    from .engines import TensorRTOptions, build_onnxruntime, build_tensorrt

    if args.backend == "tensorrt":
        info = build_tensorrt(args.onnx, args.output, TensorRTOptions(
            precision=args.precision, workspace_mib=args.workspace_mib, timing_cache=args.timing_cache,
            min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch))
        print(f"wrote {args.output} and {args.output}.json: TensorRT {info['tensorrt_version']}, "
              f"{info['gpu']}, {info['precision']}")
    else:
        info = build_onnxruntime(args.onnx, args.output, fp16=args.precision == "fp16")
        print(f"wrote {args.output}: ONNX Runtime optimized graph, {info['precision']}"
              + (f" ({info['fp32_nodes']} nodes kept in fp32: matching and sizes)" if info["fp32_nodes"] else ""))
    return 0


def _add_triton_repo(sub):
    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository")
    p.add_argument("files", nargs="+", help=".onnx or .plan files written by dsm-export")
    p.add_argument("--output", "-o", required=True, help="model repository folder")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--instances", type=int, default=1)
    p.set_defaults(func=_cmd_triton_repo)


def _cmd_triton_repo(args) -> int:
    from .triton_repo import write_repository

    names = write_repository(args.files, args.output, max_batch=args.max_batch, instances=args.instances)
    print(f"wrote {args.output}: " + ", ".join(names))
    return 0


def _add_serve(sub):
    p = sub.add_parser("serve", help="serve an ONNX file with a real Triton server (PyTriton) on loopback")
    p.add_argument("onnx", nargs="+", help="ONNX files (e.g. the DSM export and the none baseline)")
    p.add_argument("--name", action="append", help="model name per file (default: from the file name)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from .serve import serve

    return serve(args.onnx, names=args.name, http_port=args.http_port, grpc_port=args.grpc_port,
                 metrics_port=args.metrics_port, max_batch=args.max_batch, top_k=args.top_k,
                 threads=args.threads)


COMMANDS: list = [_add_analyze, _add_build, _add_serve, _add_triton_repo, _add_tune, _add_visualize]
