#!/usr/bin/env python3
"""How far chance moves the merge-variants table: bootstrap intervals on its held-apart photos.

Reads ``merge_variants.json`` (written by ``research/merge_variants.py``), scores the rows of the
chosen kinds again on the same held-apart photos (the split of ``tune --calibration N``, PyTorch
reference implementation, as that script does) and reports, for each row:

* KL to the unmerged model and top-1 agreement with it, each with a 95 % percentile bootstrap
  interval over the photos (:func:`dsm_export.check.evaluate.bootstrap_interval`);
* the paired KL difference to the exact ToMe row of the same target (same photos, so the photos'
  shared difficulty cancels), with its interval: an interval below zero means the row beats ToMe
  beyond what resampling the photos explains.

The recomputed KL must match the JSON's (same photos, same code); the largest difference is printed.

With ``--previous OTHER.json`` (another run of ``merge_variants.py`` on the same photos, e.g. before a
change to ``tune``), a second table pairs each target's tuned row with OTHER's: the KL and
agreement differences, this run minus OTHER, with their intervals. An interval containing zero
means the two runs' choices differ by no more than resampling the photos explains.

    python research/held_apart_ci.py deit_tiny_patch16_224 \\
        --weights ../shared/models/deit_tiny_patch16_224.pth \\
        --images ../shared/data/imagenet-sample --json docs/merge_variants.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_KINDS = ("exact ToMe", "tuned")


def _rows(path: str, kinds: tuple[str, ...]) -> list[dict] | None:
    """The rows of merge_variants.py JSON ``path`` whose kind starts with one of ``kinds``; None
    (after one line on stderr) if the file is not such a JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return [r for r in json.load(fh)["rows"] if r["kind"].startswith(kinds)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        print(f"error: {path} is not a merge_variants.py JSON ({exc})", file=sys.stderr)
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--json", default="docs/merge_variants.json", help="merge_variants.py's JSON")
    parser.add_argument("--calibration-count", type=int, default=128, help="the split merge_variants.py used")
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS),
                        help="rows whose kind starts with one of these (default: exact ToMe, tuned)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--previous", metavar="OTHER.json",
                        help="another merge_variants.py JSON: pair each target's tuned row with its tuned row")
    parser.add_argument("--holdout", type=int, help="score the first N held-apart photos only (the JSON's "
                        "figures are then not compared)")
    args = parser.parse_args(argv)
    for path, what in ((args.json, "JSON"), (args.weights, "weights"), (args.images, "image folder"),
                       (args.previous, "--previous JSON")):
        if path is not None and not os.path.exists(path):
            print(f"error: {what} {path!r} does not exist", file=sys.stderr)
            return 2
    if args.resamples < 100:
        parser.error("--resamples must be at least 100")
    if args.holdout is not None and args.holdout < 2:
        parser.error("--holdout must be at least 2")
    rows = _rows(args.json, tuple(args.kinds))
    if rows is None:
        return 2
    if not rows:
        print(f"error: no row of {args.json} has a kind starting with {', '.join(args.kinds)}", file=sys.stderr)
        return 2
    previous = {}  # target -> the other run's tuned row
    if args.previous:
        other = _rows(args.previous, ("tuned",))
        if other is None:
            return 2
        if not other:
            print(f"error: {args.previous} has no tuned row", file=sys.stderr)
            return 2
        previous = {r["target"]: r for r in other}

    import numpy as np

    from dsm_export.data import list_images
    from dsm_export.check.evaluate import bootstrap_interval, model_logits, split_pixels
    from dsm_export.core.models import create_model
    from dsm_export.core.patch import apply
    from dsm_export.core.schedule import Schedule
    from dsm_export.check.validate import kl_divergence

    model = create_model(args.model, args.weights)
    _, held, _, held_px = split_pixels(model, list_images(args.images), args.calibration_count, args.holdout,
                                       progress=True)
    base = model_logits(model, held_px)
    base_top = base.argmax(-1)

    scores: dict[str, tuple] = {}  # spec -> (per-photo KL, per-photo agreement): a spec in both runs runs once

    def per_photo(spec: str):
        if spec not in scores:
            logits = model_logits(apply(model, Schedule.parse(spec)).eval(), held_px)
            scores[spec] = kl_divergence(base, logits), (logits.argmax(-1) == base_top).astype(np.float64)
        return scores[spec]

    def interval(values, scale=1.0, fmt="{:.4f}"):
        lo, hi = bootstrap_interval(values, resamples=args.resamples)
        return f"{fmt.format(scale * values.mean())} [{fmt.format(scale * lo)}, {fmt.format(scale * hi)}]"

    tome_kl: dict[float, np.ndarray] = {}  # per target: the reference of the paired differences
    lines = [
        f"{args.model}, {len(held)} held-apart photos, {args.resamples} bootstrap resamples of the photos "
        "(95 % percentile intervals).",
        "",
        "| target | schedule | KL [95 % interval] | agreement [95 % interval] | KL minus exact ToMe's, paired "
        "[95 % interval] |",
        "|---|---|---|---|---|",
    ]
    worst = 0.0
    scored = []
    for r in rows:
        kl, agree = per_photo(r["spec"])
        worst = max(worst, abs(float(kl.mean()) - r["kl"]))
        if r["kind"] == "exact ToMe":
            tome_kl[r["target"]] = kl
        scored.append((r, kl, agree))
    for r, kl, agree in scored:
        ref = tome_kl.get(r["target"])
        diff = "-" if ref is None or r["kind"] == "exact ToMe" else interval(kl - ref, fmt="{:+.4f}")
        lines.append(f"| {r['target']:.1f}x | {r['kind']} | {interval(kl)} | "
                     f"{interval(agree, 100, '{:.1f}')} % | {diff} |")
    lines += ["", "Recomputed KL against the JSON's: " + (
        "not compared (--holdout)." if args.holdout else f"largest difference {worst:.1e}.")]
    if previous:
        lines += ["", f"Tuned rows against {os.path.basename(args.previous)}'s (the same photos, paired):", "",
                  "| target | tuned, this run: KL, agreement | tuned, previous: KL, agreement | KL difference "
                  "[95 % interval] | agreement difference [95 % interval] |",
                  "|---|---|---|---|---|"]
    for r, kl, agree in scored:
        if not r["kind"].startswith("tuned") or r["target"] not in previous:
            continue
        okl, oagree = per_photo(previous[r["target"]]["spec"])
        lines.append(f"| {r['target']:.1f}x | {kl.mean():.4f}, {100 * agree.mean():.1f} % | "
                     f"{okl.mean():.4f}, {100 * oagree.mean():.1f} % | {interval(kl - okl, fmt='{:+.4f}')} | "
                     f"{interval(agree - oagree, 100, '{:+.1f}')} points |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
