"""Subcommand ``build``: engines (ONNX Runtime, OpenVINO, TensorRT or TensorRT-RTX) from an exported file."""

from __future__ import annotations

import os

from ..errors import DSMError
from ._common import TENSORRT_FLAVOURS


def add(sub):
    p = sub.add_parser("build", help="build an engine (TensorRT plan, OpenVINO IR, or ONNX Runtime optimized/fp16/INT8 model)")
    p.add_argument("onnx", help="ONNX file written by dsm-export export (for TensorRT INT8: by build --precision int8)")
    p.add_argument("--backend", choices=("tensorrt", "onnxruntime", "openvino"), required=True)
    p.add_argument("--output", "-o", required=True, help=".plan (tensorrt), .onnx (onnxruntime) or .xml (openvino)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8"), default="fp32",
                   help="fp16: onnxruntime and tensorrt; bf16: openvino (default fp32)")
    q = p.add_argument_group("INT8 (onnxruntime backend: post-training quantization with onnxruntime.quantization)")
    q.add_argument("--quantization", choices=("static", "dynamic"), default="static",
                   help="static: QDQ, calibrated, TensorRT-compatible (default); dynamic: activations "
                        "quantized per batch at run time, no calibration, ONNX Runtime only")
    q.add_argument("--calibration", metavar="DIR",
                   help="calibration image folder (static INT8, and --smooth-alpha in either mode)")
    q.add_argument("--calibration-count", type=int, default=64,
                   help="calibration images: the first N of the folder by name (default 64)")
    q.add_argument("--calibration-method", choices=("minmax", "entropy", "percentile"), default="percentile",
                   help="activation-range calibration (default percentile 99.999)")
    q.add_argument("--activations", choices=("int8", "uint8"), default="int8",
                   help="int8: symmetric, zero point 0, TensorRT-compatible (default); uint8: asymmetric "
                        "(U8S8), ONNX Runtime only")
    q.add_argument("--keep-fp32", default="",
                   help="comma-separated layers left in fp32, by timm-style label: fc2, blocks.0, head, ...; "
                        "'none' quantizes them all (default: blocks.0 with --quantization dynamic, none static)")
    q.add_argument("--smooth-alpha", type=float, metavar="A",
                   help="SmoothQuant: before quantizing, fold per-channel scales with migration strength A "
                        "in [0, 1] into the LayerNorms and value weights (exact in fp32; evens out "
                        "activation ranges; needs --calibration). Default: no smoothing (openvino: NNCF's "
                        "SmoothQuant, 0 for none; default: chosen among 0, 0.5, 0.95 by KL on the "
                        "calibration images)")
    t = p.add_argument_group("TensorRT (full TensorRT, or TensorRT-RTX, which builds with no GPU)")
    t.add_argument("--tensorrt", choices=TENSORRT_FLAVOURS, default="auto",
                   help="which TensorRT builds: enterprise (full TensorRT, module tensorrt: data-centre GPUs, "
                        "built on the GPU that runs it), rtx (TensorRT-RTX: RTX GPUs, built on any machine), "
                        "auto: whichever is installed, full TensorRT first (default)")
    t.add_argument("--compute-capability", metavar="LIST", default="",
                   help="TensorRT-RTX targets, e.g. 8.6,8.9,12.0 (of 7.5, 8.0, 8.6, 8.9, 12.0, 12.1; no Hopper); "
                        "default: the release's own targets")
    t.add_argument("--workspace-mib", type=int, default=1024, help="TensorRT workspace pool limit")
    t.add_argument("--timing-cache", help="full TensorRT: timing-cache file (read, then updated)")
    t.add_argument("--tf32", action="store_true",
                   help="TensorRT: allow TF32 for fp32 math (off by default: exact fp32 parity)")
    t.add_argument("--min-batch", type=int, default=1)
    t.add_argument("--opt-batch", type=int, default=32)
    t.add_argument("--max-batch", type=int, default=64)
    p.set_defaults(func=run)


def _check_int8_args(args) -> None:
    """Refuse INT8 mistakes before any work (one line, exit 2)."""
    from ..graph.export import load_onnx, read_metadata
    from ..check.inspection import precision_of
    from ..engines.int8.quantize import is_quantized

    model = load_onnx(args.onnx, weights=False)
    read_metadata(model, args.onnx)
    precision = precision_of(model)["precision"]
    if is_quantized(model) or precision != "fp32":
        raise DSMError(f"{args.onnx!r} is already {precision if precision != 'fp32' else 'quantized'}: "
                       "--precision int8 takes the fp32 file written by 'dsm-export export'")
    if args.quantization == "static" and not args.calibration:
        raise DSMError("static INT8 needs calibration images: --calibration DIR "
                       "(or --quantization dynamic)")
    if args.quantization == "dynamic" and args.calibration and args.smooth_alpha is None:
        raise DSMError("--quantization dynamic takes no --calibration (unless --smooth-alpha is given)")
    if args.smooth_alpha is not None and not args.calibration:
        raise DSMError("--smooth-alpha needs calibration images: --calibration DIR")
    if args.calibration and not os.path.isdir(args.calibration):
        raise DSMError(f"calibration folder {args.calibration!r} does not exist")


def run(args) -> int:
    from .. import checks
    from ..engines import build_onnxruntime

    checks.input_file(args.onnx, "ONNX file")
    checks.output_file(args.output, "--output")
    if os.path.abspath(args.output) == os.path.abspath(args.onnx):
        raise DSMError("--output must differ from the input file")
    if args.backend == "tensorrt":
        return _build_tensorrt(args)
    if args.compute_capability or args.tensorrt != "auto":
        raise DSMError("--tensorrt and --compute-capability apply to --backend tensorrt only")
    if args.backend == "openvino":
        return _build_openvino(args)
    if args.precision == "bf16":
        raise DSMError("--precision bf16 is for --backend openvino (ONNX Runtime and TensorRT take fp16)")
    if args.precision == "int8":
        _check_int8_args(args)
    elif args.smooth_alpha is not None:
        raise DSMError("--smooth-alpha applies to --precision int8 only")
    if args.precision == "int8":
        _build_int8(args)
    else:
        info = build_onnxruntime(args.onnx, args.output, fp16=args.precision == "fp16")
        data = [os.path.basename(f) for f in info["files"][1:]]
        print(f"wrote {args.output}: ONNX Runtime optimized graph, {info['precision']}"
              + (f" ({info['fp32_nodes']} nodes kept in fp32: matching and sizes)" if info["fp32_nodes"] else "")
              + (f"; weights in {', '.join(data)} beside it" if data else ""))
    return 0


def _build_tensorrt(args) -> int:
    """``--backend tensorrt``: every check (options, flavour, the file itself) before TensorRT builds."""
    from .. import checks
    from ..engines.tensorrt import TensorRTOptions, build_tensorrt, parse_compute_capabilities

    checks.output_file(args.output + ".json", "--output sidecar")
    checks.output_file(args.timing_cache, "--timing-cache")
    if args.smooth_alpha is not None or args.calibration:
        raise DSMError("--backend tensorrt takes a built file: quantize with --backend onnxruntime "
                       "--precision int8 first (--calibration and --smooth-alpha belong there)")
    info = build_tensorrt(args.onnx, args.output, TensorRTOptions(
        precision=args.precision, flavour=args.tensorrt,
        compute_capabilities=parse_compute_capabilities(args.compute_capability),
        workspace_mib=args.workspace_mib, timing_cache=args.timing_cache, min_batch=args.min_batch,
        opt_batch=args.opt_batch, max_batch=args.max_batch, tf32=args.tf32))
    name = "TensorRT-RTX" if info["flavour"] == "rtx" else "TensorRT"
    on = "no GPU (CPU-only ahead-of-time build)" if info["gpu"] is None else info["gpu"]
    targets = info["compute_capabilities"] or info["engine_targets"]
    print(f"wrote {args.output} and {args.output}.json: {name} {info['tensorrt_version']}, {info['precision']}, "
          f"{info['layers']} layers, built in {info['build_seconds']:.1f} s on {on}"
          + (f"; targets {', '.join(targets)}{'' if info['compute_capabilities'] else ' (the release default)'}"
             if targets else ""))
    print(f"  the engine {info['where']}")
    return 0


def _build_openvino(args) -> int:
    """``--backend openvino``: every check (options, the file, the calibration images) before OpenVINO runs."""
    from .. import checks
    from ..api import build

    if args.precision == "fp16":
        raise DSMError("--backend openvino runs fp32, bf16 or int8 (fp16 is for onnxruntime and tensorrt)")
    if not args.output.endswith(".xml"):
        raise DSMError(f"--output {args.output!r}: an OpenVINO IR is an .xml file (its weights go in the .bin beside it)")
    checks.output_file(args.output[:-4] + ".bin", "--output weights (.bin)")
    if args.precision != "int8" and (args.calibration or args.smooth_alpha is not None):
        raise DSMError("--calibration and --smooth-alpha apply to --precision int8 only")
    if args.precision == "int8":
        if args.quantization != "static" or args.activations != "int8" or args.keep_fp32:
            raise DSMError("--quantization, --activations and --keep-fp32 are for --backend onnxruntime; "
                           "OpenVINO INT8 is NNCF's static quantization")
        if not args.calibration:
            raise DSMError("--backend openvino --precision int8 needs calibration images: --calibration DIR")
        if not os.path.isdir(args.calibration):
            raise DSMError(f"calibration folder {args.calibration!r} does not exist")
    rec = build(args.onnx, args.output, backend="openvino", precision=args.precision,
                calibration=args.calibration if args.precision == "int8" else None,
                calibration_count=args.calibration_count, smooth_alpha=args.smooth_alpha)
    note = "" if rec["cpu_bf16"] or args.precision == "fp32" else " (this CPU has no AVX-512 BF16 or AMX: f32)"
    line = f"wrote {args.output} and {rec['bin']}: OpenVINO {rec['openvino_version'].split('-')[0]} IR, {args.precision}"
    if args.precision == "int8":
        chosen = "none" if rec["smooth_alpha"] == 0 else f"alpha {rec['smooth_alpha']:g}"
        how = "given" if not rec["smooth_trials"] else "lowest KL on held-apart calibration images"
        line += (f" (NNCF {rec['nncf_version']}, {rec['calibration_count']} calibration images, "
                 f"{rec['fake_quantize']} FakeQuantize; SmoothQuant {chosen}, {how}); "
                 f"{rec['fp32_matching_nodes']} matching and size nodes and {rec['fp32_attention_matmuls']} "
                 "attention MatMuls kept out of quantization (which tokens merge is not decided in INT8)")
    print(line)
    print(f"  runs in {rec['inference_precision']} on this CPU{note}; other ops run at OpenVINO's inference precision")
    return 0


def _build_int8(args) -> None:
    from ..api import QuantizeOptions, quantize

    keep = tuple(k.strip() for k in args.keep_fp32.split(",") if k.strip()) or None  # None: the mode's default
    if keep == ("none",):
        keep = ()
    options = QuantizeOptions(mode=args.quantization, calibration_method=args.calibration_method,
                              calibration_count=args.calibration_count, activations=args.activations,
                              keep_fp32=keep, smooth_alpha=args.smooth_alpha)
    calibration = args.calibration if args.quantization == "static" or args.smooth_alpha is not None else None
    rec = quantize(args.onnx, args.output, calibration, options)
    quantized = ", ".join(f"{v} {k}" for k, v in rec["quantized"].items())
    how = (f"static QDQ, {rec['activations']} activations, {rec['calibration_method']} calibration on "
           f"{rec['calibration_count']} images" if rec["mode"] == "static" else
           "dynamic (activations quantized per batch at run time; ONNX Runtime only)")
    if rec.get("smooth_alpha") is not None:
        how += (f"; SmoothQuant alpha {rec['smooth_alpha']} folded into {len(rec['smoothed_layers'])} layers' "
                f"inputs (ranges from {rec['calibration_count']} images)")
    print(f"wrote {args.output}: INT8 {how}; quantized {quantized}; "
          f"{rec['fp32_matching_nodes']} matching and size nodes kept fp32 (which tokens merge is "
          f"decided in fp32)" + (f"; {rec['fp32_other_candidates']} more layers kept fp32 "
                                 "(attention q@k and attn@v"
                                 + (f", kept fp32: {','.join(options.kept())}" if options.kept() else "") + ")"
                                 if rec["fp32_other_candidates"] else ""))
