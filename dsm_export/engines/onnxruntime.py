"""ONNX Runtime engines from a validated DSM ONNX file.

* optimized: the graph with ORT's graph optimizations applied and saved
  (``SessionOptions.optimized_model_filepath``);
* fp16: made with onnxconverter-common, in which the matching scores (keys -> cosine similarity ->
  ArgMax/TopK) and everything carrying token sizes stay in fp32.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Callable

import numpy as np
import onnx

from ..errors import DSMError
from ..graph.export import META_PREFIX, load_onnx, read_metadata
from ..graph.onnx_file import infer_shapes, needs_external_data
from .providers import create_session


def _copy_metadata(src: onnx.ModelProto, dst: onnx.ModelProto, extra: dict | None = None) -> None:
    del dst.metadata_props[:]
    for p in src.metadata_props:
        dst.metadata_props.add(key=p.key, value=p.value)
    for key, value in (extra or {}).items():
        dst.metadata_props.add(key=META_PREFIX + key, value=str(value))


def build_onnxruntime(onnx_path: str, output: str, fp16: bool = False) -> dict:
    """Write an ONNX Runtime engine file: graph optimizations applied (ORT_ENABLE_EXTENDED, portable
    across CPUs) and saved; with ``fp16`` the graph is first converted to fp16 (fp32 islands for
    matching and sizes, fp32 inputs and outputs).

    A source with external data (``<file>.data`` beside it, e.g. a model over protobuf's 2 GiB)
    gives an engine with external data too (``<output file name>.data``): ONNX Runtime reads the
    source by path and writes the optimized graph's weights to a data file
    (``session.optimized_model_external_initializers_file_name``); a single-file source gives a
    single-file engine unless the engine reaches 2 GiB. Both files are published atomically
    (:func:`dsm_export.graph.onnx_file.save_onnx`).

    Returns:
        ``{"backend", "precision", "output", "files", "fp32_nodes"}``; ``files`` lists the model
        file and its data file, if any.

    Raises:
        DSMError: bad input file (or a missing or truncated data file) or output folder, or a graph
            ONNX Runtime cannot load.
    """
    from onnx.external_data_helper import load_external_data_for_model

    from ..graph.onnx_file import has_external_data, save_onnx

    model = load_onnx(onnx_path, weights=False)
    read_metadata(model, onnx_path)
    external = has_external_data(model)
    kept = 0
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise DSMError(f"output folder {folder!r} does not exist")
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=folder)
    try:
        src = onnx_path
        if fp16:
            if external:
                load_external_data_for_model(model, os.path.dirname(os.path.abspath(onnx_path)))
            half, kept = convert_fp16(model)
            src = os.path.join(work, "fp16.onnx")
            save_onnx(half, src, external_data=external or needs_external_data(half))
            del half
        optimized = os.path.join(work, "optimized.onnx")
        create_session(src, "cpu", optimization="extended", optimized_path=optimized,
                       optimized_data="optimized.onnx.data" if external else None,
                       label=f"{onnx_path!r}" + (" (fp16)" if fp16 else ""))
        result = onnx.load(optimized)
        _copy_metadata(model, result, {"engine": "onnxruntime", "precision": "fp16" if fp16 else "fp32"})
        files = save_onnx(result, output, external_data=True if external else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"backend": "onnxruntime", "precision": "fp16" if fp16 else "fp32", "output": output,
            "files": files, "fp32_nodes": kept}


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
    from ..graph.onnx_file import infer_shapes

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
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise DSMError("fp16 needs onnxconverter-common: pip install 'dsm-export[engines]'") from None
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


def batched_runner(run: Callable[[np.ndarray], np.ndarray], static_batch: int | None):
    """Wrap ``run`` so that a graph with a fixed batch size takes any number of images."""

    def runner(x: np.ndarray) -> np.ndarray:
        if static_batch is None:
            return run(np.ascontiguousarray(x, dtype=np.float32))
        outs = []
        for start in range(0, len(x), static_batch):
            chunk = x[start:start + static_batch]
            n = len(chunk)
            if n < static_batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], static_batch - n, axis=0)])
            outs.append(run(np.ascontiguousarray(chunk, dtype=np.float32))[:n])
        return np.concatenate(outs)

    return runner
