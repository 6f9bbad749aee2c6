#!/usr/bin/env python3
"""ONNX Runtime throughput and batch-1 latency: a merged (or INT8) export against the unmerged export.

Runs the two graphs alternately on the same random batch, several repetitions each, and reports the
median images/s of each and their ratio, then the batch-1 latency (p50, p90 over --latency-runs
single-image runs, graphs alternating), with the machine, the CPU and the thread count.

    python scripts/bench_ort.py deit_dsm.onnx deit_none.onnx --batch 32 --repeats 7
    python scripts/bench_ort.py deit_dsm.onnx deit_none.onnx --provider cuda   # onnxruntime-gpu

If the second file is omitted, the unmerged model as timm runs it (every block on every token, no
`none` export's class-token-only last block) is exported in a temporary folder as the baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("merged", help="merged (DSM/ToMe) ONNX export")
    parser.add_argument("baseline", nargs="?", help="unmerged export (default: exported on the fly)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="repetitions; the median is reported (>= 5)")
    parser.add_argument("--iters", type=int, default=2, help="runs per repetition")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--latency-runs", type=int, default=50, help="batch-1 runs per graph (>= 50; 0 skips)")
    parser.add_argument("--provider", default="cpu",
                        help="execution provider: cpu, cuda, tensorrt, openvino or a full ONNX Runtime name")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    if 0 < args.latency_runs < 50:
        parser.error("--latency-runs must be 0 or at least 50")
    import onnxruntime as ort

    from dsm_export.benchmark import cpu_name, ort_latency, ort_throughput
    from dsm_export.errors import DSMError
    from dsm_export.export import export_onnx, load_onnx, read_metadata, weights_path
    from dsm_export.providers import resolve_providers

    try:
        providers = resolve_providers(args.provider)
        proto = load_onnx(args.merged)
        info = read_metadata(proto, args.merged)
        precision = {p.key: p.value for p in proto.metadata_props}.get("dsm.precision", "fp32")
        with tempfile.TemporaryDirectory() as tmp:
            baseline = args.baseline
            if baseline is None:
                baseline = os.path.join(tmp, "none.onnx")
                export_onnx(info.model, baseline, "none", weights_path(info, args.merged) or None,
                            batch=info.batch, pretrained=info.pretrained, num_classes=info.num_classes,
                            full_last_block=True)  # timm's model: every block on every token
            rates = ort_throughput({"merged": args.merged, "none": baseline}, args.batch, args.repeats,
                                   args.warmup, args.threads, args.iters, provider=args.provider)
            latency = (ort_latency({"merged": args.merged, "none": baseline}, args.latency_runs,
                                   threads=args.threads, provider=args.provider)
                       if args.latency_runs and info.batch in (None, 1) else None)
    except DSMError as exc:
        print(f"bench_ort: error: {exc}", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count()
    print(f"machine: {platform.node()} | {cpu_name()} | {os.cpu_count()} logical CPUs | "
          f"onnxruntime {ort.__version__} {providers[0]} | intra-op threads {threads}")
    print(f"model {info.model}, schedule {info.schedule.spec()}, {precision}, batch {args.batch}, "
          f"median of {args.repeats} repetitions x {args.iters} runs, graphs alternating")
    print(f"  none   : {rates['none']:8.1f} images/s")
    print(f"  merged : {rates['merged']:8.1f} images/s")
    print(f"  ratio  : {rates['merged'] / rates['none']:.2f}x")
    if args.latency_runs and info.batch not in (None, 1):
        print(f"batch-1 latency: skipped (the graph's batch is fixed at {info.batch})")
    if latency:
        print(f"batch-1 latency, {args.latency_runs} runs per graph, graphs alternating:")
        for k in ("none", "merged"):
            print(f"  {k:6} : p50 {latency[k]['p50']:6.2f} ms, p90 {latency[k]['p90']:6.2f} ms")
        print(f"  ratio  : {latency['none']['p50'] / latency['merged']['p50']:.2f}x at p50")
    return 0


if __name__ == "__main__":
    sys.exit(main())
