"""Subcommand ``bench``: throughput and batch-1 latency of a merged engine against the unmerged one, for
an engine of any registered backend (:mod:`dsm_export.engines.registry`).

The merged engine and its baseline run through their backend's :class:`~dsm_export.engines.Runner`
and alternate on the same random batch, several repetitions each; the median images/s of each and
their ratio are reported, then (engines that take one image) the batch-1 latency (p50, p90 over
--latency-runs single-image runs, engines alternating), with the machine, the runtime and the threads.

The baseline is the second file, of the same backend; without one, the unmerged model as timm runs it
(every block on every token) is exported in a temporary folder and the backend makes its fastest
unmerged engine of it (ONNX Runtime: the export itself; OpenVINO: its default compile, bf16 on a CPU
that has it; ExecuTorch: an fp32 program). Backends that run on the CPU beside ONNX Runtime
(OpenVINO) are also timed against ONNX Runtime's fp32 unmerged model. A backend that needs a GPU
(TensorRT) says so in one line (exit 2) before anything runs where none is visible, times on the
device (CUDA events) and takes its baseline as a second file.

    dsm-export bench out/deit_tiny_dsm.onnx --batch 32
    dsm-export bench dsm.plan none.plan --batch 32
    dsm-export bench out/deit_tiny_dsm_int8.xml --batch 32
    dsm-export bench dsm_int8.pte none.pte --batch 8
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from .. import checks
from ..engines.registry import Backend, Runner, RunnerOptions, backend_for, open_runner
from ..errors import DSMError
from ..graph.export import export_onnx, weights_path
from ..search.timing import alternating_throughput, cpu_name
from ._common import TENSORRT_FLAVOURS


def add(sub):
    p = sub.add_parser("bench", help="throughput and batch-1 latency: a merged engine against the unmerged one")
    p.add_argument("merged", help="merged (DSM/ToMe, INT8) engine: .onnx, OpenVINO .xml, TensorRT .plan, "
                                  "ExecuTorch .pte")
    p.add_argument("baseline", nargs="?",
                   help="unmerged engine of the same backend (default: made from an unmerged export on the fly; "
                        "a .plan needs one)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7, help="repetitions; the median is reported (>= 5)")
    p.add_argument("--iters", type=int, default=2, help="runs per repetition")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="intra-op (inference) threads (default: all cores)")
    p.add_argument("--streams", type=int,
                   help="OpenVINO: streams a batch is split over, run in parallel (default: one per thread, "
                        "at most one per image; 1: one request on every thread)")
    p.add_argument("--latency-runs", type=int, default=50, help="batch-1 runs per engine (>= 50; 0 skips)")
    p.add_argument("--provider", default="cpu",
                   help="ONNX Runtime execution provider: cpu, cuda, tensorrt, openvino or a full name")
    p.add_argument("--tensorrt", choices=TENSORRT_FLAVOURS, default="auto",
                   help=".plan files: the TensorRT flavour (default: the one each sidecar names)")
    p.set_defaults(func=run)


@dataclass
class Timed:
    """The engines of one bench run: label -> runner, and what each baseline is."""

    runners: dict[str, Runner]
    notes: dict[str, str]


def run(args) -> int:
    backend = _check(args)
    options = RunnerOptions(threads=args.threads, provider=args.provider, flavour=args.tensorrt,
                            spinning=False if backend.timed_against_runtime else None, streams=args.streams)
    merged = open_runner(args.merged, options)  # the runtime (a GPU where it needs one) before any export
    engine = merged.engine_file
    if engine.static_batch and args.batch != engine.static_batch:
        raise DSMError(f"{args.merged!r} has a fixed batch of {engine.static_batch}: give --batch {engine.static_batch}")
    with tempfile.TemporaryDirectory() as tmp:
        timed = _engines(backend, merged, args, options, tmp)
        try:
            rates = _throughput(timed.runners, engine.info.input_size, args)
            latency = _latency(timed.runners, engine.info.input_size, args.latency_runs) \
                if args.latency_runs and all(r.engine_file.static_batch in (None, 1) for r in timed.runners.values()) \
                else None
        finally:
            for r in timed.runners.values():
                r.close()
    _print(args, backend, timed, rates, latency)
    return 0


def _check(args) -> Backend:
    """Every mistake refused (one line) before any engine is loaded."""
    if args.repeats < 5:
        raise DSMError("--repeats must be at least 5")
    if 0 < args.latency_runs < 50:
        raise DSMError("--latency-runs must be 0 or at least 50")
    backend = backend_for(args.merged)
    for f in (args.merged, args.baseline):
        if f:
            checks.input_file(f, "engine")
            if backend.preflight is not None:
                backend.preflight(f)
    if args.baseline and backend_for(args.baseline) is not backend:
        raise DSMError(f"a {backend.label} engine is timed against another {backend.label} engine "
                       f"({' or '.join(backend.suffixes)}), or, given none, the unmerged model")
    if backend.baseline is None and not args.baseline:
        raise DSMError(f"a {backend.label} engine is timed against another: give the merged and the unmerged engine")
    if args.streams is not None and (args.streams < 1 or backend.streams is None):
        raise DSMError("--streams is a count of at least 1, for OpenVINO engines (.xml)")
    if args.provider != "cpu" and not backend.providers:
        raise DSMError(f"--provider is for ONNX files: a {backend.label} engine runs in {backend.label}")
    return backend


def _engines(backend: Backend, merged: Runner, args, options: RunnerOptions, tmp: str) -> Timed:
    """The merged engine, its baseline and (CPU backends beside ONNX Runtime) ONNX Runtime's fp32 unmerged model."""
    runners, notes = {"merged": merged}, {}
    none_onnx = None
    if not args.baseline or backend.timed_against_runtime:
        info = merged.engine_file.info
        none_onnx = os.path.join(tmp, "none.onnx")
        export_onnx(info.model, none_onnx, "none", weights_path(info, args.merged) or None, batch=info.batch,
                    pretrained=info.pretrained, num_classes=info.num_classes,
                    full_last_block=True)  # timm's model: every block on every token
    if args.baseline:
        runners[backend.name] = open_runner(args.baseline, options)
        notes[backend.name] = "the given baseline"
    else:
        runners[backend.name] = backend.baseline(none_onnx, options, tmp)
        notes[backend.name] = f"unmerged, {runners[backend.name].label}"
    if backend.timed_against_runtime:
        runners["ort fp32"] = open_runner(none_onnx, RunnerOptions(threads=args.threads, spinning=False))
        notes["ort fp32"] = "unmerged, ONNX Runtime fp32"
    return Timed(runners, notes)


def _throughput(runners: dict[str, Runner], input_size, args) -> dict[str, float]:
    """Median images/s of each engine, alternating: on the device where the runners time themselves
    (TensorRT: CUDA events, device-resident input), else through their calls on one random batch."""
    if all(hasattr(r, "throughput") for r in runners.values()):
        rates = {k: [] for k in runners}
        for _ in range(args.repeats):  # engines alternate; each figure is itself a median of 3 event timings
            for k, r in runners.items():
                rates[k].append(r.throughput(args.batch, repeats=3, iters=args.iters, warmup=args.warmup))
        return {k: statistics.median(v) for k, v in rates.items()}
    x = np.random.default_rng(0).standard_normal([args.batch, *input_size], dtype=np.float32)
    runs = {k: (lambda r=r: r(x)) for k, r in runners.items()}
    return alternating_throughput(runs, args.batch, args.repeats, args.warmup, args.iters)


def _latency(runners: dict[str, Runner], input_size, runs: int, warmup: int = 5) -> dict[str, dict[str, float]]:
    """Batch-1 latency (p50, p90 in ms) of each engine, engines alternating run by run."""
    x = np.random.default_rng(0).standard_normal([1, *input_size], dtype=np.float32)
    for _ in range(warmup):
        for r in runners.values():
            r(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(runs):
        for k, r in runners.items():
            start = time.perf_counter()
            r(x)
            times[k].append(1000 * (time.perf_counter() - start))
    return {k: {f"p{q}": float(np.percentile(v, q)) for q in (50, 90)} for k, v in times.items()}


def _print(args, backend: Backend, timed: Timed, rates: dict[str, float], latency) -> None:
    merged = timed.runners["merged"]
    info = merged.engine_file.info
    threads = args.threads or os.cpu_count()
    labels = sorted({r.label for r in timed.runners.values()})
    streams = f" | {backend.label} streams {backend.streams(args.streams, args.threads, args.batch)}" \
        if backend.streams else ""
    print(f"machine: {platform.node()} | {cpu_name()} | {os.cpu_count()} logical CPUs | {'; '.join(labels)} | "
          f"intra-op threads {threads}{streams}")
    print(f"model {info.model}, schedule {info.schedule.spec()}, {merged.engine_file.precision} (judged as "
          f"{merged.judged_as}), batch {args.batch}, median of {args.repeats} repetitions x {args.iters} runs, "
          "engines alternating")
    width = max(len(k) for k in rates)
    for k in [k for k in rates if k != "merged"] + ["merged"]:
        print(f"  {k:{width}} : {rates[k]:8.1f} images/s" + (f" ({timed.notes[k]})" if k in timed.notes else ""))
    ratios = [f"{rates['merged'] / rates[backend.name]:.2f}x against {backend.label}'s baseline"]
    if "ort fp32" in rates:
        ratios.append(f"{rates['merged'] / rates['ort fp32']:.2f}x against ONNX Runtime fp32")
    print(f"  {'ratio':{width}} : {', '.join(ratios)}")
    if args.latency_runs and latency is None:
        print(f"batch-1 latency: skipped (an engine's batch is fixed at {info.batch})")
    if latency:
        print(f"batch-1 latency, {args.latency_runs} runs per engine, engines alternating:")
        for k, v in latency.items():
            print(f"  {k:{width}} : p50 {v['p50']:6.2f} ms, p90 {v['p90']:6.2f} ms")
        print(f"  {'ratio':{width}} : {latency[backend.name]['p50'] / latency['merged']['p50']:.2f}x at p50")
