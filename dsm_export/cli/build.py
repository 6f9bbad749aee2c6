"""Subcommand ``build``: engines (ONNX Runtime, TensorRT) from an exported file."""

from __future__ import annotations


def add(sub):
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
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import checks
    from ..engines import TensorRTOptions, build_onnxruntime, build_tensorrt, import_tensorrt

    checks.input_file(args.onnx, "ONNX file")
    checks.output_file(args.output, "--output")
    if args.backend == "tensorrt":
        checks.output_file(args.output + ".json", "--output sidecar")
        checks.output_file(args.timing_cache, "--timing-cache")
        import_tensorrt()  # the backend is available, before the ONNX file is read
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
