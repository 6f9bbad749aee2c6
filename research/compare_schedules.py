#!/usr/bin/env python3
"""Compare merge schedules on real images: accuracy, agreement, KL, FLOPs and ORT throughput.

Each schedule is evaluated in PyTorch (reference implementation) against the unmerged model on an
image folder, then exported to ONNX and timed with ONNX Runtime on the CPU against the `none`
export (batch 32, graphs alternating, median of several repetitions). Prints a Markdown table.

    python research/compare_schedules.py deit_tiny_patch16_224 \\
        --weights ../shared/models/deit_tiny_patch16_224.pth \\
        --images ../shared/data/imagenet-sample \\
        r=13 r=34,r_end=0,delay=3,local=1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("schedules", nargs="+", help="schedule specs")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--batch", type=int, default=32, help="ORT benchmark batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-bench", action="store_true", help="skip the ONNX Runtime timing")
    parser.add_argument("--json", dest="json_path", help="also write the rows as JSON")
    parser.add_argument("--exclude-calibration", type=int, metavar="N",
                        help="evaluate only on the images held apart from `dsm-export tune --calibration N`")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from dsm_export.search.timing import cpu_name, ort_throughput
    from dsm_export.data import list_images, split_calibration
    from dsm_export.errors import DSMError
    from dsm_export.check.evaluate import load_pixels, model_logits, schedule_metrics
    from dsm_export.graph.export import export_onnx
    from dsm_export.core.models import create_model
    from dsm_export.core.schedule import Schedule

    try:
        model = create_model(args.model, args.weights)
        images = list_images(args.images)
        if args.exclude_calibration:
            images = split_calibration(images, args.exclude_calibration)[1]
        pixels = load_pixels(images, model, progress=True)
        base = model_logits(model, pixels)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            none_path = os.path.join(tmp, "none.onnx")
            if not args.no_bench:
                export_onnx(args.model, none_path, "none", args.weights, full_last_block=True)
            for i, spec in enumerate(args.schedules):
                schedule = Schedule.parse(spec)
                row = schedule_metrics(model, schedule, pixels, base, images.labels)
                row["schedule"] = spec
                if not args.no_bench:
                    path = os.path.join(tmp, f"s{i}.onnx")
                    export_onnx(args.model, path, schedule, args.weights)
                    rates = ort_throughput({"merged": path, "none": none_path}, args.batch, args.repeats)
                    row["ort_ratio"] = rates["merged"] / rates["none"]
                    os.unlink(path)
                rows.append(row)
                print(f"{spec}: {row}", file=sys.stderr, flush=True)
    except DSMError as exc:
        print(f"compare_schedules: error: {exc}", file=sys.stderr)
        return 2

    print(f"{args.model}, {len(images)} images; ONNX Runtime {ort.__version__} CPU, {cpu_name()}, "
          f"{os.cpu_count()} threads, batch {args.batch}, median of {args.repeats}")
    print()
    print("| schedule | FLOPs reduction | top-1 (unmerged {:.1f} %) | agreement | KL | ORT speed-up |".format(
        100 * rows[0]["baseline_top1_accuracy"]))
    print("|---|---|---|---|---|---|")
    for r in rows:
        ort_ratio = f"{r['ort_ratio']:.2f}x" if "ort_ratio" in r else "-"
        print(f"| `{r['schedule']}` | {r['flops_ratio']:.2f}x | {100 * r['top1_accuracy']:.1f} % | "
              f"{100 * r['top1_agreement']:.1f} % | {r['kl']:.4f} | {ort_ratio} |")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
