"""Subcommand ``analyze``: per-block statistics that guide the schedule."""

from __future__ import annotations

import os

from .. import checks
from ..check.analyze import analyze, plot_analysis
from ..check.evaluate import load_pixels
from ..data import list_images
from ..errors import DSMError
from ..fileio import write_json
from ._common import add_weights_args, model_from_args


def add(sub):
    p = sub.add_parser("analyze", help="per-block attention, key-similarity, outlier and merge-cost statistics")
    p.add_argument("model", help="timm model name, or a Hugging Face Transformers model (a save_pretrained folder, or a hub id in the local cache)")
    add_weights_args(p)
    p.add_argument("--images", required=True, help="calibration image folder")
    p.add_argument("--limit", type=int, default=64, help="calibration images (default 64)")
    p.add_argument("--r", type=int, default=16, help="tokens merged by one block for the merge cost")
    p.add_argument("--output", "-o", default="analysis", help="folder for the PNG plots and analysis.json")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave out images that cannot be decoded (counted) instead of stopping")
    p.set_defaults(func=run)


def run(args) -> int:
    checks.output_folder(args.output, "--output")
    checks.input_file(args.weights, "weights file")
    images, skipped = checks.readable_images(list_images(args.images, args.limit), args.skip_unreadable)
    model = model_from_args(args, args.model, require_weights=True)
    grid = model.patch_embed.grid_size
    if not 1 <= args.r <= grid[0] * grid[1] // 2:
        raise DSMError(f"--r must be between 1 and {grid[0] * grid[1] // 2}")
    report = analyze(model, load_pixels(images, model), r=args.r)
    report["skipped_unreadable"] = skipped
    os.makedirs(args.output, exist_ok=True)
    plot_analysis(report, args.output, args.model)
    write_json(os.path.join(args.output, "analysis.json"), {"model": args.model, **report})
    if skipped:
        print(f"skipped {len(skipped)} unreadable images: {', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}")
    cost = "merge " + ("KL" if report["merge_cost_metric"] == "KL" else "1-cos")
    print(f"{'block':>5} {'entropy':>8} {'key sim':>8} {'outliers':>9} {cost:>10} {'agree':>6}")
    for i in range(len(report["merge_cost"])):
        print(f"{i:>5} {report['attention_entropy'][i]:>8.3f} {report['key_match_similarity'][i]:>8.3f} "
              f"{report['outlier_ratio'][i]:>9.1f} {report['merge_cost'][i]:>10.4f} "
              f"{100 * report['merge_agreement'][i]:>5.1f}%")
    print(f"recommended delay: {report['recommended_delay']} ({report['reason']})")
    print(f"wrote {args.output}/analysis.json and 4 PNG plots")
    return 0
