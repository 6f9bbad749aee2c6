#!/usr/bin/env python3
"""The README's result table: the frontier (research/frontier.py's JSON) in six rows.

For each kind of engine, the fastest one measured within two KL budgets (on the held-apart photos
of the frontier run, against timm's unmerged fp32 model). Reads the file, times nothing.

    python research/frontier_summary.py docs/frontier.json
"""

from __future__ import annotations

import argparse
import json
import sys

BUDGETS = (0.01, 0.03)  # KL to the unmerged model, nats


def kind(engine: dict) -> str | None:
    """The summary row of a frontier engine (None: a baseline)."""
    family, label = engine["family"], engine["label"]
    if family == "INT8 alone":
        return "INT8 alone (unmerged)"
    method = "ToMe" if label.startswith("ToMe") else "DSM"
    if family == "merge fp32":
        return f"{method}, fp32"
    if family.startswith("merge + INT8"):
        return f"{method} + INT8"
    if family in ("tuned", "tune's Pareto front"):
        return "`tune --target-speedup` (schedule x precision searched)"
    return None


ROWS = ("INT8 alone (unmerged)", "ToMe, fp32", "DSM, fp32", "ToMe + INT8", "DSM + INT8",
        "`tune --target-speedup` (schedule x precision searched)")


def summary(data: dict) -> str:
    """The Markdown table of :data:`ROWS` x :data:`BUDGETS`, with the run's machine line."""
    engines = [e for e in data["engines"] if kind(e)]
    base = next(e for e in data["engines"] if e["family"] == "fp32 unmerged")
    head = " | ".join(f"fastest at KL ≤ {b:g}" for b in BUDGETS)
    lines = [f"| engine | {head} |", "|---|" + "---|" * len(BUDGETS)]
    for row in ROWS:
        cells = []
        for budget in BUDGETS:
            ok = [e for e in engines if kind(e) == row and e["kl"] <= budget]
            best = max(ok, key=lambda e: e["speedup"], default=None)
            cells.append("-" if best is None else
                         f"**{best['speedup']:.2f}x**, KL {best['kl']:.4f}, agreement "
                         f"{100 * best['top1_agreement']:.1f} %, top-1 {100 * best['top1_accuracy']:.1f} %")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\nSpeed-up over timm's unmerged fp32 model (top-1 {100 * base['top1_accuracy']:.1f} %"
                               f"); {data['machine']}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frontier_json", help="research/frontier.py's frontier.json")
    args = parser.parse_args(argv)
    try:
        with open(args.frontier_json, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        print(f"frontier_summary: error: {args.frontier_json}: {exc}", file=sys.stderr)
        return 2
    print(summary(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
