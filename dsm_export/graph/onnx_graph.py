"""Checks on exported ONNX graphs: forbidden ops, TensorRT-parser op coverage, static shapes.

The op list follows TensorRT 10's ONNX parser support matrix (onnx-tensorrt ``docs/operators.md``);
only the ops a ViT export with DSM merges can produce are listed, all standard-domain ops supported
natively (no plugin; ONNX Runtime's contrib ops such as ``SimplifiedLayerNormalization`` are not).
Scatter ops with a reduction (how ``scatter_reduce`` / ``index_add`` export) are forbidden
outright, as is ``TopK`` with K >= 3840 (TensorRT's limit), a non-constant K, or ``sorted=0`` (the
merge reads TopK's order). Inputs the parser needs as constants (``axes`` of Squeeze, Unsqueeze,
Slice and the Reduce ops) must be initializers or ``Constant`` outputs.
"""

from __future__ import annotations

import onnx

# Ops that TensorRT 10's ONNX parser imports natively and that a DSM ViT export may contain.
TENSORRT_OPS = frozenset({
    "Add", "ArgMax", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Einsum",
    "Equal", "Erf", "Exp", "Expand", "Flatten", "Gather", "GatherElements", "GatherND", "Gemm", "Identity",
    "LayerNormalization", "Log", "MatMul", "Max", "Mul", "Neg", "Pow", "Range", "ReduceL2",
    "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Shape", "Sigmoid", "Slice", "Softmax",
    "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "TopK", "Transpose", "Unsqueeze", "Where",
    "Tile", "Min", "Abs", "Clip", "HardSigmoid", "Sign",
    # explicit quantization (build --precision int8): TensorRT imports these as Q/DQ layers
    "QuantizeLinear", "DequantizeLinear",
})
# op -> index of an input that TensorRT's ONNX parser needs as a constant (when present).
CONSTANT_INPUTS = {
    "TopK": 1, "Squeeze": 1, "Unsqueeze": 1, "Slice": 3, "ReduceL2": 1, "ReduceMax": 1,
    "ReduceMean": 1, "ReduceSum": 1,
}
FORBIDDEN_OPS = frozenset({"ScatterElements", "ScatterND", "Scatter"})
TOPK_LIMIT = 3840


def graph_problems(model: onnx.ModelProto) -> list[str]:
    """List every op a TensorRT-friendly DSM graph must not contain.

    Args:
        model: a loaded ONNX model (its external data need not be loaded).

    Returns:
        Human-readable problems (empty if the graph is clean): scatter ops with a reduction, any
        scatter op, ``TopK`` with K >= 3840 or ``sorted=0``, non-constant inputs of
        :data:`CONSTANT_INPUTS` (K, ``axes``), ops outside :data:`TENSORRT_OPS`, ops from
        non-default domains.
    """
    problems = []
    # values of the small constants (K, axes); tensors in an external data file are never those
    consts = {i.name: (None if i.data_location == onnx.TensorProto.EXTERNAL else onnx.numpy_helper.to_array(i))
              for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = onnx.numpy_helper.to_array(attr.t)
    for node in model.graph.node:
        where = f"{node.op_type} node {node.name or node.output[0]!r}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {node.domain!r}")
        elif node.op_type in FORBIDDEN_OPS:
            reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
            problems.append(f"{where}: scatter op (reduction={reduction})")
        elif node.op_type not in TENSORRT_OPS:
            problems.append(f"{where}: not in the TensorRT-native op list")
        index = CONSTANT_INPUTS.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index]:
            if node.input[index] not in consts:
                what = "K" if node.op_type == "TopK" else "axes"
                problems.append(f"{where}: {what} is not a constant")
        if node.op_type == "TopK":
            k = consts.get(node.input[1])
            if k is not None and k.size and int(k.reshape(-1)[0]) >= TOPK_LIMIT:
                problems.append(f"{where}: K={int(k.reshape(-1)[0])} >= {TOPK_LIMIT}")
            if next((a.i for a in node.attribute if a.name == "sorted"), 1) != 1:
                problems.append(f"{where}: sorted=0 (the merge needs TopK's order)")
    return problems


def unknown_shapes(model: onnx.ModelProto, batch_dim_name: str | None = "batch") -> list[str]:
    """Names of values whose shape inference leaves a dimension unknown.

    Runs ``onnx.shape_inference`` (strict) and checks every intermediate value: each dimension must
    be a number, or the named dynamic batch dimension.

    Returns:
        ``name: shape`` strings of the values with an unknown rank or dimension.
    """
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    bad = []
    values = list(inferred.graph.value_info) + list(inferred.graph.output)
    known = {v.name for v in values} | {i.name for i in inferred.graph.initializer} | {
        i.name for i in inferred.graph.input}
    for node in inferred.graph.node:
        for out in node.output:
            if out and out not in known:
                bad.append(f"{out}: no inferred shape")
    for v in values:
        t = v.type.tensor_type
        if not t.HasField("shape"):
            bad.append(f"{v.name}: unknown rank")
            continue
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                continue
            if batch_dim_name is not None and d.dim_param == batch_dim_name:
                continue
            bad.append(f"{v.name}: {[x.dim_value or x.dim_param or '?' for x in t.shape.dim]}")
            break
    return bad
