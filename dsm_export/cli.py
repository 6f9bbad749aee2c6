"""The ``dsm-export`` command line.

Exit status: 0 success (validation within tolerance), 1 validation outside tolerance, 2 bad input
(one-line message on stderr, no output file left behind).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .errors import DSMError


def _add_export(sub):
    p = sub.add_parser("export", help="export a timm ViT with a merge schedule to static-shape ONNX")
    p.add_argument("model", help="timm model name, e.g. deit_tiny_patch16_224")
    p.add_argument("--weights", help="local state dict (bare or under 'model'); without it: random init")
    p.add_argument("--schedule", default="none",
                   help="schedule spec (r=13,delay=2,local=4,windows=2x2), 'none', or a JSON file")
    p.add_argument("--output", "-o", required=True, help="output .onnx file")
    p.add_argument("--batch", type=int, help="fix the batch axis (default: dynamic)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17, default 18)")
    p.add_argument("--input-size", help="expected input size, N or HxW; must be the model's")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from .export import export_onnx, parse_input_size

    hw = parse_input_size(args.input_size) if args.input_size else None
    info = export_onnx(args.model, args.output, args.schedule, args.weights, batch=args.batch,
                       opset=args.opset, image_size=hw)
    tokens = " ".join(str(t) for t in info.tokens)
    print(f"wrote {args.output}: {info.model}, schedule {args.schedule}, "
          f"batch {info.batch or 'dynamic'}, tokens per block {tokens}")
    return 0


def _add_validate(sub):
    p = sub.add_parser("validate", help="check an exported graph against PyTorch on images")
    p.add_argument("onnx", nargs="?", help="ONNX file written by dsm-export export (or build)")
    p.add_argument("--engine", help="a TensorRT engine (.plan) written by dsm-export build, instead")
    p.add_argument("--images", required=True, help="image folder (labels.csv optional)")
    p.add_argument("--weights", help="weights (default: the path stored at export)")
    p.add_argument("--model", help="timm model name (default: from the file's metadata)")
    p.add_argument("--schedule", help="schedule (default: from the file's metadata)")
    p.add_argument("--json", dest="json_path", help="write the report as JSON here")
    p.add_argument("--atol", type=float, default=1e-4, help="max |logit difference| (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="validate on the first N images only")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args) -> int:
    from .fileio import write_json
    from .validate import validate, validate_engine

    if bool(args.onnx) == bool(args.engine):
        raise DSMError("give either an ONNX file or --engine PLAN")
    common = dict(weights=args.weights, model_name=args.model, schedule=args.schedule, atol=args.atol,
                  batch_size=args.batch_size, limit=args.limit, progress=not args.no_progress)
    if args.engine:
        report = validate_engine(args.engine, args.images, **common)
    else:
        report = validate(args.onnx, args.images, threads=args.threads, **common)
    print(format_report(report))
    if args.json_path:
        write_json(args.json_path, report)
    return 0 if report["passed"] else 1


def format_report(report: dict) -> str:
    """Human-readable validation report."""

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f} %"

    lines = [
        f"model {report['model']}, schedule {report['schedule']}, {report['images']} images",
        f"  vs PyTorch with schedule: max |dlogit| {report['max_abs_diff']:.2e} (atol {report['atol']:.0e}), "
        f"top-1 match {pct(report['top1_match_pytorch'])} ({report['top1_mismatches']} mismatches)",
        f"  vs unmerged PyTorch:      top-1 agreement {pct(report['top1_agreement'])}, KL {report['kl']:.4f}",
        f"  top-1 accuracy:           {pct(report['top1_accuracy'])} (unmerged {pct(report['baseline_top1_accuracy'])})",
        f"  FLOPs:                    {report['gflops']:.3f} G (unmerged {report['baseline_gflops']:.3f} G, "
        f"{report['flops_ratio']:.2f}x fewer)",
        f"  criterion:                {report['criterion']} (median {report['median_abs_diff']:.2e})",
        "PASS" if report["passed"] else "FAIL: outside tolerance",
    ]
    return "\n".join(lines)


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="per-block token counts and GFLOPs")
    p.add_argument("target", help="an exported .onnx file, or a timm model name")
    p.add_argument("--schedule", help="schedule (required with a model name)")
    p.add_argument("--json", dest="json_path", help="write the table as JSON here")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    from .fileio import write_json
    from .inspection import format_inspection, inspect_schedule

    if args.target.lower().endswith(".onnx") or os.path.isfile(args.target):
        from .export import load_onnx, read_metadata

        info = read_metadata(load_onnx(args.target), args.target)
        report = inspect_schedule(info.model, args.schedule or info.schedule)
    else:
        if not args.schedule:
            raise DSMError("inspect MODEL needs --schedule")
        report = inspect_schedule(args.target, args.schedule)
    print(format_inspection(report))
    if args.json_path:
        write_json(args.json_path, report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dsm-export",
        description="Delayed Spatial Merging for timm ViTs: static-shape ONNX export, validation, engines.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"dsm-export {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_export, _add_validate, _add_inspect):
        add(sub)
    for add in _extra_commands():
        add(sub)
    return parser


def _extra_commands():
    """Subcommands from the engine, serving and tuning modules (kept out of the import path)."""
    from . import cli_extra

    return cli_extra.COMMANDS


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"dsm-export: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    """Entry point of the ``dsm-export`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"timm\..*")
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except DSMError as exc:
        print(f"dsm-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsm-export: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
