"""Static-shape ONNX export: graph checks, metadata, and ONNX Runtime parity with PyTorch eager."""

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import timm
import torch.nn.functional as F

from dsm_export.graph.export import export_model, export_onnx, load_onnx, read_metadata
from dsm_export.graph.onnx_graph import graph_problems, unknown_shapes
from dsm_export.core.patch import apply
from dsm_export.core.schedule import Schedule

from conftest import DEIT, DSM_17
from families import FAMILIES, build
from trt_checks import build_and_check

SCATTER_OPS = {"ScatterElements", "ScatterND", "Scatter"}


@pytest.fixture(scope="module")
def dsm_onnx(tmp_path_factory, weights):
    path = str(tmp_path_factory.mktemp("export") / "deit_dsm.onnx")
    export_onnx(DEIT, path, DSM_17, weights)
    return path


def ort_logits(path, x):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": x.numpy()})[0]


def assert_parity(onnx_out, torch_out):
    torch_out = torch_out.numpy()
    assert np.abs(onnx_out - torch_out).max() <= 1e-4
    assert np.array_equal(onnx_out.argmax(-1), torch_out.argmax(-1))


def test_graph_is_clean_and_static(dsm_onnx):
    model = onnx.load(dsm_onnx)
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [i.name for i in model.graph.input] == ["pixel_values"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 224, 224]
    # Walk the graph: no scatter of any kind, TopK only with small constant K.
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    topk = 0
    for node in model.graph.node:
        assert node.op_type not in SCATTER_OPS, node.name
        assert node.domain in ("", "ai.onnx")
        if node.op_type == "TopK":
            topk += 1
            assert int(inits[node.input[1]].reshape(-1)[0]) < 3840
    merging = sum(1 for b in Schedule.parse(DSM_17).plan(12) if b.r > 0)
    # Two per merging block (rank by score; put the unmerged tokens back in order); the windows of
    # a local block share them.
    assert topk == 2 * merging
    assert graph_problems(model) == []
    assert unknown_shapes(model, "batch") == []


def test_token_gathers_are_row_copies(dsm_onnx):
    # The merge's token gathers are GatherND row copies (export.gathers_as_gathernd), not
    # GatherElements over an index expanded to the embedding width (~7x slower in ONNX Runtime).
    model = onnx.load(dsm_onnx)
    inferred = onnx.shape_inference.infer_shapes(model)
    width = {v.name: v.type.tensor_type.shape.dim[-1].dim_value for v in inferred.graph.value_info
             if v.type.tensor_type.shape.dim}
    merging = sum(1 for b in Schedule.parse(DSM_17).plan(12) if b.r > 0)
    gathernd = [n for n in model.graph.node if n.op_type == "GatherND"]
    assert len(gathernd) == 2 * merging  # unmerged and merged-away tokens of each merging block
    assert all(width[n.output[0]] == 192 for n in gathernd)
    assert not [n.name for n in model.graph.node if n.op_type == "GatherElements" and width[n.output[0]] == 192]


def test_attention_runs_per_head_without_layout_transposes(dsm_onnx):
    # patch._attention_per_head: qkv split into 3 x heads column blocks, no [B, heads, N, d] layout.
    # Every Transpose left swaps the last two axes: k^T (folded into FusedMatMul by ONNX Runtime),
    # the patch embedding's flatten, the merge's one-hot and size tensors.
    model = onnx.load(dsm_onnx)
    heads, blocks = 3, 12
    splits = [n for n in model.graph.node if n.op_type == "Split"]
    assert len(splits) == blocks
    assert all(len(n.output) == 3 * heads for n in splits)
    perms = [tuple(next(a.ints for a in n.attribute if a.name == "perm")) for n in model.graph.node
             if n.op_type == "Transpose"]
    layout = [p for p in perms if p != (*range(len(p) - 2), len(p) - 1, len(p) - 2)]
    assert layout == [], layout
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == blocks * heads


def test_means_over_heads_export_as_add_chains(dsm_onnx):
    # patch._mean_of: the key mean for matching (and class attention for protect) is an Add chain,
    # not a stack + ReduceMean over a leading axis, which ONNX Runtime runs as a copy and a slow reduction.
    model = onnx.load(dsm_onnx)
    assert not [n.name for n in model.graph.node if n.op_type == "ReduceMean"]


def test_graph_checks_can_fail():
    """The op walk flags a scatter-add, the way scatter_reduce/index_add export."""
    node = onnx.helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], reduction="add", axis=0)
    graph = onnx.helper.make_graph(
        [node], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4]),
         onnx.helper.make_tensor_value_info("i", onnx.TensorProto.INT64, [2]),
         onnx.helper.make_tensor_value_info("u", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])])
    problems = graph_problems(onnx.helper.make_model(graph))
    assert len(problems) == 1 and "reduction=add" in problems[0]


def test_metadata(dsm_onnx, weights):
    info = read_metadata(load_onnx(dsm_onnx))
    assert info.model == DEIT
    assert info.schedule.plan(12) == Schedule.parse(DSM_17).plan(12)
    with open(weights, "rb") as fh:
        assert info.weights_sha256 == hashlib.sha256(fh.read()).hexdigest()
    assert info.batch is None and info.input_size == (3, 224, 224)
    meta = {p.key: p.value for p in onnx.load(dsm_onnx).metadata_props}
    assert meta["dsm.version"] and Schedule.parse(meta["dsm.schedule"]) == Schedule.parse(DSM_17)


@pytest.mark.parametrize("batch", [1, 7])
def test_ort_matches_pytorch_reference_on_real_images(dsm_onnx, deit, pixels, batch):
    x = pixels[:batch]
    with torch.inference_mode():
        ref = apply(deit, DSM_17, "reference")(x)
    assert_parity(ort_logits(dsm_onnx, x), ref)


def test_static_batch_and_none_baseline(tmp_path, deit, pixels, weights):
    path = str(tmp_path / "none_b4.onnx")
    export_onnx(DEIT, path, "none", weights, batch=4)
    model = onnx.load(path)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [4, 3, 224, 224]
    assert unknown_shapes(model, None) == []
    with torch.inference_mode():
        assert_parity(ort_logits(path, pixels[:4]), deit(pixels[:4]))


def test_full_last_block_export_is_timms_arithmetic(tmp_path, deit, pixels, weights):
    """`export --full-last-block` runs the last block on every token (the speed-ups' baseline); the
    default export runs it for the class token alone: same logits, fewer rows in its last MatMuls."""
    from dsm_export.cli import main

    full, short = str(tmp_path / "full.onnx"), str(tmp_path / "short.onnx")
    assert main(["export", DEIT, "--weights", weights, "--batch", "4", "-o", full, "--full-last-block"]) == 0
    assert main(["export", DEIT, "--weights", weights, "--batch", "4", "-o", short]) == 0
    assert read_metadata(load_onnx(full)).last_block == "full"
    assert read_metadata(load_onnx(short)).last_block == "prefix"
    with torch.inference_mode():
        expected = deit(pixels[:4])
    assert_parity(ort_logits(full, pixels[:4]), expected)
    assert_parity(ort_logits(short, pixels[:4]), expected)

    def fc2_rows(path):  # the token rows leaving the last block's MLP output projection (its bias Add or Gemm)
        model = onnx.shape_inference.infer_shapes(onnx.load(path))
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
        node = next(n for n in model.graph.node if "model.blocks.11.mlp.fc2.bias" in n.input)
        return int(np.prod(shapes[node.output[0]])) // (4 * 192)
    assert (fc2_rows(full), fc2_rows(short)) == (197, 1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ort_parity_per_family(tmp_path, family, pixels):
    model = build(family)
    name, _, spec = FAMILIES[family]
    size = tuple(int(v) for v in model.patch_embed.img_size)
    x = F.interpolate(pixels[:4], size=size, mode="bilinear") if pixels.shape[-2:] != size else pixels[:4]
    path = str(tmp_path / f"{family}.onnx")
    export_model(model, name, path, spec)
    onnx_model = onnx.load(path)
    assert graph_problems(onnx_model) == []
    assert unknown_shapes(onnx_model, "batch") == []
    build_and_check(path, tmp_path)  # and TensorRT builds it
    with torch.inference_mode():
        ref = apply(model, spec, "reference")(x)
    assert_parity(ort_logits(path, x), ref)


# Grids the windows do not divide (random init, depth cut to 4 to keep the test quick; parity only):
# ViT-B/32 (7x7) and DINOv2-S/14 at 518 px (37x37, 4 registers) in 2x2 windows, ViT-B/16 at 384 px
# (24x24) in 5x5 windows (5/5/5/5/4 rows and columns: windows of 25, 20 and 16 tokens).
UNEVEN = {
    "vit_b32_7x7": ("vit_base_patch32_224", dict(depth=4), "r=10,delay=1,local=2,windows=2x2", (7, 7)),
    "dinov2_s14_518": ("vit_small_patch14_reg4_dinov2", dict(depth=4, img_size=518),
                       "r=200,r_end=100,delay=1,local=2,windows=2x2", (37, 37)),
    "vit_b16_384": ("vit_base_patch16_384", dict(depth=4), "r=100,delay=1,local=2,windows=5x5", (24, 24)),
}


@pytest.mark.parametrize("case", sorted(UNEVEN))
def test_uneven_windows_export_static_and_match_the_reference(tmp_path, case, pixels):
    name, kwargs, spec, grid = UNEVEN[case]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    assert tuple(model.patch_embed.grid_size) == grid
    size = tuple(int(v) for v in model.patch_embed.img_size)
    x = F.interpolate(pixels[:2], size=size, mode="bilinear")
    merged = apply(model, spec, "export")
    local = [t for t in merged.tokens if t.per_window]
    assert local and len(local[0].windows) > 1  # uneven: more than one window size
    path = str(tmp_path / f"{case}.onnx")
    export_model(model, name, path, spec)
    onnx_model = onnx.load(path)
    assert graph_problems(onnx_model) == []  # the TensorRT op check
    assert unknown_shapes(onnx_model, "batch") == []  # every shape static but the batch
    with torch.inference_mode():
        ref = apply(model, spec, "reference")(x)
        exp = merged(x)
    assert_parity(exp.numpy(), ref)
    assert_parity(ort_logits(path, x), ref)
    if case == "vit_b32_7x7":
        build_and_check(path, tmp_path)  # and TensorRT builds it
