"""Facts about a dsm-export ONNX graph that the engines, checks and reports all read: its
precision and quantization record (metadata written by the export and by INT8 quantization) and
whether it already holds quantization ops, and the timm-style labels of its weight layers. Reads ``onnx.ModelProto`` only; imports nothing above
:mod:`dsm_export.graph.metadata`."""

from __future__ import annotations

import json

import onnx

from .metadata import dsm_props

# Ops that mean a graph is already quantized: QDQ, QOperator and ONNX Runtime's dynamic forms.
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QLinearConv",
                           "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "MatMulIntegerToFloat",
                           "QGemm", "DynamicQuantizeMatMul"})


def is_quantized(model: onnx.ModelProto) -> bool:
    """True if the graph already holds quantization ops (QDQ, QOperator or dynamic-quantized)."""
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


def quantization_record(model: onnx.ModelProto) -> dict | None:
    """The quantization record :func:`dsm_export.engines.int8.quantize.quantize_int8` stored in the
    metadata, or None."""
    record = dsm_props(model).get("quantization")
    return None if record is None else json.loads(record)


def precision_of(model: onnx.ModelProto) -> dict:
    """The precision of a dsm-export ONNX file from its metadata: ``{"precision": "fp32" | "fp16" |
    "int8"}``, plus ``"quantization"`` (the record :func:`quantization_record` reads: mode,
    activations, SmoothQuant alpha, layers quantized and kept fp32) for an INT8 file."""
    out = {"precision": dsm_props(model).get("precision", "fp32")}
    record = quantization_record(model)
    if record is not None:
        out["quantization"] = record
    return out


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a name (``node_<index>``), so node lists can name it."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"node_{i}"


def weight_inputs(model: onnx.ModelProto) -> set[str]:
    """Initializer names (also those produced by Constant nodes) usable as MatMul/Gemm weights."""
    names = {i.name for i in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def layer_labels(model: onnx.ModelProto) -> dict[str, str]:
    """Name the weight layers of a ViT graph the way timm names its modules.

    Labels, in graph order: ``patch_embed`` (the Conv), ``blocks.{i}.qkv`` (weight ``[D, 3D]``),
    ``blocks.{i}.proj`` (``[D, D]``), ``blocks.{i}.fc1`` (``[D, hidden]``), ``blocks.{i}.fc2``
    (``[hidden, D]``) and ``head`` (the last weight layer with another output width). The block
    index counts qkv layers. Used to keep chosen layers fp32 (INT8's ``keep_fp32``) and by SmoothQuant.

    Returns:
        node name -> label, for Conv/Gemm/MatMul nodes with a constant weight.
    """
    name_nodes(model)
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    inits[n.output[0]] = tuple(a.t.dims)
    width = next((inits.get(n.input[1], (0,))[0] for n in model.graph.node
                  if n.op_type == "LayerNormalization"), 0)
    labels: dict[str, str] = {}
    block = -1
    for node in model.graph.node:
        if node.op_type == "Conv":
            labels[node.name] = "patch_embed"
            continue
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        shape = inits[node.input[1]]
        if len(shape) != 2:
            continue
        k, n = shape
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            k, n = n, k
        if k == width and n == 3 * width:
            block += 1
            labels[node.name] = f"blocks.{block}.qkv"
        elif k == width and n == width:
            labels[node.name] = f"blocks.{block}.proj"
        elif k == width and n > width and block >= 0 and n != 3 * width:
            labels[node.name] = f"blocks.{block}.fc1" if n % width == 0 else "head"
        elif n == width and k > width:
            labels[node.name] = f"blocks.{block}.fc2"
        else:
            labels[node.name] = "head"
    return labels
