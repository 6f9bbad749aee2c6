"""Subcommand ``predict``: an engine of any backend over an image folder or a Parquet list of images,
one Parquet row per image (top-k classes or the embedding), resumable; ``--ray`` runs it as a Ray Data
pipeline (:mod:`dsm_export.serving.predict`).

    dsm-export predict out/deit_tiny_dsm.onnx --images photos/ --output preds.parquet
    dsm-export predict out/deit_tiny_dsm_int8.xml --images list.parquet --output preds.parquet --ray
"""

from __future__ import annotations

import signal

from .. import checks
from ..engines.registry import RunnerOptions, backend_for, import_optional
from ..serving.predict import PredictOptions, list_inputs, predict
from ._common import add_ray_args, ray_options


def add(sub):
    p = sub.add_parser("predict", help="run an engine over a data set of images, rows to Parquet (resumable)")
    p.add_argument("engine", metavar="ENGINE", help="an engine of any backend: .onnx, OpenVINO .xml, "
                                                     "TensorRT .plan, ExecuTorch .pte")
    p.add_argument("--images", required=True,
                   help="image folder (searched recursively) or a .parquet file with a 'path' column")
    p.add_argument("--output", required=True, metavar="OUT.parquet",
                   help="Parquet folder to write (part files); an existing one from an earlier run is resumed")
    p.add_argument("--top-k", type=int, default=5, help="classes per image, best first (classifiers; default 5)")
    p.add_argument("--logits", action="store_true", help="also write every logit (classifiers)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rows-per-file", type=int, default=1024, help="rows per Parquet part (default 1024)")
    p.add_argument("--limit", type=int, help="only the first N images of the listing")
    p.add_argument("--threads", type=int, help="intra-op threads of a local run (default: all cores)")
    p.add_argument("--provider", default="cpu",
                   help="ONNX Runtime execution provider: cpu, cuda, tensorrt, openvino or a full name")
    add_ray_args(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    options = PredictOptions(top_k=args.top_k, logits=args.logits, batch_size=args.batch_size,
                             rows_per_file=args.rows_per_file, limit=args.limit, progress=not args.no_progress)
    options.check()
    backend = backend_for(args.engine)
    checks.input_file(args.engine, "engine")
    if backend.preflight is not None:
        backend.preflight(args.engine)
    import_optional("pyarrow.parquet", "predict", "pyarrow (Parquet output)")
    ray = ray_options(args)
    list_inputs(args.images, args.limit)  # a bad source is one line before the engine loads
    runner_options = RunnerOptions(threads=args.threads, provider=args.provider)
    # SIGTERM as Ctrl-C: the rows already computed are written as a last part, then exit 130.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        summary = predict(args.engine, args.images, args.output, runner_options, options, ray)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{summary.written} rows written to {summary.output} ({summary.already_done} of {summary.images} "
          f"images done before, {summary.unreadable} unreadable), {summary.images_per_s:.1f} images/s, "
          f"{summary.runner}" + (f", {summary.ray}" if summary.ray else ""))
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt
