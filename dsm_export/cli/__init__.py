"""The ``dsm-export`` command line: one module per subcommand, each with ``add(subparsers)`` and
``run(args) -> int``.

Exit status: 0 success (validation within tolerance), 1 validation outside tolerance, 2 bad input
(one-line message on stderr, no output file left behind), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .._version import __version__
from ..errors import DSMError
from .validate import format_report  # noqa: F401  (public: the validation report as text)

# Subcommand modules, in the order ``--help`` lists them.
SUBCOMMANDS = ("export", "validate", "inspect", "build", "bench", "profile", "triton_repo", "serve", "predict",
               "analyze", "tune", "visualize")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dsm-export",
        description="Delayed Spatial Merging for timm ViTs: static-shape ONNX export, validation, engines.")
    parser.add_argument("--version", action="version", version=f"dsm-export {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"dsm-export: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    """Entry point of the ``dsm-export`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Run as the command (console script or ``python -m``), the process ends when main returns; a
    # subcommand may then bound that exit (``serve``: PyTriton threads that never join).
    args.owns_process = argv is None
    try:
        # Warnings as one line, and timm's UserWarnings hidden, for the command's duration only.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"timm\..*")
            warnings.showwarning = _show_warning
            return args.func(args)
    except DSMError as exc:
        print(f"dsm-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsm-export: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
