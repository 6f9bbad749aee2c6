"""Exact ties in the token matching merge the same tokens in TensorRT as in ONNX Runtime.

A flat grey image makes every patch token identical, so every similarity score ties exactly; the
merge then depends only on how ``TopK`` and ``ArgMax`` break ties (ONNX: the lower index first).
The graph's matching indices (the index outputs of every TopK and ArgMax) are exposed as extra
outputs and compared, run by run. Needs an NVIDIA GPU (TensorRT-RTX builds without one, but
runs only on one); skipped (with the reason) elsewhere.
"""

import numpy as np
import onnx
import pytest
import torch

pytestmark = [pytest.mark.tensorrt,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="running a TensorRT engine needs an NVIDIA GPU")]


def _with_matching_outputs(path, out_path):
    """Copy of the graph with every TopK/ArgMax index tensor added as a graph output."""
    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    known = {v.name: v for v in model.graph.value_info}
    names = []
    for node in model.graph.node:
        if node.op_type == "TopK":
            names.append(node.output[1])
        elif node.op_type == "ArgMax":
            names.append(node.output[0])
    for name in names:
        model.graph.output.append(known[name])
    onnx.save(model, out_path)
    return names


def test_exact_ties_merge_the_same_tokens(tmp_path, weights, tensorrt):
    import onnxruntime as ort

    from dsm_export.engines.tensorrt import TensorRTOptions, TensorRTRunner, build_tensorrt
    from dsm_export.graph.export import export_onnx

    src = str(tmp_path / "dsm.onnx")
    export_onnx("deit_tiny_patch16_224", src, "r=13,delay=1,local=2", weights, batch=4)
    probe = str(tmp_path / "probe.onnx")
    names = _with_matching_outputs(src, probe)
    assert names
    plan = str(tmp_path / "probe.plan")
    build_tensorrt(probe, plan, TensorRTOptions(precision="fp32"))
    x = np.zeros((4, 3, 224, 224), np.float32)  # flat images: every patch token identical
    x[1] += 0.5
    x[2, :, :112] = 1.0  # two flat halves: ties inside each half
    x[3] = np.random.default_rng(0).standard_normal((3, 224, 224)).astype(np.float32)  # no ties
    session = ort.InferenceSession(probe, providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"pixel_values": x})))
    got = TensorRTRunner(plan).run_all(x)
    for name in names:
        np.testing.assert_array_equal(got[name].astype(np.int64), expected[name].astype(np.int64),
                                      err_msg=f"matching indices {name} differ")
