"""fp16 copies of a DSM ONNX graph (onnxconverter-common) that keep the matching and size path in fp32.

Shared by the ONNX Runtime fp16 engine (:mod:`dsm_export.engines.onnxruntime`), TensorRT's fp16 build
(:mod:`dsm_export.engines.tensorrt.build`) and INT8, which keeps the same islands in fp32
(:func:`dsm_export.engines.int8.quantize.matching_nodes`).
"""

from __future__ import annotations

import warnings

import onnx

from ..graph.onnx_file import infer_shapes, needs_external_data
from .registry import import_optional


def fp32_island_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of nodes to keep in fp32 in an fp16 conversion of a DSM graph.

    * Sizes: every node with a float input or output whose last dimension is 1 (token sizes,
      ``log(size)``), found by shape inference, or a tensor of features with their sizes appended
      (last dimension the embedding width + 1, computed from a Concat with a size): the
      size-weighted merge and the proportional-attention term. The width is that of the first
      LayerNormalization's input; a graph without one keeps only the last-dimension-1 rule.
      (Attention logits of a block with width + 1 tokens have that last dimension too: they are
      not sizes.)
    * Matching: ``TopK``/``ArgMax`` and, as for the above, every node whose outputs feed only
      (transitively) into fp32 nodes -- the key mean over heads, normalisation, similarity MatMul,
      ReduceMax, the one-hot assignment.
    """
    inferred = infer_shapes(model)  # any size (over 2 GiB: from a copy without the weights)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        if t.elem_type == onnx.TensorProto.FLOAT and t.HasField("shape") and t.shape.dim:
            shapes[v.name] = t.shape.dim[-1].dim_value
    for init in inferred.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and init.dims:
            shapes[init.name] = init.dims[-1]
    norm = next((n for n in inferred.graph.node if n.op_type == "LayerNormalization"), None)
    width = shapes.get(norm.input[0], 0) if norm is not None else 0
    sizes = {t for t, d in shapes.items() if d == 1}
    # Features with their sizes appended ([..., width + 1]): the outputs of a Concat that takes a
    # size, and every width + 1 tensor computed from one (graph order is topological). Not every
    # width + 1 tensor: a block with width + 1 tokens has [B, N, N] attention logits of that width.
    merged = set()
    for node in inferred.graph.node:
        if width and any(shapes.get(o) == width + 1 for o in node.output) and (
                (node.op_type == "Concat" and any(i in sizes for i in node.input))
                or any(i in merged for i in node.input)):
            merged.update(o for o in node.output if shapes.get(o) == width + 1)
    size_tensors = sizes | merged

    consumers: dict[str, list] = {}
    for node in inferred.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    keep = {n.name for n in inferred.graph.node if n.op_type in ("TopK", "ArgMax")}
    for node in inferred.graph.node:
        if node.op_type not in ("Constant", "Shape") and any(
                t in size_tensors for t in list(node.input) + list(node.output)):
            keep.add(node.name)
    changed = True
    while changed:  # backward closure: nodes that only feed fp32 nodes are fp32 too
        changed = False
        for node in inferred.graph.node:
            if node.name in keep or node.op_type == "Constant":
                continue
            users = [c for o in node.output for c in consumers.get(o, [])]
            if users and all(u.name in keep for u in users):
                keep.add(node.name)
                changed = True
    return sorted(keep)


def convert_fp16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """fp16 conversion with onnxconverter-common, keeping :func:`fp32_island_nodes` in fp32.

    A model over 2 GiB (weights loaded) gets its shapes from
    :func:`dsm_export.graph.onnx_file.infer_shapes` first, since the converter's own shape
    inference would serialize it.

    Returns:
        ``(model, number of nodes kept in fp32)``.

    Raises:
        DSMError: if onnxconverter-common is not installed.
    """
    float16 = import_optional("onnxconverter_common.float16", "engines", "fp16 (onnxconverter-common)")
    for i, node in enumerate(model.graph.node):  # the converter's block list works by node name
        if not node.name:
            node.name = f"node_{i}"
    keep = fp32_island_nodes(model)
    _unshare_initializers(model, set(keep))
    big = needs_external_data(model)
    if big:  # the converter's own shape inference serializes the model: give it the shapes instead
        inferred = infer_shapes(model)  # from a copy without the weights' bytes
        del model.graph.value_info[:]
        model.graph.value_info.extend(inferred.graph.value_info)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        half = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep,
                                                disable_shape_infer=big)
    clamped = [w for w in caught if "will be truncated" in str(w.message)]
    for w in caught:
        if w not in clamped:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if clamped:  # one line instead of one per weight
        warnings.warn(f"fp16: onnxconverter-common clamped {len(clamped)} fp32 weight values into fp16's range "
                      "(|x| < 1e-7 to +-1e-7, |x| > 65504 to +-65504)", stacklevel=2)
    return half, len(keep)


def _unshare_initializers(model: onnx.ModelProto, keep: set[str]) -> None:
    """Give fp32 nodes their own copy of initializers they share with fp16 nodes (the converter
    would otherwise leave a shared initializer fp32 and feed fp16 nodes a mismatched type)."""
    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, set[bool]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits:
                users.setdefault(name, set()).add(node.name in keep)
    shared = {name for name, kinds in users.items() if kinds == {True, False}}
    for name in shared:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[name])
        copy.name = name + "__fp32"
        model.graph.initializer.append(copy)
    for node in model.graph.node:
        if node.name in keep:
            for k, name in enumerate(node.input):
                if name in shared:
                    node.input[k] = name + "__fp32"
