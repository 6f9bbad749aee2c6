#!/usr/bin/env python3
"""Grid sweep of DSM schedules in a FLOP-reduction band (how the README's result table was chosen).

Enumerates `r, r_end, delay, local` (r 8-60 step 2, r_end 0-30 step 2, delay 1-4, local 0-2),
keeps the schedules whose analytic FLOP reduction lies in [LO, HI], takes three per (delay, local)
pair (the smallest, middle and largest r - r_end, ties by FLOP reduction), evaluates each in PyTorch against the unmerged
model on all images and prints KL, agreement and top-1, best KL first.

    python research/sweep_schedules.py 1.70 1.74 --weights ../shared/models/deit_tiny_patch16_224.pth \\
        --images ../shared/data/imagenet-sample
"""

from __future__ import annotations

import argparse
import collections
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lo", type=float)
    parser.add_argument("hi", type=float)
    parser.add_argument("--model", default="deit_tiny_patch16_224")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", required=True)
    args = parser.parse_args(argv)

    from dsm_export.data import list_images
    from dsm_export.errors import ScheduleError
    from dsm_export.check.evaluate import flops_ratio, load_pixels, model_logits, schedule_metrics
    from dsm_export.core.models import create_model
    from dsm_export.core.schedule import Schedule

    model = create_model(args.model, args.weights)
    images = list_images(args.images)
    pixels = load_pixels(images, model, progress=True)
    base = model_logits(model, pixels)
    by_pair = collections.defaultdict(list)
    for delay in range(1, 5):
        for local in range(0, 3):
            for r in range(8, 61, 2):
                for r_end in range(0, 31, 2):
                    s = Schedule(r=r, r_end=r_end, delay=delay, local=local)
                    try:
                        fr = flops_ratio(model, s)
                    except ScheduleError:
                        continue
                    if args.lo <= fr <= args.hi:
                        by_pair[(delay, local)].append((r - r_end, fr, s.spec()))
    chosen = []
    for cands in by_pair.values():
        cands.sort()
        picks = [cands[0], cands[len(cands) // 2], cands[-1]] if len(cands) >= 3 else cands
        chosen += [spec for _, _, spec in dict.fromkeys(picks)]
    print(f"{len(chosen)} schedules in [{args.lo}, {args.hi}]", file=sys.stderr)
    rows = [schedule_metrics(model, Schedule.parse(s), pixels, base, images.labels) for s in chosen]
    for row in sorted(rows, key=lambda r: r["kl"]):
        print(f"{row['schedule']:48s} fr={row['flops_ratio']:.3f} kl={row['kl']:.4f} "
              f"agr={row['top1_agreement']:.3f} acc={row['top1_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
