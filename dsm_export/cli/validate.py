"""Subcommand ``validate``: an exported graph (or engine) against PyTorch on images."""

from __future__ import annotations

from .. import checks
from ..check.distributed import validate_ray
from ..check.validate import ValidateOptions, validate_runner
from ..core.hf import ATTN_IMPLEMENTATIONS
from ..data import list_images
from ..engines.registry import RunnerOptions, backend_for, open_runner
from ..errors import DSMError
from ..fileio import write_json
from ._common import TENSORRT_FLAVOURS, add_ray_args, ray_options


def add(sub):
    p = sub.add_parser("validate", help="check an exported graph against PyTorch on images")
    p.add_argument("onnx", nargs="?", metavar="ENGINE",
                   help="an engine of any backend: the ONNX file written by dsm-export export (or build), an "
                        "OpenVINO IR (.xml), a TensorRT plan (.plan, needs an NVIDIA GPU), an ExecuTorch program (.pte)")
    p.add_argument("--engine", help="the engine file, given as an option instead (as older versions took a .plan)")
    p.add_argument("--tensorrt", choices=TENSORRT_FLAVOURS, default="auto",
                   help="with --engine: the TensorRT flavour (default: the one the engine's sidecar names)")
    p.add_argument("--runtime-cache", metavar="FILE",
                   help="with a TensorRT-RTX --engine: runtime-cache file of JIT-compiled kernels (read, then updated)")
    p.add_argument("--images", required=True, help="image folder (labels.csv optional)")
    p.add_argument("--weights", help="weights file (default: the one recorded at export, relative to the "
                                     "ONNX file)")
    p.add_argument("--pretrained", action="store_true",
                   help="PyTorch side from timm's pretrained weights of the model name (Hugging Face cache); "
                        "the default for files exported with --pretrained")
    p.add_argument("--model", help="timm model name or Hugging Face folder or hub id (default: from the file's "
                                   "metadata)")
    p.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS,
                   help="a Hugging Face model's attention implementation in the PyTorch reference (default: "
                        "transformers' default, sdpa)")
    p.add_argument("--schedule", help="schedule (default: from the file's metadata)")
    p.add_argument("--json", dest="json_path", help="write the report as JSON here")
    p.add_argument("--atol", type=float, default=1e-4, help="max |logit difference| (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="validate on the first N images only")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--provider", default="cpu",
                   help="ONNX Runtime execution provider: cpu, cuda, tensorrt, openvino or a full name "
                        "(default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out images that cannot be decoded (counted in the report) instead of stopping")
    add_ray_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if bool(args.onnx) == bool(args.engine):
        raise DSMError("give either an engine file or --engine PLAN")
    if args.weights and args.pretrained:
        raise DSMError("give either --weights FILE or --pretrained, not both")
    path = args.onnx or args.engine
    # Everything the user gave is checked before the first image is run.
    backend = backend_for(path)
    checks.input_file(path, "engine")
    if backend.preflight is not None:
        backend.preflight(path)
    checks.input_file(args.weights, "weights file")
    checks.output_file(args.json_path, "--json")
    checks.output_file(args.runtime_cache, "--runtime-cache")
    ray = ray_options(args)
    options = RunnerOptions(threads=args.threads, provider=args.provider, flavour=args.tensorrt,
                            runtime_cache=args.runtime_cache)
    runner = open_runner(path, options)  # the runtime, a GPU where it needs one, before any image is read
    try:
        images, skipped = checks.readable_images(list_images(args.images, args.limit), args.skip_unreadable)
        settings = ValidateOptions(weights=args.weights, model_name=args.model, schedule=args.schedule,
                                   atol=args.atol, batch_size=args.batch_size, limit=args.limit,
                                   progress=not args.no_progress, pretrained=args.pretrained,
                                   source_path=runner.engine_file.source_path,
                                   attn_implementation=args.attn_implementation)
        if ray is None:
            report = validate_runner(runner, runner.engine_file.info, images, settings)
        else:
            runner.close()  # each actor opens its own
            report = validate_ray(runner.engine_file, images, settings, runner.judged_as, options, ray)
    finally:
        runner.close()
    report.update(engine=runner.engine_file.backend, runtime=runner.label, skipped_unreadable=skipped)
    if getattr(runner, "inference_precision", None):
        report["inference_precision"] = runner.inference_precision
    print(format_report(report))
    if args.json_path:
        write_json(args.json_path, report)
    return 0 if report["passed"] else 1


def format_report(report: dict) -> str:
    """Human-readable validation report."""

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f} %"

    if report.get("output", "logits") != "logits":  # embeddings, pooler_output, image_embeds, last_hidden_state
        cos = report["cosine"]
        k = cos["knn_k"]
        lines = [
            f"model {report['model']}, schedule {report['schedule']}, {report['images']} images, output {report['output']}"
            + (f"\n  PyTorch reference:        {report['reference']}" if report.get("reference") else ""),
            f"  vs PyTorch with schedule: cosine min {cos['pytorch']['min']:.6f} mean {cos['pytorch']['mean']:.6f}, "
            f"retrieval overlap@{k} {pct(cos['knn_overlap_pytorch'])}, max |d| {report['max_abs_diff']:.2e}",
            f"  vs unmerged PyTorch:      cosine min {cos['unmerged']['min']:.4f} mean {cos['unmerged']['mean']:.4f}, "
            f"retrieval overlap@{k} {pct(cos['knn_overlap_unmerged'])}"
            + (f" (on {report['unmerged_compared_on']})" if report.get("unmerged_compared_on") else ""),
            f"  FLOPs:                    {report['gflops']:.3f} G (unmerged {report['baseline_gflops']:.3f} G, "
            f"{report['flops_ratio']:.2f}x fewer)",
            f"  criterion:                {report['criterion']}",
            "PASS" if report["passed"] else "FAIL: outside tolerance",
        ]
        return "\n".join(lines)
    lines = [
        f"model {report['model']}, schedule {report['schedule']}, {report.get('precision', 'fp32')}, "
        f"{report['images']} images"
        + (f", {report['runtime']}" if report.get("inference_precision") else "")
        + (f"\n  PyTorch reference:        {report['reference']}" if report.get("reference") else ""),
        f"  vs PyTorch with schedule: max |dlogit| {report['max_abs_diff']:.2e} (atol {report['atol']:.0e}), "
        f"top-1 match {pct(report['top1_match_pytorch'])} ({report['top1_mismatches']} mismatches)"
        + (f", KL {report['kl_to_pytorch']:.4f}" if report.get("precision", "fp32") != "fp32"
           or report.get("inference_precision") else ""),
        f"  vs unmerged PyTorch:      top-1 agreement {pct(report['top1_agreement'])}, KL {report['kl']:.4f}",
        f"  top-1 accuracy:           {pct(report['top1_accuracy'])} (unmerged {pct(report['baseline_top1_accuracy'])})",
        f"  FLOPs:                    {report['gflops']:.3f} G (unmerged {report['baseline_gflops']:.3f} G, "
        f"{report['flops_ratio']:.2f}x fewer)",
        f"  criterion:                {report['criterion']} (median {report['median_abs_diff']:.2e})",
        *([f"  ran on:                   {report['ray']}, {report['ray_actors']} engine actors"]
          if report.get("ray") else []),
        *([f"  skipped:                  {len(report['skipped_unreadable'])} unreadable images "
           f"({', '.join(report['skipped_unreadable'][:3])}{', ...' if len(report['skipped_unreadable']) > 3 else ''})"]
          if report.get("skipped_unreadable") else []),
        "PASS" if report["passed"] else "FAIL: outside tolerance",
    ]
    return "\n".join(lines)
