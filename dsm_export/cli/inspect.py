"""Subcommand ``inspect``: per-block token counts and GFLOPs."""

from __future__ import annotations

import json
import os

from .. import checks
from ..check.inspection import format_inspection, inspect_schedule
from ..engines.registry import find_backend, read_engine
from ..errors import DSMError
from ..fileio import write_json


def add(sub):
    p = sub.add_parser("inspect", help="per-block token counts and GFLOPs")
    p.add_argument("target", help="an engine file (an export, or any backend's engine), or a timm model name")
    p.add_argument("--schedule", help="schedule (required with a model name)")
    p.add_argument("--json", dest="json_path", help="write the table as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    checks.output_file(args.json_path, "--json")
    if os.path.isfile(args.target) or find_backend(args.target) is not None:
        engine = read_engine(args.target)  # any backend's engine: its metadata names model and schedule
        info = engine.info
        report = inspect_schedule(info.model, args.schedule or info.schedule, info.last_block)
        report["precision"] = engine.precision
        if "quantization" in engine.meta:
            report["quantization"] = json.loads(engine.meta["quantization"])
    else:
        if not args.schedule:
            raise DSMError("inspect MODEL needs --schedule")
        report = inspect_schedule(args.target, args.schedule)
    print(format_inspection(report))
    if args.json_path:
        write_json(args.json_path, report)
    return 0
