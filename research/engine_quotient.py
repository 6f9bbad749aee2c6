#!/usr/bin/env python3
"""Does merging pay on a runtime's fastest engine? Each schedule against the same runtime's unmerged engine.

Issue 46's table: for each runtime and precision (OpenVINO INT8 and bf16, ONNX Runtime INT8 and
fp32), the unmerged export and every schedule are built with ``dsm-export build`` (INT8 from the
first ``--calibration-count`` photos of ``--images``), then timed in one alternating run per
runtime, the unmerged engine right before each merged one (median of ``--repeats`` paired
ratios, batch 32, fixed threads). The FLOP ratio is the unmerged *export*'s FLOPs over the
schedule's (both with the last block for the prefix tokens alone, as exported); the quotient is
speed-up / FLOP ratio: 1 where merging pays in full, below 1 where the merge path costs more than
it saves. Issue 46 asks for >= 0.9 on INT8 and >= 0.93 on bf16/fp32.

Each schedule's *token-count twin* (``research/merge_overhead.py``: every merge replaced by keeping
the first tokens, so the blocks run on the merged graph's token counts with no matching, gathers or
proportional attention; not a model, timed only) is built and timed in the same run: its speed-up is
what the token counts alone reach on that engine, and ``1 - speed-up / twin's speed-up`` is the share
of the merged engine's time that its merge path costs. OpenVINO engines split each batch over
streams as the runners do (``dsm_export.engines.openvino.stream_count``).

    python research/engine_quotient.py deit_tiny_patch16_224 \\
        --weights ../shared/models/deit_tiny_patch16_224.pth --images ../shared/data/imagenet-sample

A wider model's merge path costs a smaller share of its time (the model's work grows with the
width squared, the merge path's with the width at most), so the same schedules on DeiT-Small (no weights
are shared for it: ``--weights`` left out, random weights, which time the same)::

    python research/engine_quotient.py deit_small_patch16_224 --engines openvino-int8 openvino-bf16 \\
        --images ../shared/data/imagenet-sample

Never time while another CPU job runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from dsm_export.core.flops import schedule_flops
from dsm_export.core.models import create_model
from dsm_export.core.schedule import Schedule
from dsm_export.engines.openvino import cpu_has_bf16, stream_count
from dsm_export.engines.registry import BuildRequest, RunnerOptions, build_engine, open_runner
from dsm_export.errors import DSMError
from dsm_export.graph.export import export_model
from dsm_export.search.timing import cpu_name
from merge_overhead import export_twin  # research/, beside this script

TWIN = "twin:"  # key prefix of a schedule's token-count twin

SCHEDULES = ["r=16,r_end=4,delay=3", "r=16,r_end=8,delay=3,protect=16,merge=mlerp",
             "r=24,r_end=8,delay=3,protect=16,merge=mlerp"]
ENGINES = {"openvino-int8": ("openvino", "int8", ".xml"), "openvino-bf16": ("openvino", "bf16", ".xml"),
           "onnxruntime-int8": ("onnxruntime", "int8", ".onnx"), "onnxruntime-fp32": ("onnxruntime", "fp32", ".onnx")}
QUOTIENT_FLOOR = {"int8": 0.9, "bf16": 0.93, "fp32": 0.93}


@dataclass(frozen=True)
class Row:
    """One schedule on one engine kind: ``speedup`` over the unmerged engine, ``flops`` its FLOP ratio,
    ``twin`` its token-count twin's speed-up."""

    engine: str
    schedule: str
    flops: float
    speedup: float
    twin: float

    @property
    def merge_share(self) -> float:
        """The share of the merged engine's time its merge path costs: 1 - twin time / merged time."""
        return 1 - self.speedup / self.twin

    @property
    def quotient(self) -> float:
        return self.speedup / self.flops


def build(kind: str, source: str, tmp: str, images: str, count: int) -> str:
    """Build ``source`` (an fp32 export) as engine ``kind``; fp32 ONNX Runtime runs the export itself."""
    backend, precision, suffix = ENGINES[kind]
    if (backend, precision) == ("onnxruntime", "fp32"):
        return source
    out = os.path.join(tmp, f"{os.path.basename(source)[:-5]}-{kind}{suffix}")
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars
        build_engine(BuildRequest(source, out, precision, images if precision == "int8" else None, count),
                     backend, log=lambda line: None)
    return out


def paired_speedups(paths: dict[str, str], batch: int, repeats: int, threads: int, calls: int = 2) -> dict[str, float]:
    """Median of the paired ratios (unmerged time / merged time), ``paths["none"]`` timed before each;
    each time is the mean of ``calls`` consecutive calls."""
    runners = {k: open_runner(p, RunnerOptions(threads=threads)) for k, p in paths.items()}
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    for r in runners.values():  # warm up
        r(x), r(x)
    ratios: dict[str, list[float]] = {k: [] for k in paths if k != "none"}
    for _ in range(repeats):
        for k in ratios:
            took = {}
            for label in ("none", k):
                start = time.perf_counter()
                for _ in range(calls):
                    runners[label](x)
                took[label] = time.perf_counter() - start
            ratios[k].append(took["none"] / took[k])
    for r in runners.values():
        r.close()
    return {k: statistics.median(v) for k, v in ratios.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--weights", help="weights file; without it the model's random initialisation, which times "
                        "the same (the table holds times only; INT8 then calibrates on the random model)")
    parser.add_argument("--images", required=True, help="calibration photos (the first --calibration-count)")
    parser.add_argument("--calibration-count", type=int, default=64)
    parser.add_argument("--schedules", nargs="+", default=SCHEDULES)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2, help="consecutive calls per timing")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    try:
        schedules = [Schedule.parse(s) for s in args.schedules]
        model = create_model(args.model, args.weights, warn_random=False)
        base = schedule_flops(model, Schedule())[0]
        flops = {s.spec(): base / schedule_flops(model, s)[0] for s in schedules}
    except DSMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exports = {"none": os.path.join(tmp, "none.onnx")}
        export_model(model, args.model, exports["none"], Schedule(), weights=args.weights)
        for i, s in enumerate(schedules):
            exports[s.spec()] = os.path.join(tmp, f"m{i}.onnx")
            export_model(model, args.model, exports[s.spec()], s, weights=args.weights)
            exports[TWIN + s.spec()] = os.path.join(tmp, f"t{i}.onnx")
            export_twin(model, args.model, exports[TWIN + s.spec()], s, weights=args.weights)
        for kind in args.engines:
            paths = {k: build(kind, p, tmp, args.images, args.calibration_count) for k, p in exports.items()}
            speedups = paired_speedups(paths, args.batch, args.repeats, args.threads, args.calls)
            rows += [Row(kind, s, flops[s], v, speedups[TWIN + s]) for s, v in speedups.items()
                     if not s.startswith(TWIN)]
    print_table(rows, args)
    return 0


def print_table(rows: list[Row], args) -> None:
    import onnxruntime
    import openvino

    weights = "" if args.weights else " (random weights: times only)"
    print(f"{args.model}{weights}; {cpu_name()}, {os.cpu_count()} logical CPUs, {args.threads} threads, batch {args.batch}, "
          f"median of {args.repeats} paired ratios (the same runtime's unmerged engine timed right before each, "
          f"{args.calls} calls a timing); "
          f"ONNX Runtime {onnxruntime.__version__} CPU, OpenVINO {openvino.get_version().split('-')[0]} CPU; "
          f"OpenVINO batches split over {stream_count(None, args.threads, args.batch)} streams; "
          f"INT8 calibrated on {args.calibration_count} photos; {platform.system()} {platform.release()}.")
    print()
    print("| engine | schedule | FLOPs reduction | speed-up over its unmerged engine | quotient | issue 46 floor "
          "| token-count twin: speed-up | merge path's share of the merged engine's time |")
    print("|---|---|---|---|---|---|---|---|")
    f32_here = not cpu_has_bf16(openvino.Core())  # OpenVINO then runs a bf16 build in f32
    for r in rows:
        floor = QUOTIENT_FLOOR[ENGINES[r.engine][1]]
        mark = "" if r.quotient >= floor else " (below)"
        engine = f"{r.engine} (f32: this CPU has no BF16)" if r.engine == "openvino-bf16" and f32_here else r.engine
        print(f"| {engine} | `{r.schedule}` | {r.flops:.2f}x | {r.speedup:.2f}x | {r.quotient:.2f}{mark} | {floor} "
              f"| {r.twin:.2f}x | {100 * r.merge_share:.0f} % |")


if __name__ == "__main__":
    sys.exit(main())
