#!/usr/bin/env python3
"""Merge variants at fixed FLOP targets: exact ToMe, paper-style DSM, the tuned schedule and the best
of each merge variant, on photos that no choice saw.

For each FLOP target (default 1.5, 1.7, 2.0 and 2.3x fewer FLOPs):

* **exact ToMe**: ``r=R,mode=tome`` (the official timm patch), the smallest constant r that reaches
  the target (ToMe's own clipping lets r exceed half the tokens late in the network);
* **paper-style DSM**: constant r, ``delay=1,local=2`` (2x2 windows), the smallest r that reaches it;
* **tune's variant stage**: ``dsm-export tune --target-flops-ratio`` on the 128 calibration photos
  and their mirror images (``--no-mirror``: the photos alone; :func:`dsm_export.search.schedule_search.with_mirrors`)
  (the search's best grid schedule, then each variant on it: plain, the best ``protect=P``, the best
  ``prune=K``, the best of ``metric=heads`` / ``metric=tokens`` / ``merge=mlerp``, and the best
  combination of the groups' winners);
* **tuned**: the schedule ``tune --target-flops-ratio --export`` writes: the search (variant
  stage, then per-block refinement), then its speed check (:mod:`dsm_export.search.speed_check`): the
  least-KL candidates timed with ONNX Runtime on this machine, the least-KL one whose speed-up is at
  least 0.9 of its FLOP ratio in its lower quartile kept (with ``--no-bench``: the least-KL schedule, untimed).

Every row is scored on the held-apart photos (the split of ``tune --calibration-count 128``): top-1,
top-1 agreement and KL to the unmerged model; then exported to ONNX and timed with ONNX Runtime in
one alternating run with the unmerged export, which runs right before every schedule (batch 32,
``--repeats`` pairs, :func:`dsm_export.search.timing.ort_speedups`; the median of the paired
speed-ups, so that load on a shared machine hits both runs of a pair alike), giving the measured
speed-up and its quotient by the FLOP ratio (the JSON also keeps every pair, the lower quartile,
and for each tuned row the speed check's own timings). Writes Markdown and JSON.

    python research/merge_variants.py deit_tiny_patch16_224 \\
        --weights ../shared/models/deit_tiny_patch16_224.pth \\
        --images ../shared/data/imagenet-sample --output docs

Never time while another CPU job runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile


def smallest_reaching(model, target: float, make) -> str | None:
    """The spec ``make(r)`` with the smallest r whose FLOP ratio reaches ``target``."""
    from dsm_export.errors import ScheduleError
    from dsm_export.check.evaluate import flops_ratio
    from dsm_export.core.schedule import Schedule

    for r in range(1, 99):
        try:
            if flops_ratio(model, Schedule.parse(make(r))) >= target:
                return make(r)
        except ScheduleError:
            continue
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--targets", nargs="+", type=float, default=[1.5, 1.7, 2.0, 2.3])
    parser.add_argument("--calibration-count", type=int, default=128)
    parser.add_argument("--holdout", type=int, help="evaluate on the first N held-apart photos only")
    parser.add_argument("--max-grid", type=int, default=48)
    parser.add_argument("--refine-steps", type=int, default=24)
    parser.add_argument("--no-mirror", action="store_true",
                        help="tune on the calibration photos only, not also on their mirror images")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-bench", action="store_true", help="skip the ONNX Runtime timing")
    parser.add_argument("--output", default="out", help="folder for merge_variants.md and .json")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    os.makedirs(args.output, exist_ok=True)

    import onnxruntime as ort

    from dsm_export.search.timing import cpu_name, ort_speedups
    from dsm_export.data import list_images
    from dsm_export.check.evaluate import model_logits, schedule_metrics, split_pixels
    from dsm_export.graph.export import export_model
    from dsm_export.core.models import create_model
    from dsm_export.core.schedule import Schedule
    from dsm_export.search.speed_check import WARMUP, SpeedCheckSettings, speed_check, speed_stats
    from dsm_export.search.schedule_search import ScheduleSearchSettings, search_schedules, variant_group, variant_label

    model = create_model(args.model, args.weights)
    calib, held, calib_px, held_px = split_pixels(model, list_images(args.images), args.calibration_count,
                                                  args.holdout, progress=True)
    base = model_logits(model, held_px)

    rows = []
    for target in args.targets:
        entries = []
        tome = smallest_reaching(model, target, lambda r: f"r={r},mode=tome")
        paper = smallest_reaching(model, target, lambda r: f"r={r},delay=1,local=2")
        if tome:
            entries.append(("exact ToMe", tome))
        if paper:
            entries.append(("paper-style DSM", paper))
        result = search_schedules(model, calib_px, ScheduleSearchSettings(
            target, max_grid=args.max_grid, refine_steps=args.refine_steps, mirror=not args.no_mirror))
        best_of: dict = {}  # variant group -> its best Candidate
        for row in result.variants:
            family = variant_group(() if row.variant == "plain" else
                                   [part.split("=")[0] for part in row.variant.split(",")])
            if family not in best_of or row.divergence < best_of[family].divergence:
                best_of[family] = row
        names = {"plain": "tune's grid schedule, plain", "protect": "+ protect (best P)",
                 "prune": "+ prune (best K)",
                 "form": "+ metric (heads or tokens) and/or merge=mlerp (best)",
                 "combined": "+ each group's best, combined (best)"}
        for family, row in best_of.items():
            entries.append((names.get(family, family), row.spec))
        tuned, timed = result.best, None
        if not args.no_bench:  # as tune --export does: the least-KL schedule that keeps up in speed
            with tempfile.TemporaryDirectory() as tmp:
                check = speed_check(model, result.evaluated, tmp, SpeedCheckSettings(
                    target, args.model, weights=args.weights, repeats=args.repeats))
            if check.chosen is not None:
                tuned = Schedule.parse(check.chosen.spec)
            timed = [{k: v for k, v in r.to_json().items() if k != "path"} for r in check.rows]
            for row in check.rows:
                print(f"{target}x speed check: {row.speed_per_flop:.2f} (low {row.speed_per_flop_low:.2f}) "
                      f"KL {row.divergence:.4f} {row.spec}", file=sys.stderr, flush=True)
        entries.append((f"tuned (variant: {variant_label(tuned)})", tuned.spec()))
        for kind, spec in entries:
            m = schedule_metrics(model, Schedule.parse(spec), held_px, base, held.labels)
            rows.append({"target": target, "kind": kind, "spec": spec, **m})
            if kind.startswith("tuned") and timed is not None:  # what the speed check measured (calibration KL)
                rows[-1]["speed_check"] = timed
            print(f"{target}x {kind}: {spec} KL {m['kl']:.4f} agreement {m['top1_agreement']:.3f}",
                  file=sys.stderr, flush=True)

    if not args.no_bench:
        with tempfile.TemporaryDirectory() as tmp:
            paths = {"none": os.path.join(tmp, "none.onnx")}
            # The baseline: timm's model (every block on every token), as the FLOP ratios count it.
            export_model(model, args.model, paths["none"], Schedule(), weights=args.weights, full_last_block=True)
            for i, row in enumerate(rows):
                if row["spec"] not in [r["spec"] for r in rows[:i]]:
                    paths[row["spec"]] = os.path.join(tmp, f"s{i}.onnx")
                    export_model(model, args.model, paths[row["spec"]], Schedule.parse(row["spec"]),
                                 weights=args.weights)
            pairs = ort_speedups(paths, "none", batch=32, repeats=args.repeats, iters=2, warmup=WARMUP)
        for row in rows:
            row.update(speed_stats(pairs[row["spec"]], row["flops_ratio"]))

    machine = (f"{cpu_name()}, {os.cpu_count()} threads, ONNX Runtime {ort.__version__} CPU, batch 32, "
               f"median of {args.repeats} paired speed-ups (the unmerged baseline timed right before each schedule), "
               f"{platform.system()} {platform.release()}")
    base_acc = rows[0]["baseline_top1_accuracy"]
    lines = [
        f"{args.model}, {len(held)} photos held apart from every choice (tune and variant choice on "
        f"{len(calib)} others{'' if args.no_mirror else ' and their mirror images'}); {machine}.",
        "",
        f"| target | schedule | spec | FLOPs reduction | top-1 (unmerged {100 * base_acc:.1f} %) | agreement | KL "
        "| ORT speed-up | speed-up / FLOP ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spec = r["spec"] if not r["spec"].startswith("{") else "per-block JSON (see merge_variants.json)"
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        quot = f"{r['speed_per_flop']:.2f}" if "speed_per_flop" in r else "-"
        lines.append(f"| {r['target']:.1f}x | {r['kind']} | `{spec}` | {r['flops_ratio']:.2f}x | "
                     f"{100 * r['top1_accuracy']:.1f} % | {100 * r['top1_agreement']:.1f} % | {r['kl']:.4f} | "
                     f"{speed} | {quot} |")
    text = "\n".join(lines) + "\n"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(os.path.join(args.output, "merge_variants.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    with open(os.path.join(args.output, "merge_variants.json"), "w", encoding="utf-8") as fh:
        json.dump({"machine": machine, "when": stamp, "held_apart": len(held), "rows": rows}, fh, indent=1,
                  default=float)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
