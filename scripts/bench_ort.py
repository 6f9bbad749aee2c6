#!/usr/bin/env python3
"""ONNX Runtime throughput: a merged export against the unmerged (`none`) export.

Runs the two graphs alternately on the same random batch, several repetitions each, and reports the
median images/s of each and their ratio, with the machine, the CPU and the thread count.

    python scripts/bench_ort.py deit_dsm.onnx deit_none.onnx --batch 32 --repeats 7
    python scripts/bench_ort.py deit_dsm.onnx deit_none.onnx --provider cuda   # onnxruntime-gpu

If the second file is omitted, the `none` export of the same model is made in a temporary folder.
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
    parser.add_argument("--provider", default="cpu",
                        help="execution provider: cpu, cuda, tensorrt, openvino or a full ONNX Runtime name")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    import onnxruntime as ort

    from dsm_export.benchmark import cpu_name, ort_throughput
    from dsm_export.errors import DSMError
    from dsm_export.export import export_onnx, load_onnx, read_metadata, weights_path
    from dsm_export.providers import resolve_providers

    try:
        providers = resolve_providers(args.provider)
        info = read_metadata(load_onnx(args.merged), args.merged)
        with tempfile.TemporaryDirectory() as tmp:
            baseline = args.baseline
            if baseline is None:
                baseline = os.path.join(tmp, "none.onnx")
                export_onnx(info.model, baseline, "none", weights_path(info, args.merged) or None,
                            batch=info.batch, pretrained=info.pretrained, num_classes=info.num_classes)
            rates = ort_throughput({"merged": args.merged, "none": baseline}, args.batch, args.repeats,
                                   args.warmup, args.threads, args.iters, provider=args.provider)
    except DSMError as exc:
        print(f"bench_ort: error: {exc}", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count()
    print(f"machine: {platform.node()} | {cpu_name()} | {os.cpu_count()} logical CPUs | "
          f"onnxruntime {ort.__version__} {providers[0]} | intra-op threads {threads}")
    print(f"model {info.model}, schedule {info.schedule.spec()}, batch {args.batch}, "
          f"median of {args.repeats} repetitions x {args.iters} runs, graphs alternating")
    print(f"  none   : {rates['none']:8.1f} images/s")
    print(f"  merged : {rates['merged']:8.1f} images/s")
    print(f"  ratio  : {rates['merged'] / rates['none']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
