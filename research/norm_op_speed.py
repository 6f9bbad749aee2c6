#!/usr/bin/env python3
"""How ONNX Runtime runs a row L2 norm: ``ReduceL2`` against ``Mul`` + ``ReduceSum`` + ``Sqrt``.

``Tensor.norm(dim=-1, keepdim=True)`` exports to ``ReduceL2``; :func:`dsm_export.core.merge.l2_norm`
writes ``sqrt(sum(x * x))``, which exports to the three-op form. The variants that take token norms
(``metric=heads``: per-head keys; ``merge=mlerp``: source, destination and merged tokens) use the
latter. This script times both forms on DeiT-Tiny token shapes (batch 32) in one alternating run
on the CPU execution provider, median of ``--repeats`` runs each, and prints the ratio.

    python research/norm_op_speed.py

Never time while another CPU job runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

SHAPES = [(32, 197, 192), (32, 197, 3, 64), (32, 98, 192)]  # tokens x width; per-head keys; half the tokens


def norm_graph(shape: tuple[int, ...], form: str):
    """An ONNX model ``x`` -> ``[..., 1]`` row L2 norms of ``x`` (float32 ``shape``), as one
    ``ReduceL2`` (``form="ReduceL2"``) or ``Mul`` + ``ReduceSum`` + ``Sqrt`` (``form="sqrt-sum"``)."""
    from onnx import TensorProto, helper

    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])
    if form == "ReduceL2":
        nodes = [helper.make_node("ReduceL2", ["x", "axes"], ["y"], keepdims=1)]
    else:
        nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]),
                 helper.make_node("ReduceSum", ["sq", "axes"], ["s"], keepdims=1),
                 helper.make_node("Sqrt", ["s"], ["y"])]
    graph = helper.make_graph(nodes, form, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=51, help="timed runs of each form per shape (default 51)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        print("error: --repeats must be at least 5 (a median of fewer is noise)", file=sys.stderr)
        return 2

    import numpy as np
    import onnxruntime as ort

    from dsm_export.search.timing import cpu_name

    threads = args.threads or os.cpu_count()
    print(f"{cpu_name()}, {threads} threads, ONNX Runtime {ort.__version__} CPU, {platform.system()} "
          f"{platform.release()}, median of {args.repeats} alternating runs")
    print("| shape | ReduceL2 (ms) | Mul + ReduceSum + Sqrt (ms) | ReduceL2 time / three-op time |")
    print("|---|---|---|---|")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    for shape in SHAPES:
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        sessions = {f: ort.InferenceSession(norm_graph(shape, f).SerializeToString(), opts,
                                            providers=["CPUExecutionProvider"]) for f in ("ReduceL2", "sqrt-sum")}
        outs = {f: s.run(None, {"x": x})[0] for f, s in sessions.items()}
        assert np.allclose(outs["ReduceL2"], outs["sqrt-sum"], rtol=1e-5)
        times = {f: [] for f in sessions}
        for _ in range(args.repeats):
            for f, s in sessions.items():
                t = time.perf_counter()
                s.run(None, {"x": x})
                times[f].append(time.perf_counter() - t)
        a, b = (statistics.median(times[f]) * 1e3 for f in ("ReduceL2", "sqrt-sum"))
        print(f"| {'x'.join(map(str, shape))} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
