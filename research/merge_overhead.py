#!/usr/bin/env python3
"""Why a merged graph's speed-up trails its FLOP ratio: the merges' own work against the rest.

For each schedule, two ONNX Runtime graphs are timed against timm's unmerged model (every block on
every token, the baseline of every FLOP ratio here), in one alternating run:

* the **merged** export, as ``dsm-export export`` writes it;
* its **token-count twin**: the same export with every merge replaced by keeping the first tokens
  (one Slice; no similarity, matching, gathers, one-hot assignment, class-attention importance or
  proportional attention), so every block runs on exactly the merged graph's token counts. The
  twin is not a model (it drops tokens by position); only its time is used.

Each speed-up is divided by its own FLOP ratio (the twin's leaves out the merges' FLOPs). The
twin's quotient is what the token counts alone reach on this machine: below 1 where smaller
matrices run less efficiently and where ONNX Runtime fuses less. The gap between the two graphs
is the merges' own cost, printed as its share of the merged graph's time (``1 - twin time /
merged time``, the median over repetitions; both graphs run seconds apart in each). Speed-ups are
medians of ``--repeats`` paired ratios, the unmerged baseline timed right before each graph
(:func:`dsm_export.search.timing.ort_speedups`).

    python research/merge_overhead.py deit_tiny_patch16_224 \\
        --weights ../shared/models/deit_tiny_patch16_224.pth

Never time while another CPU job runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile

SCHEDULES = ["r=13,mode=tome", "r=33,r_end=0,delay=3,local=1,windows=1x2",
             "r=33,r_end=0,delay=3,local=1,windows=1x2,protect=32,metric=heads,merge=mlerp",
             "r=33,r_end=0,delay=3,local=1,windows=1x2,protect=32,metric=tokens,merge=mlerp"]


@contextlib.contextmanager
def merges_as_slices():
    """Inside the ``with`` block, :class:`dsm_export.core.patch.MergedViT` keeps the first ``n - r`` tokens of
    each merging block instead of merging (``[B, n, C]`` -> ``[B, n - r, C]``) and tracks no sizes."""
    from dsm_export.core.patch import MergedViT

    def keep_first(self, x, size, keys, t, importance=None):
        return x[:, :x.shape[1] - t.removed], None

    saved = MergedViT._merge, MergedViT._merge_tome
    MergedViT._merge = MergedViT._merge_tome = keep_first
    try:
        yield
    finally:
        MergedViT._merge, MergedViT._merge_tome = saved


def export_twin(model, name: str, path: str, schedule, weights: str | None = None, batch: int | None = None):
    """Export the token-count twin of ``schedule`` (see the module doc) to ``path``."""
    from dsm_export.graph.export import export_model

    with merges_as_slices():
        export_model(model, name, path, schedule, weights=weights, batch=batch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--schedules", nargs="+", default=SCHEDULES)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")

    import numpy as np
    import onnxruntime as ort

    from dsm_export.search.timing import cpu_name, ort_speedups
    from dsm_export.errors import DSMError
    from dsm_export.graph.export import export_model
    from dsm_export.core.flops import schedule_flops
    from dsm_export.core.models import create_model
    from dsm_export.core.schedule import Schedule
    from dsm_export.search.speed_check import WARMUP, speed_stats

    flops = {}
    try:
        schedules = [Schedule.parse(s) for s in args.schedules]
        model = create_model(args.model, args.weights)
        for i, s in enumerate(schedules):  # an impossible schedule stops here, before any export
            merged, base, blocks = schedule_flops(model, s)
            flops[f"m{i}"] = base / merged
            flops[f"t{i}"] = base / (merged - sum(b.merge for b in blocks))
    except DSMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"none": os.path.join(tmp, "none.onnx")}
        export_model(model, args.model, paths["none"], Schedule(), weights=args.weights, full_last_block=True)
        for i, s in enumerate(schedules):
            paths[f"m{i}"] = os.path.join(tmp, f"m{i}.onnx")
            paths[f"t{i}"] = os.path.join(tmp, f"t{i}.onnx")
            export_model(model, args.model, paths[f"m{i}"], s, weights=args.weights)
            export_twin(model, args.model, paths[f"t{i}"], s, weights=args.weights)
        pairs = ort_speedups(paths, "none", batch=args.batch, repeats=args.repeats, iters=2, warmup=WARMUP)
    stats = {k: speed_stats(v, flops[k]) for k, v in pairs.items()}
    # twin time / merged time within each repetition (the two run seconds apart), then the median
    share = {i: float(np.median([1 - m / t for m, t in zip(pairs[f"m{i}"], pairs[f"t{i}"])]))
             for i in range(len(schedules))}
    print(f"{args.model}; {cpu_name()}, {os.cpu_count()} threads, ONNX Runtime {ort.__version__} CPU, "
          f"batch {args.batch}, median of {args.repeats} paired speed-ups against timm's unmerged model "
          f"(every block on every token), {platform.system()} {platform.release()}.")
    print()
    print("| schedule | FLOPs reduction | speed-up | speed-up / FLOP ratio | twin: speed-up | "
          "twin: speed-up / FLOP ratio | merges' share of the merged graph's time |")
    print("|---|---|---|---|---|---|---|")
    for i, s in enumerate(schedules):
        m, t = stats[f"m{i}"], stats[f"t{i}"]
        print(f"| `{s.spec()}` | {flops[f'm{i}']:.2f}x | {m['speedup']:.2f}x | {m['speed_per_flop']:.2f} | "
              f"{t['speedup']:.2f}x | {t['speed_per_flop']:.2f} | {100 * share[i]:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
