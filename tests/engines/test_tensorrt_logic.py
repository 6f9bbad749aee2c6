"""The TensorRT path's logic, tested without TensorRT: precision flags as a function of version,
batch pieces against an optimization profile, timing-cache writing, the parser op checks, the fp16
islands of a graph without LayerNormalization, and the Triton config refusals."""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from dsm_export.engines.fp16 import fp32_island_nodes
from dsm_export.engines.tensorrt import (
    batch_chunks,
    build_settings,
    import_tensorrt,
    parse_compute_capabilities,
    read_rtx_header,
    save_timing_cache,
    tensorrt_for_engine,
    version_tuple,
    where_it_runs,
)
from dsm_export.errors import DSMError
from dsm_export.graph.onnx_graph import graph_problems

TRT10_FLAGS = ("FP16", "INT8", "TF32", "BF16", "FP8", "REFIT", "OBEY_PRECISION_CONSTRAINTS")
TRT11_FLAGS = ("TF32", "REFIT", "STRIP_PLAN")  # no FP16/INT8/BF16: weak typing is gone
RTX_FLAGS = ("DEBUG", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "STRIP_PLAN", "WEIGHT_STREAMING")  # 1.7: no FP16/INT8


def test_version_tuple():
    assert version_tuple("10.12.0.36") == (10, 12)
    assert version_tuple("11.0") == (11, 0)
    assert version_tuple("10") == (10, 0)


@pytest.mark.parametrize("version", [(10, 0), (10, 8), (10, 12), (10, 13), (11, 0), (11, 4)])
def test_fp16_is_strongly_typed_on_every_version(version):
    flags = TRT11_FLAGS if version >= (11, 0) else TRT10_FLAGS
    s = build_settings(version, "fp16", False, flags)
    assert s.strongly_typed and s.fp16_graph
    assert "FP16" not in s.set_flags  # never: it would let TensorRT run the fp32 islands in fp16
    assert s.clear_flags == ("TF32",)


def test_fp32_clears_tf32_unless_asked():
    s = build_settings((10, 8), "fp32", False, TRT10_FLAGS)
    assert not s.strongly_typed and not s.fp16_graph
    assert s.clear_flags == ("TF32",) and s.set_flags == ()
    s = build_settings((10, 8), "fp32", True, TRT10_FLAGS)
    assert s.set_flags == ("TF32",) and s.clear_flags == ()
    # From 10.12 (weak typing deprecated) and on 11 (removed), fp32 is strongly typed too.
    assert build_settings((10, 12), "fp32", False, TRT10_FLAGS).strongly_typed
    assert build_settings((11, 0), "fp32", False, TRT11_FLAGS).strongly_typed


def test_build_settings_refusals():
    with pytest.raises(DSMError, match="too old"):
        build_settings((8, 6), "fp32", False, TRT10_FLAGS)
    with pytest.raises(DSMError, match="precision"):
        build_settings((10, 8), "bf16", False, TRT10_FLAGS)
    int8 = build_settings((10, 0), "int8", False, TRT10_FLAGS)  # explicit quantization: strongly typed
    assert int8.strongly_typed and not int8.fp16_graph and "INT8" not in int8.set_flags
    with pytest.raises(DSMError, match="no TF32"):
        build_settings((11, 0), "fp32", True, ("REFIT",))
    assert build_settings((11, 0), "fp32", False, ("REFIT",)).clear_flags == ()


# ------------------------------------------------------------------ TensorRT-RTX
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_rtx_is_strongly_typed_without_timing_cache(precision):
    s = build_settings((1, 7), precision, False, RTX_FLAGS, flavour="rtx")
    assert s.strongly_typed and not s.timing_cache and s.fp16_graph == (precision == "fp16")
    assert s.set_flags == () and s.clear_flags == ("TF32",)
    assert build_settings((10, 8), precision, False, TRT10_FLAGS).timing_cache  # full TensorRT keeps it
    with pytest.raises(DSMError, match="TensorRT-RTX 0.9 is too old"):
        build_settings((0, 9), precision, False, RTX_FLAGS, flavour="rtx")
    with pytest.raises(DSMError, match="flavour"):
        build_settings((1, 7), precision, False, RTX_FLAGS, flavour="jetson")


def test_compute_capability_targets():
    assert parse_compute_capabilities("8.6,8.9,12.0") == ("8.6", "8.9", "12.0")
    assert parse_compute_capabilities(" sm86, 89,8.6 ,sm120") == ("8.6", "8.9", "12.0")  # forms, duplicates
    assert parse_compute_capabilities("") == parse_compute_capabilities(None) == ()
    with pytest.raises(DSMError, match="no target for H100/H200"):
        parse_compute_capabilities("8.6,9.0")
    with pytest.raises(DSMError, match="choose from 7.5, 8.0, 8.6, 8.9, 12.0, 12.1"):
        parse_compute_capabilities("8.7")
    text = where_it_runs("rtx", ("8.6", "8.9"))
    assert "8.6 (Ampere RTX), 8.9 (Ada)" in text and "not on 7.5 (Turing) or 9.0 (Hopper, H100/H200)" in text
    assert "same release only" in where_it_runs("rtx", ())
    assert "NVIDIA H200 (compute capability 9.0)" in where_it_runs("enterprise", None, "NVIDIA H200", "9.0")


def test_rtx_header_reading():
    header = bytearray(64)
    header[0:4] = header[28:32] = b"vtrt"
    header[24:28] = bytes([1, 7, 1, 116])
    header[32] = 0x04 | 0x10  # 8.6 and 12.0
    got = read_rtx_header(bytes(header))
    assert got == {"magic": True, "release": "1.7.1.116", "targets": ["8.6", "12.0"], "unnamed_target_bits": 0}
    header[32] = 0x7E  # a 1.7 default build: 8.0, 8.6, 8.9, 12.0, 12.1 and one bit no ComputeCapability names
    got = read_rtx_header(bytes(header))
    assert got["targets"] == ["8.0", "8.6", "8.9", "12.0", "12.1"] and got["unnamed_target_bits"] == 1
    header[24:28] = bytes([1, 9, 0, 1])  # a release whose layout is not known: not decoded
    assert read_rtx_header(bytes(header))["targets"] is None
    assert read_rtx_header(b"\0" * 64) == {"magic": False, "release": None, "targets": None, "unnamed_target_bits": 0}


def test_flavour_choice_refusals():
    from dsm_export.cli._common import TENSORRT_FLAVOURS
    from dsm_export.engines.tensorrt import FLAVOURS

    assert TENSORRT_FLAVOURS == FLAVOURS  # the CLI's --tensorrt choices
    with pytest.raises(DSMError, match="--tensorrt must be one of auto, enterprise, rtx"):
        import_tensorrt("jetson")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(DSMError, match="full TensorRT is not installed"):
            import_tensorrt("enterprise")


def test_engines_do_not_cross_releases(tensorrt):
    sidecar = {"flavour": tensorrt.flavour, "tensorrt_version": "0.0.1"}
    with pytest.raises(DSMError, match="engines do not load across releases"):
        tensorrt_for_engine(sidecar, "m.plan")
    other = "enterprise" if tensorrt.flavour == "rtx" else "rtx"
    with pytest.raises(DSMError, match=f"not --tensorrt {other}"):
        tensorrt_for_engine(sidecar, "m.plan", other)
    assert tensorrt_for_engine(dict(sidecar, tensorrt_version=tensorrt.version), "m.plan").version == tensorrt.version


def test_batch_chunks_against_a_profile():
    assert batch_chunks(70, 1, 64) == [(0, 64, 64), (64, 70, 6)]
    assert batch_chunks(20, 4, 8) == [(0, 8, 8), (8, 16, 8), (16, 20, 4)]
    assert batch_chunks(17, 4, 8) == [(0, 8, 8), (8, 16, 8), (16, 17, 4)]  # last image padded to 4
    assert batch_chunks(3, 8, 8) == [(0, 3, 8)]  # static-batch engine: padded to its batch
    assert batch_chunks(16, 8, 8) == [(0, 8, 8), (8, 16, 8)]
    assert batch_chunks(0, 1, 64) == []
    for n, low, high in ((70, 1, 64), (20, 4, 8), (3, 8, 8), (101, 3, 7)):
        pieces = batch_chunks(n, low, high)
        assert [i for a, b, _ in pieces for i in range(a, b)] == list(range(n))
        assert all(low <= run <= high and run >= b - a for a, b, run in pieces)
    with pytest.raises(DSMError):
        batch_chunks(4, 0, 8)
    with pytest.raises(DSMError):
        batch_chunks(4, 9, 8)


def test_timing_cache_written_atomically_or_not_at_all(tmp_path):
    path = tmp_path / "cache.bin"
    with pytest.warns(UserWarning, match="no timing cache"):
        assert not save_timing_cache(str(path), None)
    assert os.listdir(tmp_path) == []
    assert save_timing_cache(str(path), memoryview(b"\x01\x02\x03"))
    assert path.read_bytes() == b"\x01\x02\x03" and os.listdir(tmp_path) == ["cache.bin"]


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_parser_checks_topk_sorted_and_constant_axes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    axes_in = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [3])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 3])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3])
    u = helper.make_tensor_value_info("u", TensorProto.FLOAT, [2, 1, 8])
    good = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1)], [x], [v, i], [k])
    assert graph_problems(good) == []
    unsorted = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, sorted=0)], [x], [v, i], [k])
    assert any("sorted=0" in p for p in graph_problems(unsorted))
    dyn_axes = _model([helper.make_node("Unsqueeze", ["x", "axes"], ["u"])], [x, axes_in], [u])
    assert any("axes is not a constant" in p for p in graph_problems(dyn_axes))
    const_axes = _model([helper.make_node("Unsqueeze", ["x", "a1"], ["u"])], [x], [u],
                        [helper.make_tensor("a1", TensorProto.INT64, [1], [1])])
    assert graph_problems(const_axes) == []
    # ONNX Runtime's contrib op is no TensorRT op.
    sln = _model([helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y"], axis=-1)], [x],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                 [helper.make_tensor("w", TensorProto.FLOAT, [8], [1.0] * 8)])
    assert any("not in the TensorRT-native op list" in p for p in graph_problems(sln))


def test_fp32_islands_without_layernorm():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [3])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 3])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("TopK", ["r", "k"], ["v", "i"], axis=-1, name="topk")]
    keep = fp32_island_nodes(_model(nodes, [x], [v, i], [k]))
    assert "topk" in keep and "relu" in keep  # relu only feeds the matching


# ------------------------------------------------------------------ Triton configs
def test_plan_profile_and_dynamic_batching():
    from dsm_export.serving.triton_repo import check_plan_batching

    profile = {"min": [4, 3, 224, 224], "opt": [32, 3, 224, 224], "max": [64, 3, 224, 224]}
    with pytest.raises(DSMError, match="starts at batch 4"):
        check_plan_batching(profile, True, "m.plan")
    check_plan_batching(profile, False, "m.plan")
    check_plan_batching(dict(profile, min=[1, 3, 224, 224]), True, "m.plan")
    check_plan_batching(None, True, "m.plan")


def test_unmapped_element_type_is_refused():
    from dsm_export.serving.triton_repo import triton_dtype

    assert triton_dtype(TensorProto.FLOAT, "x") == "TYPE_FP32"
    assert triton_dtype(TensorProto.INT64, "x") == "TYPE_INT64"
    with pytest.raises(DSMError, match="COMPLEX64 has no Triton data type"):
        triton_dtype(TensorProto.COMPLEX64, "model 'x' tensor 'y'")


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory, weights):
    from dsm_export.graph.export import export_onnx

    path = str(tmp_path_factory.mktemp("trt") / "emb.onnx")
    export_onnx("deit_tiny_patch16_224", path, "r=13", weights, num_classes=0)
    return path


def test_triton_instance_kind_and_ort_tensorrt(small_onnx, tmp_path, capsys):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb2

    from dsm_export.cli import main

    repo = tmp_path / "repo"
    assert main(["triton-repo", small_onnx, "-o", str(repo), "--instance-kind", "gpu",
                 "--ort-tensorrt", "fp32"]) == 0
    cfg = text_format.Parse((repo / "emb" / "config.pbtxt").read_text(), pb2.ModelConfig())
    assert cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    assert [o.name for o in cfg.output] == ["embeddings"] and list(cfg.output[0].dims) == [192]
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "FP32"
    assert int(acc.parameters["max_workspace_size_bytes"]) == 1 << 30
    capsys.readouterr()
    other = tmp_path / "repo2"
    assert main(["triton-repo", small_onnx, "-o", str(other), "--ort-tensorrt", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--instance-kind gpu" in err and not other.exists()


def test_triton_refuses_a_plan_profile_above_batch_1(small_onnx, tmp_path, capsys):
    """A plan's config is made from its sidecar alone (the engine bytes are only copied), so the
    refusal is tested with a sidecar as ``build`` writes it next to a placeholder file."""
    from dsm_export.cli import main

    model = onnx.load(small_onnx)
    plan = tmp_path / "emb.plan"
    plan.write_bytes(b"placeholder: triton-repo copies a plan without reading it")
    sidecar = {"precision": "fp32", "batch": None, "output": "embeddings", "num_classes": 192,
               "profile": {"min": [4, 3, 224, 224], "opt": [32, 3, 224, 224], "max": [64, 3, 224, 224]},
               "onnx_metadata": {p.key: p.value for p in model.metadata_props}}
    (tmp_path / "emb.plan.json").write_text(json.dumps(sidecar))
    out = tmp_path / "repo"
    assert main(["triton-repo", str(plan), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "starts at batch 4" in err and "--min-batch 1" in err and not out.exists()
    assert main(["triton-repo", str(plan), "-o", str(out), "--instance-kind", "cpu"]) == 2
    assert "GPU instances only" in capsys.readouterr().err
    sidecar["profile"]["min"][0] = 1
    (tmp_path / "emb.plan.json").write_text(json.dumps(sidecar))
    assert main(["triton-repo", str(plan), "-o", str(out)]) == 0
    text = (out / "emb" / "config.pbtxt").read_text()
    assert 'name: "embeddings"' in text and "KIND_GPU" in text and "max_batch_size: 64" in text
