"""INT8 post-training static quantization of a DSM ONNX file, in QDQ format.

The quantizer is ONNX Runtime's (``onnxruntime.quantization.quantize_static``); this module chooses
what it quantizes and feeds it calibration images:

* **What is quantized**: the weight MatMuls/Gemms and the patch-embedding Conv (``qkv``, ``proj``,
  ``fc1``, ``fc2``, head), weights per output channel, activations per tensor. Activation-by-
  activation MatMuls (attention ``q @ k^T`` and ``attn @ v``) stay fp32 by default
  (:data:`DEFAULT_OP_TYPES`, ``MatMulConstBOnly``): they carry the proportional-attention term and
  their quantization costs accuracy for no measurable speed on the CPU (see the README's INT8
  section for the measurement).
* **What stays fp32**: the matching path -- key mean over heads, normalisation, the similarity
  MatMul, ReduceMax/ArgMax/TopK, the one-hot assignment MatMul, token sizes and ``log(size)`` --
  the same islands :func:`dsm_export.engines.fp16.fp32_island_nodes` keeps for fp16. Which
  tokens merge is decided in fp32, on keys computed from INT8 MatMuls.
* **Smoothing** (optional, ``QuantizeOptions.smooth_alpha``): SmoothQuant scales folded into the
  LayerNorms and value weights first (:mod:`dsm_export.engines.int8.smoothing`), exact in fp32, so that one INT8
  scale per activation tensor covers evener channel ranges.
* **Format**: standard ``QuantizeLinear``/``DequantizeLinear`` of the default ONNX domain (no
  contrib ops), so TensorRT builds it with explicit quantization. Default activations are signed
  INT8 with zero point 0 (symmetric, S8S8), the form TensorRT requires; ``uint8`` activations (U8S8,
  asymmetric) are offered for ONNX-Runtime-only files.

Calibration images go through the model's timm eval transform (``resolve_data_config`` +
``create_transform``), so calibration sees exactly what serving sees.

Source: ONNX Runtime quantization docs ("Quantize ONNX models": static quantization, QDQ format,
per-channel, calibration methods); NVIDIA TensorRT developer guide, "Working with Quantized Types"
(explicit quantization: symmetric INT8 Q/DQ, zero point 0).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from ...core.models import create_model
from ...data import eval_transform, list_images, load_batch
from ...errors import DSMError
from ...graph.export import load_onnx, read_metadata
from ...graph.facts import QUANTIZED_OPS, is_quantized, layer_labels, quantization_record  # noqa: F401  (here before graph/facts.py)
from ...graph.facts import name_nodes as _name_nodes
from ..fp16 import fp32_island_nodes
from ...graph.facts import weight_inputs as _weight_inputs
from ...graph.metadata import dsm_props, prefixed, read_props, write_props
from ...graph.onnx_file import (
    data_file_name,
    has_external_data,
    needs_external_data,
    publish,
    read_graph,
    save_onnx,
    sha256_model_files,
)
from .smoothing import smooth_graph

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_OP_TYPES = ("MatMul", "Gemm", "Conv")
# Layers kept fp32 unless the caller says otherwise. Dynamic mode: the first block's four MatMuls
# (keeping them cuts the KL of the unmerged DeiT-Tiny from 0.0035 to 0.0022, and of a merged one
# from 0.0550 to 0.0446, in research/int8_choices.py; the frontier times the result). Static mode:
# none (keeping fc2 helps the unmerged model only and costs 12 layers).
DEFAULT_KEEP_FP32 = {"static": (), "dynamic": ("blocks.0",)}


@dataclass
class QuantizeOptions:
    """What :func:`quantize_int8` quantizes and how it calibrates.

    Attributes:
        mode: ``static`` (QDQ, calibrated; TensorRT-compatible) or ``dynamic`` (ONNX Runtime's
            dynamic quantization; no calibration).
        calibration_method: ``minmax``, ``entropy`` or ``percentile`` (ORT ``CalibrationMethod``).
        calibration_count: calibration images used (the first N of the folder, sorted by name,
            unless the caller passes its own selection).
        percentile: the percentile for ``percentile`` calibration (ORT default 99.999).
        activations: ``int8`` (symmetric, zero point 0: TensorRT-compatible) or ``uint8``
            (asymmetric U8S8, ONNX Runtime only).
        per_channel: per-output-channel weight scales.
        op_types: op types quantized.
        quantize_attention: also quantize the activation-by-activation MatMuls (``q @ k^T``,
            ``attn @ v``). Static mode only: ONNX Runtime's dynamic quantizer leaves them fp32
            either way (checked: the same graph and logits with and without).
        keep_fp32: layers left in fp32 by their timm-style label (:func:`layer_labels`): ``fc2``
            (every block's), ``blocks.0``, ``blocks.11.fc2``, ``head``, ``patch_embed``; None for the
            mode's default (:data:`DEFAULT_KEEP_FP32`: ``blocks.0`` in dynamic mode, nothing in
            static mode; see :meth:`kept`).
        smooth_alpha: fold SmoothQuant scales with this migration strength into the graph before
            quantizing (:mod:`dsm_export.engines.int8.smoothing`; needs calibration images in either mode), or
            None for no smoothing.
        batch_size: calibration batch size.
    """

    mode: str = "static"
    calibration_method: str = "percentile"
    calibration_count: int = 64
    percentile: float = 99.999
    activations: str = "int8"
    per_channel: bool = True
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    quantize_attention: bool = False
    keep_fp32: tuple[str, ...] | None = None
    smooth_alpha: float | None = None
    quantize_outputs: bool = False
    batch_size: int = 16

    def kept(self) -> tuple[str, ...]:
        """The layers left in fp32: ``keep_fp32``, or the mode's default when it is None."""
        return DEFAULT_KEEP_FP32[self.mode] if self.keep_fp32 is None else tuple(self.keep_fp32)

    def check(self) -> None:
        """Raises DSMError on an unknown method, activation type or a count below 1."""
        if self.calibration_method not in CALIBRATION_METHODS:
            raise DSMError(f"calibration method {self.calibration_method!r}: choose one of "
                           f"{', '.join(CALIBRATION_METHODS)}")
        if self.mode not in ("static", "dynamic"):
            raise DSMError(f"quantization mode {self.mode!r}: choose static or dynamic")
        if self.activations not in ("int8", "uint8"):
            raise DSMError(f"activations {self.activations!r}: choose int8 or uint8")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise DSMError(f"--smooth-alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.calibration_count < 1:
            raise DSMError(f"--calibration-count must be at least 1, got {self.calibration_count}")


def images_sha256(paths: list[str]) -> str:
    """sha256 over the calibration images' names and bytes, in order (recorded in the metadata)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def matching_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes of the matching and size path (kept fp32): see
    :func:`dsm_export.engines.fp16.fp32_island_nodes`. Unnamed nodes are named first."""
    _name_nodes(model)
    return fp32_island_nodes(model)


def _label_matches(label: str, patterns) -> bool:
    """``blocks.3.fc2`` matches ``fc2``, ``blocks.3``, ``blocks.3.fc2``, ``head`` only ``head``."""
    parts = label.split(".")
    for p in patterns:
        q = p.split(".")
        if any(parts[i:i + len(q)] == q for i in range(len(parts) - len(q) + 1)):
            return True
    return False


def plan_quantization(model: onnx.ModelProto, options: QuantizeOptions) -> tuple[list[str], dict]:
    """Choose the nodes to quantize.

    Args:
        model: the fp32 DSM graph (nodes get names if they have none).
        options: :class:`QuantizeOptions`.

    Returns:
        ``(nodes_to_quantize, summary)``; ``summary`` counts quantized nodes per op type, the
        matching/size nodes kept fp32 and other candidates kept fp32 (attention MatMuls,
        ``keep_fp32``).
    """
    fp32 = set(matching_nodes(model))
    labels = layer_labels(model)
    weights = _weight_inputs(model)
    chosen, kept_matching, kept_other = [], 0, 0
    per_type: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in options.op_types:
            continue
        if node.name in fp32:
            kept_matching += 1
            continue
        if options.kept() and _label_matches(labels.get(node.name, node.name), options.kept()):
            kept_other += 1
            continue
        if node.op_type == "MatMul" and not options.quantize_attention and node.input[1] not in weights:
            kept_other += 1
            continue
        chosen.append(node.name)
        per_type[node.op_type] = per_type.get(node.op_type, 0) + 1
    summary = {"quantized": per_type, "fp32_matching_nodes": len(fp32),
               "fp32_matching_candidates": kept_matching, "fp32_other_candidates": kept_other}
    return chosen, summary


class _PixelReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over preprocessed pixels."""

    def __init__(self, input_name: str, pixels: np.ndarray, batch_size: int):
        self.input_name = input_name
        self.pixels = pixels
        self.batch_size = batch_size
        self.start = 0

    def get_next(self):
        if self.start >= len(self.pixels):
            return None
        chunk = self.pixels[self.start:self.start + self.batch_size]
        self.start += self.batch_size
        return {self.input_name: np.ascontiguousarray(chunk, dtype=np.float32)}

    def rewind(self):
        self.start = 0


def calibration_pixels(model_name: str, images_dir: str, count: int) -> tuple[np.ndarray, list[str]]:
    """Calibration images through ``model_name``'s timm eval transform.

    Takes the first ``count`` images of the folder (sorted by name); every file is read up front,
    so an unreadable image fails before any quantization work.

    Returns:
        ``([N, 3, H, W] float32, image paths)``.

    Raises:
        DSMError: missing folder, no images, an unreadable image, or ``count`` < 1.
    """
    if count < 1:
        raise DSMError(f"--calibration-count must be at least 1, got {count}")
    images = list_images(images_dir, count)
    model = create_model(model_name, None, warn_random=False)  # for its data config only
    transform = eval_transform(model)
    with torch.inference_mode():
        pixels = load_batch(images, range(len(images)), transform).numpy()
    return pixels, [images.path(i) for i in range(len(images))]


def quantize_int8(onnx_path: str, output: str, pixels: np.ndarray | None = None,
                  options: QuantizeOptions | None = None, calibration_files: list[str] | None = None) -> dict:
    """Write an INT8 copy of a dsm-export ONNX file (see module docstring).

    ``options.mode == "static"`` (default): QDQ format, calibrated on ``pixels``;
    ``"dynamic"``: ONNX Runtime dynamic quantization (``quantize_dynamic``: weights INT8 per
    channel, activations quantized per batch at run time with the standard
    ``DynamicQuantizeLinear``/``MatMulInteger`` ops; no calibration, ONNX Runtime only -- TensorRT
    does not import these ops -- and an image's logits depend slightly on the other images of its
    batch).

    Args:
        onnx_path: fp32 file written by ``dsm-export export``.
        output: ``.onnx`` path; written atomically.
        pixels: ``[N, 3, H, W]`` float32 calibration images after the model's eval transform
            (:func:`calibration_pixels`); required for static quantization.
        options: :class:`QuantizeOptions` (default: static, percentile, per-channel, symmetric).
        calibration_files: the image paths behind ``pixels`` (hashed into the metadata).

    Returns:
        The quantization record stored in the metadata (``precision``, ``format``,
        ``calibration_method``, ``calibration_count``, ``activations``, ``quantized`` per op type,
        ``fp32_matching_nodes``, ...) plus ``output``, ``nodes`` and ``qdq_nodes``.

    Raises:
        DSMError: a file that is not a dsm-export file, is already quantized, is fp16, or static
            quantization without calibration images.
    """
    options = options or QuantizeOptions()
    options.check()
    model, props, external = _load_fp32(onnx_path)
    _check_calibration(options, pixels)
    source_sha256 = sha256_model_files(onnx_path)
    producer = (model.producer_name, model.producer_version)
    _name_nodes(model)
    smoothing = _smooth(model, pixels, options)
    nodes, summary = plan_quantization(model, options)
    folder = _output_folder(output)
    name = os.path.basename(output)
    with tempfile.TemporaryDirectory(prefix="dsm-int8-") as work, \
            tempfile.TemporaryDirectory(prefix=f".{name}.", suffix=".tmp", dir=folder) as out_work:
        tmp = os.path.join(out_work, name)  # ONNX Runtime names its data file <name>.data
        src = os.path.join(work, "named.onnx")
        save_onnx(model, src, external_data=external)  # node names assigned by plan_quantization
        ops = {n.name: n.op_type for n in model.graph.node}
        graph_input = model.graph.input[0].name
        del model  # the quantizer reads the file; with external data, the saved copy's weights are on disk
        if options.mode == "static":
            _run_static(src, tmp, _PixelReader(graph_input, np.asarray(pixels, dtype=np.float32),
                                               options.batch_size), nodes, options, external)
        else:  # ORT's dynamic mode quantizes MatMul only
            _run_dynamic(src, tmp, [n for n in nodes if ops[n] == "MatMul"], options, external)
        quant = _checked_result(tmp, external)
        record = _build_record(quant, options, pixels, calibration_files, smoothing, summary)
        _write_metadata(quant, props, record, source_sha256, producer)
        _publish(quant, tmp, out_work, output)
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in quant.graph.node)
    return {"output": output, "nodes": len(quant.graph.node), "qdq_nodes": qdq, **record}


def _load_fp32(onnx_path: str) -> tuple[onnx.ModelProto, dict[str, str], bool]:
    """``(model, metadata props, external)``: the fp32 dsm-export file with its weights, all its
    ``metadata_props`` and whether the INT8 copy keeps its weights in a data file (the source's
    form, or over 2 GiB anyway).

    Raises:
        DSMError: not a dsm-export file, or one already quantized or fp16.
    """
    external = has_external_data(read_graph(onnx_path))
    model = load_onnx(onnx_path)
    external = external or needs_external_data(model)
    read_metadata(model, onnx_path)
    stored = dsm_props(model)
    if is_quantized(model) or stored.get("precision", "fp32") != "fp32":
        raise DSMError(f"{onnx_path!r} is already {stored.get('precision', 'quantized')}: "
                       "quantize the fp32 file written by 'dsm-export export'")
    return model, read_props(model), external


def _check_calibration(options: QuantizeOptions, pixels: np.ndarray | None) -> None:
    """Raises DSMError when static quantization or smoothing has no calibration images."""
    if options.mode == "static" and (pixels is None or len(pixels) == 0):
        raise DSMError("static INT8 quantization needs calibration images (--calibration DIR)")
    if options.smooth_alpha is not None and (pixels is None or len(pixels) == 0):
        raise DSMError("activation smoothing (--smooth-alpha) needs calibration images (--calibration DIR)")


def _smooth(model: onnx.ModelProto, pixels: np.ndarray | None, options: QuantizeOptions) -> dict:
    """Fold SmoothQuant scales into ``model`` (in place) when ``options.smooth_alpha`` is set; its
    record (:func:`dsm_export.engines.int8.smoothing.smooth_graph`), or ``{}``."""
    if options.smooth_alpha is None:
        return {}
    return smooth_graph(model, np.asarray(pixels, dtype=np.float32), options.smooth_alpha)


def _output_folder(output: str) -> str:
    """The folder ``output`` goes in; DSMError if it does not exist."""
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise DSMError(f"output folder {folder!r} does not exist")
    return folder


def _static_extra_options(options: QuantizeOptions) -> dict:
    """``extra_options`` of ONNX Runtime's ``quantize_static`` for ``options``."""
    symmetric = options.activations == "int8"
    extra = {
        "ActivationSymmetric": symmetric,
        "WeightSymmetric": True,
        # Biases stay fp32: TensorRT's explicit quantization has no INT32 bias DQ.
        "QuantizeBias": False,
        "MatMulConstBOnly": not options.quantize_attention,
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        # Outputs stay fp32: ORT runs DQ -> MatMul as MatMulIntegerToFloat (faster on x86
        # than QLinearMatMul plus re-quantization, and one rounding fewer per layer).
        "OpTypesToExcludeOutputQuantization": [] if options.quantize_outputs else list(options.op_types),
    }
    if options.calibration_method == "percentile":
        extra["CalibPercentile"] = options.percentile
    if options.calibration_method != "minmax":
        extra["CalibTensorRangeSymmetric"] = symmetric
    return extra


def _run_static(src: str, tmp: str, reader: _PixelReader, nodes: list[str], options: QuantizeOptions,
                external: bool) -> None:
    """ONNX Runtime's static QDQ quantizer: ``src`` -> ``tmp``, calibrated on ``reader``'s images."""
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[options.calibration_method]
    with _quiet():
        quantize_static(
            src, tmp, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(options.op_types),
            per_channel=options.per_channel, reduce_range=False,
            activation_type=QuantType.QInt8 if options.activations == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QInt8, nodes_to_quantize=nodes, calibrate_method=method,
            extra_options=_static_extra_options(options), calibration_providers=["CPUExecutionProvider"],
            use_external_data_format=external)


def _run_dynamic(src: str, tmp: str, nodes: list[str], options: QuantizeOptions, external: bool) -> None:
    """ONNX Runtime's dynamic quantizer on the MatMuls ``nodes``: ``src`` -> ``tmp``."""
    with _quiet():
        quantize_dynamic(src, tmp, per_channel=options.per_channel, reduce_range=False,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         nodes_to_quantize=nodes, extra_options={"MatMulConstBOnly": True},
                         use_external_data_format=external)


def _checked_result(tmp: str, external: bool) -> onnx.ModelProto:
    """The quantizer's output graph (with external data, the weights stay on disk), checked.

    Raises:
        DSMError: the graph holds ops outside the standard ONNX domain (a bug).
    """
    quant = onnx.load(tmp, load_external_data=False)
    onnx.checker.check_model(tmp if external else quant, full_check=True)
    foreign = sorted({n.domain for n in quant.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise DSMError(f"quantized graph holds non-standard op domains {foreign} (a bug)")
    return quant


def _calibration_record(options: QuantizeOptions, pixels: np.ndarray | None,
                        calibration_files: list[str] | None) -> dict:
    """The mode's part of the quantization record: format, activations and calibration."""
    if options.mode == "static":
        record = {
            "precision": "int8", "mode": "static", "format": "QDQ",
            "calibration_method": options.calibration_method,
            "calibration_count": int(len(pixels)),
            "activations": ("int8 symmetric (zero point 0)" if options.activations == "int8"
                            else "uint8 asymmetric"),
        }
        if options.calibration_method == "percentile":
            record["percentile"] = options.percentile
        if calibration_files:
            record["calibration_images_sha256"] = images_sha256(calibration_files)
        return record
    record = {"precision": "int8", "mode": "dynamic", "format": "DynamicQuantizeLinear/MatMulInteger",
              "activations": "uint8 asymmetric, per batch at run time"}
    if options.smooth_alpha is not None:
        record["calibration_count"] = int(len(pixels))
        if calibration_files:
            record["calibration_images_sha256"] = images_sha256(calibration_files)
    return record


def _build_record(quant: onnx.ModelProto, options: QuantizeOptions, pixels: np.ndarray | None,
                  calibration_files: list[str] | None, smoothing: dict, summary: dict) -> dict:
    """The quantization record :func:`quantize_int8` stores in the metadata (``dsm.quantization``).

    Args:
        quant: the quantized graph (dynamic mode counts its ``MatMulInteger`` nodes).
        options: the :class:`QuantizeOptions` it was quantized with.
        pixels: the calibration images (counted), or None.
        calibration_files: their paths (hashed), or None.
        smoothing: :func:`dsm_export.engines.int8.smoothing.smooth_graph`'s record, or ``{}``.
        summary: :func:`plan_quantization`'s summary.
    """
    static = options.mode == "static"
    record = _calibration_record(options, pixels, calibration_files)
    record.update({
        "weights": "int8 symmetric, " + ("per channel" if options.per_channel else "per tensor"),
        "op_types": list(options.op_types) if static else ["MatMul"],
        "quantize_attention": options.quantize_attention,
        "keep_fp32": list(options.kept()),
        **(smoothing or {"smooth_alpha": None}),
        **summary,
    })
    if not static:
        record["quantized"] = {"MatMul": sum(n.op_type == "MatMulInteger" for n in quant.graph.node)}
    return record


def _write_metadata(quant: onnx.ModelProto, props: dict[str, str], record: dict, source_sha256: str,
                    producer: tuple[str, str]) -> None:
    """The source's metadata and producer on ``quant``, with precision int8, the record and the
    source's sha256 (keys the source already has keep their place)."""
    write_props(quant, {**props, **prefixed({"precision": "int8", "quantization": json.dumps(record),
                                             "source_onnx_sha256": source_sha256})})
    quant.producer_name, quant.producer_version = producer


def _publish(quant: onnx.ModelProto, tmp: str, out_work: str, output: str) -> None:
    """Save ``quant`` over ``tmp`` (with external data: the graph alone, its data file as ONNX
    Runtime wrote it) and move it, with its data file if any, to ``output``."""
    onnx.save(quant, tmp)
    data = data_file_name(tmp)
    name = os.path.basename(tmp)
    publish(out_work, output, [data, name] if os.path.exists(os.path.join(out_work, data)) else [name])


@contextlib.contextmanager
def _quiet():
    """Silence onnxruntime.quantization's progress prints and its advice to pre-process (the DSM
    export is already shape-inferred and constant-folded)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)

