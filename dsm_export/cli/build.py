"""Subcommand ``build``: an engine of any registered backend (ONNX Runtime, OpenVINO, TensorRT or
TensorRT-RTX, ExecuTorch) from an exported file (:func:`dsm_export.engines.registry.build_engine`)."""

from __future__ import annotations

import os

from .. import checks
from ..engines.registry import PRECISIONS, BuildRequest, build_engine, names
from ..errors import DSMError
from ._common import TENSORRT_FLAVOURS


def add(sub):
    p = sub.add_parser("build", help="build an engine (TensorRT plan, OpenVINO IR, or ONNX Runtime optimized/fp16/INT8 model)")
    p.add_argument("onnx", help="ONNX file written by dsm-export export (for TensorRT INT8: by build --precision int8)")
    p.add_argument("--backend", choices=names(), required=True)
    p.add_argument("--output", "-o", required=True,
                   help=".onnx (onnxruntime), .xml (openvino), .plan (tensorrt) or .pte (executorch)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp16: onnxruntime and tensorrt; bf16: openvino (default fp32)")
    q = p.add_argument_group("INT8 (onnxruntime backend: post-training quantization with onnxruntime.quantization)")
    q.add_argument("--quantization", choices=("static", "dynamic"),
                   help="static: QDQ, calibrated, TensorRT-compatible (default); dynamic: activations "
                        "quantized per batch at run time, no calibration, ONNX Runtime only")
    q.add_argument("--calibration", metavar="DIR",
                   help="calibration image folder (static INT8, and --smooth-alpha in either mode)")
    q.add_argument("--calibration-count", type=int, default=64,
                   help="calibration images: the first N of the folder by name (default 64)")
    q.add_argument("--calibration-method", choices=("minmax", "entropy", "percentile"),
                   help="activation-range calibration (default percentile 99.999)")
    q.add_argument("--activations", choices=("int8", "uint8"),
                   help="int8: symmetric, zero point 0, TensorRT-compatible (default); uint8: asymmetric "
                        "(U8S8), ONNX Runtime only")
    q.add_argument("--keep-fp32",
                   help="comma-separated layers left in fp32, by timm-style label: fc2, blocks.0, head, ...; "
                        "'none' quantizes them all (default: blocks.0 with --quantization dynamic, none static)")
    q.add_argument("--smooth-alpha", type=float, metavar="A",
                   help="SmoothQuant: before quantizing, fold per-channel scales with migration strength A "
                        "in [0, 1] into the LayerNorms and value weights (exact in fp32; evens out "
                        "activation ranges; needs --calibration). Default: no smoothing (openvino: NNCF's "
                        "SmoothQuant, 0 for none; default: chosen among 0, 0.5, 0.95 by KL on the "
                        "calibration images)")
    t = p.add_argument_group("TensorRT (full TensorRT, or TensorRT-RTX, which builds with no GPU)")
    t.add_argument("--tensorrt", dest="flavour", choices=TENSORRT_FLAVOURS,
                   help="which TensorRT builds: enterprise (full TensorRT, module tensorrt: data-centre GPUs, "
                        "built on the GPU that runs it), rtx (TensorRT-RTX: RTX GPUs, built on any machine), "
                        "auto: whichever is installed, full TensorRT first (default)")
    t.add_argument("--compute-capability", metavar="LIST",
                   help="TensorRT-RTX targets, e.g. 8.6,8.9,12.0 (of 7.5, 8.0, 8.6, 8.9, 12.0, 12.1; no Hopper); "
                        "default: the release's own targets")
    t.add_argument("--workspace-mib", type=int, help="TensorRT workspace pool limit (default 1024)")
    t.add_argument("--timing-cache", help="full TensorRT: timing-cache file (read, then updated)")
    t.add_argument("--tf32", action="store_const", const=True,
                   help="TensorRT: allow TF32 for fp32 math (off by default: exact fp32 parity)")
    t.add_argument("--min-batch", type=int, help="default 1")
    t.add_argument("--opt-batch", type=int, help="default 32")
    t.add_argument("--max-batch", type=int, help="default 64")
    p.set_defaults(func=run)


# Command-line options passed to the backend (BuildRequest.options) when given; which backend takes
# which is the registry's business (Backend.options): another backend's option is refused in one line.
BACKEND_OPTIONS = ("quantization", "calibration_method", "activations", "keep_fp32", "smooth_alpha", "flavour",
                   "compute_capability", "workspace_mib", "timing_cache", "tf32", "min_batch", "opt_batch",
                   "max_batch")


def run(args) -> int:
    checks.input_file(args.onnx, "ONNX file")
    checks.output_file(args.output, "--output")
    if os.path.abspath(args.output) == os.path.abspath(args.onnx):
        raise DSMError("--output must differ from the input file")
    given = {k: getattr(args, k) for k in BACKEND_OPTIONS}
    request = BuildRequest(args.onnx, args.output, args.precision, args.calibration, args.calibration_count, given)
    record = build_engine(request, args.backend)
    for line in record.summary:
        print(line)
    return 0
