"""Subcommand ``validate``: an exported graph (or engine) against PyTorch on images."""

from __future__ import annotations

from ..errors import DSMError
from ._common import TENSORRT_FLAVOURS


def add(sub):
    p = sub.add_parser("validate", help="check an exported graph against PyTorch on images")
    p.add_argument("onnx", nargs="?", help="ONNX file written by dsm-export export (or build), or an OpenVINO "
                                           "IR (.xml) written by build --backend openvino")
    p.add_argument("--engine", help="a TensorRT engine (.plan) written by dsm-export build, instead (needs an "
                                    "NVIDIA GPU)")
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
    p.add_argument("--model", help="timm model name (default: from the file's metadata)")
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
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import checks
    from ..data import list_images
    from ..fileio import write_json
    from ..check.validate import validate, validate_engine, validate_openvino

    if bool(args.onnx) == bool(args.engine):
        raise DSMError("give either an ONNX file or --engine PLAN")
    if args.weights and args.pretrained:
        raise DSMError("give either --weights FILE or --pretrained, not both")
    # Everything the user gave is checked before the first image is run.
    openvino = bool(args.onnx) and args.onnx.endswith(".xml")
    checks.input_file(args.onnx or args.engine, "engine" if args.engine or openvino else "ONNX file")
    if openvino:
        from ..engines.openvino import read_ir_metadata

        checks.input_file(args.onnx[:-4] + ".bin", "OpenVINO weights (.bin)")
        read_ir_metadata(args.onnx)  # OpenVINO installed, and an IR dsm-export built, before any image
        if args.provider != "cpu":
            raise DSMError("--provider is for ONNX files: an OpenVINO IR runs in OpenVINO on the CPU")
    checks.input_file(args.weights, "weights file")
    checks.output_file(args.json_path, "--json")
    if args.engine:
        from ..engines.tensorrt import engine_info, require_gpu, tensorrt_for_engine

        checks.output_file(args.runtime_cache, "--runtime-cache")
        require_gpu()  # a GPU, and TensorRT of the engine's flavour and release, before any image is read
        tensorrt_for_engine(engine_info(args.engine)[1], args.engine, args.tensorrt)
    elif args.runtime_cache or args.tensorrt != "auto":
        raise DSMError("--tensorrt and --runtime-cache apply to --engine only")
    images, skipped = checks.readable_images(list_images(args.images, args.limit), args.skip_unreadable)
    common = dict(weights=args.weights, model_name=args.model, schedule=args.schedule, atol=args.atol,
                  batch_size=args.batch_size, limit=args.limit, progress=not args.no_progress,
                  pretrained=args.pretrained)
    if args.engine:
        report = validate_engine(args.engine, images, flavour=args.tensorrt, runtime_cache=args.runtime_cache,
                                 **common)
    elif openvino:
        report = validate_openvino(args.onnx, images, threads=args.threads, **common)
    else:
        report = validate(args.onnx, images, threads=args.threads, provider=args.provider, **common)
    report["skipped_unreadable"] = skipped
    print(format_report(report))
    if args.json_path:
        write_json(args.json_path, report)
    return 0 if report["passed"] else 1


def format_report(report: dict) -> str:
    """Human-readable validation report."""

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f} %"

    if report.get("output") == "embeddings":
        cos = report["cosine"]
        k = cos["knn_k"]
        lines = [
            f"model {report['model']}, schedule {report['schedule']}, {report['images']} images, output embeddings",
            f"  vs PyTorch with schedule: cosine min {cos['pytorch']['min']:.6f} mean {cos['pytorch']['mean']:.6f}, "
            f"retrieval overlap@{k} {pct(cos['knn_overlap_pytorch'])}, max |d| {report['max_abs_diff']:.2e}",
            f"  vs unmerged PyTorch:      cosine min {cos['unmerged']['min']:.4f} mean {cos['unmerged']['mean']:.4f}, "
            f"retrieval overlap@{k} {pct(cos['knn_overlap_unmerged'])}",
            f"  FLOPs:                    {report['gflops']:.3f} G (unmerged {report['baseline_gflops']:.3f} G, "
            f"{report['flops_ratio']:.2f}x fewer)",
            f"  criterion:                {report['criterion']}",
            "PASS" if report["passed"] else "FAIL: outside tolerance",
        ]
        return "\n".join(lines)
    lines = [
        f"model {report['model']}, schedule {report['schedule']}, {report.get('precision', 'fp32')}, "
        f"{report['images']} images"
        + (f", OpenVINO running {report['inference_precision']}" if report.get("engine") == "openvino" else ""),
        f"  vs PyTorch with schedule: max |dlogit| {report['max_abs_diff']:.2e} (atol {report['atol']:.0e}), "
        f"top-1 match {pct(report['top1_match_pytorch'])} ({report['top1_mismatches']} mismatches)"
        + (f", KL {report['kl_to_pytorch']:.4f}" if report.get("precision", "fp32") != "fp32"
           or report.get("engine") == "openvino" else ""),
        f"  vs unmerged PyTorch:      top-1 agreement {pct(report['top1_agreement'])}, KL {report['kl']:.4f}",
        f"  top-1 accuracy:           {pct(report['top1_accuracy'])} (unmerged {pct(report['baseline_top1_accuracy'])})",
        f"  FLOPs:                    {report['gflops']:.3f} G (unmerged {report['baseline_gflops']:.3f} G, "
        f"{report['flops_ratio']:.2f}x fewer)",
        f"  criterion:                {report['criterion']} (median {report['median_abs_diff']:.2e})",
        *([f"  skipped:                  {len(report['skipped_unreadable'])} unreadable images "
           f"({', '.join(report['skipped_unreadable'][:3])}{', ...' if len(report['skipped_unreadable']) > 3 else ''})"]
          if report.get("skipped_unreadable") else []),
        "PASS" if report["passed"] else "FAIL: outside tolerance",
    ]
    return "\n".join(lines)
