"""Subcommand ``profile``: where an engine's time goes, per op type, and the split into the model's own
work, the merge path and layout conversions (:mod:`dsm_export.check.profile`); with two engines (a
merged one and the unmerged one, say), side by side.

    dsm-export profile out/deit_tiny_dsm_int8.xml out/deit_tiny_none_int8.xml --batch 32 --threads 2
"""

from __future__ import annotations

import os
import platform

from .. import checks
from ..check.profile import format_profiles, profile_engine
from ..engines.registry import RunnerOptions, backend_for
from ..errors import DSMError
from ..fileio import write_json
from ..search.timing import cpu_name


def add(sub):
    p = sub.add_parser("profile", help="time per op type of one or two engines: model work, merge path, layout")
    p.add_argument("engines", nargs="+", help="one or two engine files (.onnx, OpenVINO .xml)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=10, help="timed runs (mean per op, median wall time)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    p.add_argument("--threads", type=int, help="intra-op (inference) threads (default: all cores)")
    p.add_argument("--provider", default="cpu", help="ONNX Runtime execution provider (ONNX files)")
    p.add_argument("--top", type=int, default=12, help="op types listed (the rest summed)")
    p.add_argument("--json", dest="json_path", help="write every op's time and the summary as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    """Check every file and option (one line, exit 2), then profile each engine in turn and print the table."""
    if len(args.engines) > 2:
        raise DSMError("profile takes one or two engines")
    for path in args.engines:
        checks.input_file(path, "engine")
        backend = backend_for(path)
        if backend.preflight is not None:
            backend.preflight(path)
    checks.output_file(args.json_path, "--json")
    options = RunnerOptions(threads=args.threads, provider=args.provider)
    summaries = [profile_engine(p, options, args.batch, args.runs, args.warmup) for p in args.engines]
    print(f"machine: {platform.node()} | {cpu_name()} | {os.cpu_count()} logical CPUs | threads "
          f"{args.threads or os.cpu_count()} | batch {args.batch}, {args.runs} runs after {args.warmup} warm-up")
    for s in summaries:
        print(f"  {s.profile.path}: {s.profile.runtime}")
    print(format_profiles(summaries, args.top))
    if args.json_path:
        write_json(args.json_path, {"engines": [s.to_json() for s in summaries]})
    return 0
