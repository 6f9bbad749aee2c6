"""Subcommand ``bench``: throughput and batch-1 latency of a merged engine against the unmerged one.

ONNX files run in ONNX Runtime (any execution provider): the two graphs alternate on the same random
batch, several repetitions each, and the median images/s of each and their ratio are reported, then
the batch-1 latency (p50, p90 over --latency-runs single-image runs, graphs alternating), with the
machine, the CPU and the thread count. Without a second file the unmerged model as timm runs it
(every block on every token) is exported in a temporary folder as the baseline.

OpenVINO IRs (``.xml``, from ``build --backend openvino``) run in OpenVINO on the CPU at the precision
they record, alternating with two unmerged baselines: OpenVINO's default compile of the unmerged model
(bf16 on a CPU that has it; the fastest unmerged engine of that runtime) and ONNX Runtime fp32. A
second .xml replaces the OpenVINO baseline.

TensorRT engines (``.plan``) run on an NVIDIA GPU through :class:`dsm_export.engines.TensorRTRunner`:
device-resident input, CUDA events, median of the repetitions, engines alternating. Where no GPU is
visible this says so in one line (exit 2) before anything runs.

    dsm-export bench out/deit_tiny_dsm.onnx --batch 32
    dsm-export bench dsm.plan none.plan --batch 32
    dsm-export bench out/deit_tiny_dsm_int8.xml --batch 32
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile

from ..errors import DSMError
from ._common import TENSORRT_FLAVOURS


def add(sub):
    p = sub.add_parser("bench", help="throughput and batch-1 latency: a merged engine against the unmerged one")
    p.add_argument("merged", help="merged (DSM/ToMe, INT8) ONNX export, an OpenVINO .xml, or a TensorRT .plan")
    p.add_argument("baseline", nargs="?",
                   help="unmerged export or .plan (default for ONNX: exported on the fly; a .plan needs one)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7, help="repetitions; the median is reported (>= 5)")
    p.add_argument("--iters", type=int, default=2, help="runs per repetition")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op (OpenVINO inference) threads (default: all cores)")
    p.add_argument("--latency-runs", type=int, default=50, help="batch-1 runs per graph (>= 50; 0 skips)")
    p.add_argument("--provider", default="cpu",
                   help="ONNX Runtime execution provider: cpu, cuda, tensorrt, openvino or a full name")
    p.add_argument("--tensorrt", choices=TENSORRT_FLAVOURS, default="auto",
                   help=".plan files: the TensorRT flavour (default: the one each sidecar names)")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import checks

    if args.repeats < 5:
        raise DSMError("--repeats must be at least 5")
    if 0 < args.latency_runs < 50:
        raise DSMError("--latency-runs must be 0 or at least 50")
    files = [f for f in (args.merged, args.baseline) if f]
    for f in files:
        checks.input_file(f, "engine" if f.endswith(".plan") else "ONNX file")
    if files[0].endswith(".xml"):
        if args.baseline and not args.baseline.endswith(".xml"):
            raise DSMError("an OpenVINO .xml is timed against another .xml (or, given none, the unmerged model)")
        if args.provider != "cpu":
            raise DSMError("--provider is for ONNX files: an OpenVINO IR runs in OpenVINO on the CPU")
        return _bench_openvino(args)
    plans = [f.endswith(".plan") for f in files]
    if any(plans):
        if not all(plans) or len(files) != 2:
            raise DSMError("a TensorRT .plan is timed against another .plan: give the merged and the unmerged engine")
        return _bench_plans(args)
    return _bench_onnx(args)


def _print_rates(rates: dict[str, float]) -> None:
    print(f"  none   : {rates['none']:8.1f} images/s")
    print(f"  merged : {rates['merged']:8.1f} images/s")
    print(f"  ratio  : {rates['merged'] / rates['none']:.2f}x")


def _bench_plans(args) -> int:
    from ..engines.tensorrt import TensorRTRunner, engine_info, gpu_info, require_gpu

    require_gpu()
    runners = {"merged": TensorRTRunner(args.merged, args.tensorrt), "none": TensorRTRunner(args.baseline, args.tensorrt)}
    info, sidecar = engine_info(args.merged)
    rates = {k: [] for k in runners}
    for _ in range(args.repeats):  # engines alternate; each figure is itself a median of 3 event timings
        for k, r in runners.items():
            rates[k].append(r.throughput(args.batch, repeats=3, iters=args.iters, warmup=args.warmup))
    med = {k: statistics.median(v) for k, v in rates.items()}
    gpu = gpu_info()
    print(f"machine: {platform.node()} | {gpu['gpu']} (compute capability {gpu['compute_capability']}) | "
          f"{runners['merged'].trt.name}")
    print(f"model {info.model}, schedule {info.schedule.spec()}, {sidecar.get('precision')}, batch {args.batch}, "
          f"median of {args.repeats} repetitions x {args.iters} runs, engines alternating")
    _print_rates(med)
    return 0


def _bench_openvino(args) -> int:
    import numpy as np
    import onnxruntime as ort

    from ..search.timing import alternating_throughput, cpu_name, make_session
    from ..engines.openvino import OpenVINORunner, import_openvino, read_ir_metadata
    from ..graph.export import export_onnx, weights_path

    ov = import_openvino()
    info, meta = read_ir_metadata(args.merged)
    if info.batch and args.batch != info.batch:
        raise DSMError(f"{args.merged!r} has a fixed batch of {info.batch}: give --batch {info.batch}")
    merged = OpenVINORunner(args.merged, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        none_onnx = os.path.join(tmp, "none.onnx")
        export_onnx(info.model, none_onnx, "none", weights_path(info, args.merged) or None, batch=info.batch,
                    pretrained=info.pretrained, num_classes=info.num_classes, full_last_block=True)
        config = {"INFERENCE_NUM_THREADS": int(args.threads)} if args.threads else {}
        ov_none = (OpenVINORunner(args.baseline, args.threads).compiled if args.baseline
                   else merged.core.compile_model(ov.convert_model(none_onnx), "CPU", config))
        session = make_session(none_onnx, args.threads, spinning=False)  # its threads would slow the next engine
        x = np.random.default_rng(0).standard_normal([args.batch, *info.input_size], dtype=np.float32)
        requests = {"merged": merged.compiled.create_infer_request(), "openvino": ov_none.create_infer_request()}
        name = session.get_inputs()[0].name
        runs = {"merged": lambda: requests["merged"].infer({0: x}),
                "openvino": lambda: requests["openvino"].infer({0: x}),
                "onnxruntime": lambda: session.run(None, {name: x})}
        rates = alternating_throughput(runs, args.batch, args.repeats, args.warmup, args.iters)
    none_precision = ov_none.get_property("INFERENCE_PRECISION_HINT").to_string()
    threads = args.threads or os.cpu_count()
    print(f"machine: {platform.node()} | {cpu_name()} | {os.cpu_count()} logical CPUs | openvino "
          f"{ov.__version__.split('-')[0]}, onnxruntime {ort.__version__} | threads {threads}")
    print(f"model {info.model}, schedule {info.schedule.spec()}, {meta.get('precision', 'fp32')} "
          f"(OpenVINO running {merged.inference_precision}), batch {args.batch}, median of {args.repeats} "
          f"repetitions x {args.iters} runs, engines alternating")
    base = "the given baseline" if args.baseline else "unmerged, OpenVINO's default compile"
    print(f"  ort fp32 : {rates['onnxruntime']:8.1f} images/s (unmerged, ONNX Runtime fp32)")
    print(f"  openvino : {rates['openvino']:8.1f} images/s ({base}, running {none_precision})")
    print(f"  merged   : {rates['merged']:8.1f} images/s")
    print(f"  ratio    : {rates['merged'] / rates['openvino']:.2f}x against OpenVINO's baseline, "
          f"{rates['merged'] / rates['onnxruntime']:.2f}x against ONNX Runtime fp32")
    if args.latency_runs:
        print("batch-1 latency: not measured for OpenVINO engines (time ONNX files for it)")
    return 0


def _bench_onnx(args) -> int:
    import onnxruntime as ort

    from ..search.timing import cpu_name, ort_latency, ort_throughput
    from ..graph.export import export_onnx, load_onnx, read_metadata, weights_path
    from ..engines.providers import resolve_providers

    providers = resolve_providers(args.provider)
    proto = load_onnx(args.merged, weights=False)
    info = read_metadata(proto, args.merged)
    precision = {p.key: p.value for p in proto.metadata_props}.get("dsm.precision", "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        baseline = args.baseline
        if baseline is None:
            baseline = os.path.join(tmp, "none.onnx")
            export_onnx(info.model, baseline, "none", weights_path(info, args.merged) or None,
                        batch=info.batch, pretrained=info.pretrained, num_classes=info.num_classes,
                        full_last_block=True)  # timm's model: every block on every token
        paths = {"merged": args.merged, "none": baseline}
        rates = ort_throughput(paths, args.batch, args.repeats, args.warmup, args.threads, args.iters,
                               provider=args.provider)
        latency = (ort_latency(paths, args.latency_runs, threads=args.threads, provider=args.provider)
                   if args.latency_runs and info.batch in (None, 1) else None)
    threads = args.threads or os.cpu_count()
    print(f"machine: {platform.node()} | {cpu_name()} | {os.cpu_count()} logical CPUs | "
          f"onnxruntime {ort.__version__} {providers[0]} | intra-op threads {threads}")
    print(f"model {info.model}, schedule {info.schedule.spec()}, {precision}, batch {args.batch}, "
          f"median of {args.repeats} repetitions x {args.iters} runs, graphs alternating")
    _print_rates(rates)
    if args.latency_runs and info.batch not in (None, 1):
        print(f"batch-1 latency: skipped (the graph's batch is fixed at {info.batch})")
    if latency:
        print(f"batch-1 latency, {args.latency_runs} runs per graph, graphs alternating:")
        for k in ("none", "merged"):
            print(f"  {k:6} : p50 {latency[k]['p50']:6.2f} ms, p90 {latency[k]['p90']:6.2f} ms")
        print(f"  ratio  : {latency['none']['p50'] / latency['merged']['p50']:.2f}x at p50")
    return 0
