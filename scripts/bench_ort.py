#!/usr/bin/env python3
"""ONNX Runtime throughput and batch-1 latency: a merged (or INT8) export against the unmerged export.

Kept for earlier instructions: it is ``dsm-export bench`` (installed by pip), which also times
TensorRT engines; see ``dsm-export bench --help``.

    python scripts/bench_ort.py deit_dsm.onnx deit_none.onnx --batch 32 --repeats 7
"""

from __future__ import annotations

import sys

from dsm_export.cli import main as dsm_export


def main(argv=None) -> int:
    return dsm_export(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
