"""The Python API: one call per step of the main job, each what the ``dsm-export`` subcommand of
the same name does (the CLI adds argument checks and printing).

    export(model_name, "dsm.onnx", "r=16,delay=3", weights=...)  -> ExportInfo
    validate("dsm.onnx", "photos/")                              -> report dict
    quantize("dsm.onnx", "dsm_int8.onnx", "photos/")             -> quantization record
    build("dsm.onnx", "dsm.xml", backend="openvino", precision="bf16") -> build record
    tune(model=..., weights=..., images=..., target_speedup=1.6) -> TuneReport
"""

from __future__ import annotations

import numpy as np

from .check.validate import validate as _validate_onnx
from .check.validate import validate_engine, validate_openvino
from .engines.int8.quantize import QuantizeOptions, calibration_pixels, quantize_int8
from .errors import DSMError
from .graph.export import ExportInfo, export_onnx, load_onnx, read_metadata
from .search.tuning import TuneOptions, TuneReport, tune

__all__ = ["ExportInfo", "QuantizeOptions", "TuneOptions", "TuneReport", "build", "export", "quantize", "tune",
           "validate"]


def export(model_name: str, output: str, schedule="none", **kwargs) -> ExportInfo:
    """Export a timm ViT under a merge schedule to a static-shape ONNX file (``dsm-export export``).

    Args:
        model_name: a timm name (``deit_tiny_patch16_224``, with a pretrained tag, or ``hf-hub:``).
        output: the ``.onnx`` path, written through a temporary file.
        schedule: a :class:`~dsm_export.Schedule` or its spec (``"r=16,delay=3,windows=2x2,local=2"``,
            ``"none"``).
        **kwargs: ``weights`` (a checkpoint file), ``pretrained``, ``batch`` (None: dynamic),
            ``opset``, ``image_size``, ``num_classes``, ``full_last_block``, ``external_data``
            (weights in ``<output file name>.data`` beside it at any size; always over 2 GiB)
            (:func:`dsm_export.graph.export.export_onnx`).

    Returns:
        the :class:`ExportInfo` recorded in the file's metadata.

    Raises:
        DSMError, ScheduleError, UnsupportedModelError: a bad schedule, a model that is not a
            timm ViT, an unreadable weights file.
    """
    return export_onnx(model_name, output, schedule, **kwargs)


def validate(engine: str, images, **kwargs) -> dict:
    """Validate an engine against PyTorch on ``images`` (``dsm-export validate``): ONNX Runtime for
    ``.onnx``, OpenVINO for ``.xml``, TensorRT for ``.plan``/``.engine``.

    Args:
        engine: the engine file (its metadata names the model, schedule and weights).
        images: an image folder or an :class:`~dsm_export.data.ImageSet`.
        **kwargs: ``limit`` (images), ``weights``, ``batch_size``, ``provider`` (``.onnx``), ...
            (:func:`dsm_export.check.validate.validate_runner`).

    Returns:
        the report: ``passed`` and its ``criterion``, ``max_abs_diff`` (logits, against PyTorch
        with the same schedule), ``top1_match_pytorch``, ``kl_to_pytorch``, and ``kl`` (nats) and
        ``top1_agreement`` to the unmerged model; ``top1_accuracy`` where the images are labelled.

    Raises:
        DSMError: a foreign or corrupt file, missing weights, an unavailable runtime.
    """
    if engine.endswith(".xml"):
        return validate_openvino(engine, images, **kwargs)
    if engine.endswith((".plan", ".engine")):
        return validate_engine(engine, images, **kwargs)
    return _validate_onnx(engine, images, **kwargs)


def quantize(onnx_path: str, output: str, calibration: str | np.ndarray | None = None,
             options: QuantizeOptions | None = None) -> dict:
    """INT8 copy of a dsm-export ONNX file, the matching path kept in fp32 (``dsm-export build
    --precision int8``).

    Args:
        calibration: an image folder (its first ``options.calibration_count`` images go through
            the model's timm eval transform), ``[N, 3, H, W]`` float32 pixels, or None (dynamic).
        options: :class:`QuantizeOptions` (default: static QDQ, symmetric, percentile calibration).

    Returns:
        the quantization record stored in the file's metadata.

    Raises:
        DSMError: an already-quantized or fp16 file, static quantization without calibration images.
    """
    options = options or QuantizeOptions()
    options.check()
    files = None
    if isinstance(calibration, str):
        info = read_metadata(load_onnx(onnx_path, weights=False), onnx_path)
        calibration, files = calibration_pixels(info.model, calibration, options.calibration_count)
    return quantize_int8(onnx_path, output, calibration, options, files)


def build(onnx_path: str, output: str, backend: str = "onnxruntime", precision: str = "fp32",
          calibration: str | None = None, calibration_count: int = 64, **options) -> dict:
    """An engine from a dsm-export ONNX file (``dsm-export build``).

    Args:
        backend: ``onnxruntime`` (fp32, fp16, int8: an optimized or quantized ``.onnx``),
            ``openvino`` (fp32, bf16, int8: an IR, ``output`` ends in ``.xml``) or ``tensorrt``
            (fp32, fp16, int8 from a quantized file: a plan).
        calibration: image folder for int8 (onnxruntime, openvino).
        **options: the backend's options (:class:`~dsm_export.engines.int8.quantize.QuantizeOptions`,
            :class:`~dsm_export.engines.openvino.OpenVINOOptions`,
            :class:`~dsm_export.engines.tensorrt.TensorRTOptions` fields).

    Returns:
        the backend's build record (precision, nodes kept in fp32, ...).

    Raises:
        DSMError: an unknown backend or precision, int8 without calibration images, and what the
            backend raises.
    """
    if backend == "onnxruntime":
        if precision == "int8":
            return quantize(onnx_path, output, calibration,
                            QuantizeOptions(calibration_count=calibration_count, **options))
        if precision not in ("fp32", "fp16"):
            raise DSMError(f"precision {precision!r}: onnxruntime builds fp32, fp16 or int8")
        from .engines import build_onnxruntime

        return build_onnxruntime(onnx_path, output, fp16=precision == "fp16")
    if backend == "openvino":
        from .engines.openvino import OpenVINOOptions, build_openvino, check_openvino_input

        opts = OpenVINOOptions(precision=precision, **options)
        opts.check()
        model = check_openvino_input(onnx_path)
        pixels = files = None
        if precision == "int8":
            if calibration is None:
                raise DSMError("openvino int8 needs calibration images")
            pixels, files = calibration_pixels(read_metadata(model, onnx_path).model, calibration, calibration_count)
        return build_openvino(onnx_path, output, opts, pixels, files)
    if backend == "tensorrt":
        from .engines.tensorrt import TensorRTOptions, build_tensorrt

        return build_tensorrt(onnx_path, output, TensorRTOptions(precision=precision, **options))
    raise DSMError(f"backend {backend!r}: choose onnxruntime, openvino or tensorrt")
