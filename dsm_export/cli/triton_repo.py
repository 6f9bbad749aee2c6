"""Subcommand ``triton-repo``: a Triton Inference Server model repository."""

from __future__ import annotations

from .. import checks
from ..engines.registry import backend_for
from ..serving.triton_repo import write_repository


def add(sub):
    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository")
    p.add_argument("files", nargs="+", help="engine files written by dsm-export (.onnx, OpenVINO .xml, TensorRT .plan)")
    p.add_argument("--output", "-o", required=True, help="model repository folder")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--instance-kind", choices=("cpu", "gpu"),
                   help="instance group kind (default: gpu for .plan files, cpu for .onnx and .xml files)")
    p.add_argument("--ort-tensorrt", choices=("fp32", "fp16"),
                   help="ONNX models on GPU instances: ONNX Runtime's TensorRT execution accelerator with "
                        "this precision_mode (fp16 lets TensorRT run the token matching in fp16 too)")
    p.add_argument("--allow-random-init", action="store_true",
                   help="package files exported without --weights (refused by default)")
    p.set_defaults(func=run)


def run(args) -> int:
    for f in args.files:
        checks.input_file(f, "model file")
    checks.output_folder(args.output, "--output")
    for f in args.files:
        backend = backend_for(f)
        if backend.preflight is not None:
            backend.preflight(f)  # an IR's .bin, a plan's sidecar: all there before anything is written
    notes: list[str] = []
    names = write_repository(args.files, args.output, max_batch=args.max_batch, instances=args.instances,
                             instance_kind=args.instance_kind, ort_tensorrt=args.ort_tensorrt,
                             allow_random_init=args.allow_random_init, notes_out=notes)
    print(f"wrote {args.output}: " + ", ".join(names))
    for note in notes:
        print(f"  note: {note}")
    return 0
