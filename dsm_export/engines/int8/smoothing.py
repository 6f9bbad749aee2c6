"""SmoothQuant-style activation smoothing of a ViT ONNX graph, before INT8 quantization.

INT8 quantizes an activation tensor with one scale (per tensor, or per batch in ONNX Runtime's
dynamic mode), so a few input channels with large ranges cost every other channel precision.
SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
Language Models", ICML 2023, arXiv 2211.10438, section 4, eq. 4) divides input channel ``j`` of a
linear layer's activations by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` and multiplies row
``j`` of its weight by ``s_j``: the product is unchanged in exact arithmetic, and the activation
ranges even out. The division is folded into the op that produces the activations, so the graph
keeps its ops and its speed:

* ``qkv`` and ``fc1``: into the ``LayerNormalization`` before them (its scale and bias), as
  SmoothQuant does for the LayerNorm -> linear pairs of a transformer;
* ``proj``: into the value columns of ``qkv`` (weight and bias). Attention mixes tokens, never
  channels, so channel ``j`` of the attention output is channel ``j`` of the values, scaled.

``fc2`` (after GELU) has no linear producer to fold into and is left alone. Which tokens merge is
unchanged up to fp32 rounding: queries and keys see the same products.

This module holds the graph rewrite and the range collection; :func:`dsm_export.engines.int8.quantize.quantize_int8`
applies it (``QuantizeOptions.smooth_alpha``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ...errors import DSMError
from ...graph.facts import layer_labels
from ...graph.onnx_file import session_source
from ..providers import create_session


@dataclass(frozen=True)
class SmoothPair:
    """One producer -> linear layer pair whose input channels are smoothed.

    Attributes:
        label: the linear layer's timm-style label (``blocks.3.qkv``, ``blocks.3.fc1``,
            ``blocks.3.proj``).
        activation: name of the linear layer's input tensor (``[..., D]``) whose channel ranges
            set the scales.
        weight: initializer of the linear layer's weight ``[D, out]`` (rows scaled by ``s``).
        divide: ``(initializer, first, count)`` of the producer whose output channels are divided
            by ``s``: the LayerNorm scale and bias (first 0) or the value columns of ``qkv``'s
            weight and bias (first ``2 D``).
    """

    label: str
    activation: str
    weight: str
    divide: tuple[tuple[str, int, int], ...]


def smoothing_scales(act_amax: np.ndarray, weight_amax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel scales (arXiv 2211.10438, eq. 4).

    Args:
        act_amax: ``[D]`` max |activation| of each input channel over the calibration images.
        weight_amax: ``[D]`` max |weight| of each input channel (row of a ``[D, out]`` weight).
        alpha: migration strength in [0, 1]: 0 leaves activations as they are (up to the weight
            term), 1 moves all of their range into the weights.

    Returns:
        ``[D]`` float32 scales ``s``; the activations are divided by ``s``, weight rows multiplied.
        Channels that never fire (max 0) get scale 1.

    Raises:
        DSMError: ``alpha`` outside [0, 1] or shapes that differ.
    """
    if not 0.0 <= alpha <= 1.0:
        raise DSMError(f"smoothing alpha must be in [0, 1], got {alpha}")
    act_amax = np.asarray(act_amax, dtype=np.float64)
    weight_amax = np.asarray(weight_amax, dtype=np.float64)
    if act_amax.shape != weight_amax.shape:
        raise DSMError(f"activation ranges {act_amax.shape} and weight ranges {weight_amax.shape} differ")
    ok = (act_amax > 0) & (weight_amax > 0)
    s = np.ones_like(act_amax)
    s[ok] = act_amax[ok] ** alpha / weight_amax[ok] ** (1.0 - alpha)
    return s.astype(np.float32)


def smoothing_pairs(model: onnx.ModelProto) -> list[SmoothPair]:
    """Find the pairs :mod:`dsm_export.engines.int8.smoothing` can fold, per block (``qkv``, ``proj``, ``fc1``).

    A pair is taken only when the graph has the shape the fold needs: ``LayerNormalization`` (scale
    and bias initializers, output read by the linear layer alone) -> ``MatMul`` with an initializer
    weight, for ``qkv`` and ``fc1``; for ``proj``, a ``qkv`` ``MatMul`` + ``Add`` bias of width
    ``3 D`` in the same block and no normalisation between it and ``proj``. Layers of other shapes
    are skipped (left unsmoothed), never guessed.

    Args:
        model: fp32 ViT graph written by ``dsm-export export`` (nodes named, see
            :func:`dsm_export.graph.facts.layer_labels`).

    Returns:
        The pairs in graph order.
    """
    labels = layer_labels(model)
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    by_label = {label: n for n in model.graph.node if (label := labels.get(n.name))}
    order = {n.name: k for k, n in enumerate(model.graph.node)}
    pairs: list[SmoothPair] = []
    for label, node in by_label.items():
        kind = label.rsplit(".", 1)[-1]
        if node.op_type != "MatMul" or node.input[1] not in inits or kind not in ("qkv", "fc1", "proj"):
            continue
        act = node.input[0]
        width = inits[node.input[1]].dims[0]
        if kind in ("qkv", "fc1"):
            ln = producer.get(act)
            if (ln is None or ln.op_type != "LayerNormalization" or len(ln.input) < 3
                    or ln.input[1] not in inits or ln.input[2] not in inits or len(consumers.get(act, [])) != 1):
                continue
            pairs.append(SmoothPair(label, act, node.input[1], ((ln.input[1], 0, width), (ln.input[2], 0, width))))
            continue
        qkv = by_label.get(label[:-len("proj")] + "qkv")
        if qkv is None or qkv.op_type != "MatMul" or qkv.input[1] not in inits:
            continue
        w = inits[qkv.input[1]]
        adds = [n for n in consumers.get(qkv.output[0], []) if n.op_type == "Add"]
        bias = next((i for a in adds for i in a.input if i in inits and tuple(inits[i].dims) == (3 * width,)), None)
        between = model.graph.node[order[qkv.name] + 1:order[node.name]]
        if (tuple(w.dims) != (width, 3 * width) or bias is None or len(adds) != 1
                or any(n.op_type in ("LayerNormalization", "ReduceMean") for n in between)):
            continue
        pairs.append(SmoothPair(label, act, node.input[1], ((qkv.input[1], 2 * width, width), (bias, 2 * width, width))))
    return pairs  # graph order: by_label follows the node list


def activation_ranges(model: onnx.ModelProto, tensors: list[str], pixels: np.ndarray,
                      batch: int = 32) -> dict[str, np.ndarray]:
    """Max |value| per last-axis channel of ``tensors`` over ``pixels`` (ONNX Runtime, CPU).

    Args:
        model: the graph; a copy gets ``tensors`` as extra outputs.
        tensors: names of ``[..., D]`` float tensors.
        pixels: ``[N, 3, H, W]`` preprocessed calibration images.
        batch: images per run.

    Returns:
        name -> ``[D]`` float32.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for name in tensors:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory(prefix="dsm-smooth-") as work:  # a probe over 2 GiB goes by file
        session = create_session(session_source(probe, work), "cpu", optimization="default", log_severity=3,
                                 label="the SmoothQuant activation probe")
    del probe
    feed = model.graph.input[0].name
    out: dict[str, np.ndarray] = {}
    for i in range(0, len(pixels), batch):
        values = session.run(tensors, {feed: np.ascontiguousarray(pixels[i:i + batch], dtype=np.float32)})
        for name, v in zip(tensors, values):
            m = np.abs(v.reshape(-1, v.shape[-1])).max(0)
            out[name] = m if name not in out else np.maximum(out[name], m)
    return out


def smooth_graph(model: onnx.ModelProto, pixels: np.ndarray, alpha: float, batch: int = 32) -> dict:
    """Fold SmoothQuant scales into ``model`` in place (see the module docstring).

    Every pair of :func:`smoothing_pairs` gets scales from the ranges its input reaches on
    ``pixels`` (all measured on the unsmoothed graph, as SmoothQuant calibrates); changed
    initializers are written under new names (``<name>_smoothed``), so shared initializers stay
    correct. The fp32 outputs are unchanged up to rounding.

    Args:
        model: fp32 ViT graph (``dsm-export export``), nodes named.
        pixels: ``[N, 3, H, W]`` calibration images after the model's eval transform.
        alpha: SmoothQuant migration strength in [0, 1].
        batch: images per range-collection run.

    Returns:
        ``{"smooth_alpha": alpha, "smoothed_layers": [labels]}`` for the metadata.

    Raises:
        DSMError: no calibration images, or ``alpha`` outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise DSMError(f"smoothing alpha must be in [0, 1], got {alpha}")
    if pixels is None or len(pixels) == 0:
        raise DSMError("activation smoothing needs calibration images (--calibration DIR)")
    pairs = smoothing_pairs(model)
    if not pairs:
        return {"smooth_alpha": alpha, "smoothed_layers": []}
    ranges = activation_ranges(model, sorted({p.activation for p in pairs}), pixels, batch)
    inits = {i.name: i for i in model.graph.initializer}
    needed = {p.weight for p in pairs} | {name for p in pairs for name, _, _ in p.divide}
    arrays = {name: numpy_helper.to_array(inits[name]).copy() for name in needed}
    changed: set[str] = set()
    for pair in pairs:
        s = smoothing_scales(ranges[pair.activation], np.abs(arrays[pair.weight]).max(1), alpha)
        arrays[pair.weight] *= s[:, None]
        changed.add(pair.weight)
        for name, first, count in pair.divide:
            a = arrays[name]
            if a.ndim == 1:
                a[first:first + count] /= s
            else:
                a[:, first:first + count] /= s[None, :]
            changed.add(name)
    renamed = {name: f"{name}_smoothed" for name in changed}
    for name in sorted(changed):  # a set: sorted, so the file is the same on every run
        model.graph.initializer.append(numpy_helper.from_array(arrays[name].astype(np.float32), renamed[name]))
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
    still_used = {i for n in model.graph.node for i in n.input}
    kept = [i for i in model.graph.initializer if i.name in still_used or i.name not in changed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return {"smooth_alpha": alpha, "smoothed_layers": [p.label for p in pairs]}
