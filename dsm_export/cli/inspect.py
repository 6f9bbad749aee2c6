"""Subcommand ``inspect``: per-block token counts and GFLOPs."""

from __future__ import annotations

import os

from ..errors import DSMError


def add(sub):
    p = sub.add_parser("inspect", help="per-block token counts and GFLOPs")
    p.add_argument("target", help="an exported .onnx file, or a timm model name")
    p.add_argument("--schedule", help="schedule (required with a model name)")
    p.add_argument("--json", dest="json_path", help="write the table as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import checks
    from ..fileio import write_json
    from ..check.inspection import format_inspection, inspect_schedule, precision_of

    checks.output_file(args.json_path, "--json")

    if args.target.lower().endswith(".onnx") or os.path.isfile(args.target):
        from ..graph.export import load_onnx, read_metadata

        model = load_onnx(args.target, weights=False)
        info = read_metadata(model, args.target)
        report = inspect_schedule(info.model, args.schedule or info.schedule, info.last_block)
        report.update(precision_of(model))
    else:
        if not args.schedule:
            raise DSMError("inspect MODEL needs --schedule")
        report = inspect_schedule(args.target, args.schedule)
    print(format_inspection(report))
    if args.json_path:
        write_json(args.json_path, report)
    return 0
