"""The Python API: one call per step of the main job, each what the ``dsm-export`` subcommand of
the same name does (the CLI adds argument checks and printing).

    export(model_name, "dsm.onnx", "r=16,delay=3", weights=...)  -> ExportInfo
    validate("dsm.onnx", "photos/")                              -> report dict
    quantize("dsm.onnx", "dsm_int8.onnx", "photos/")             -> quantization record
    build("dsm.onnx", "dsm.xml", backend="openvino", precision="bf16") -> BuildRecord
    tune(model=..., weights=..., images=..., target_speedup=1.6) -> TuneReport
"""

from __future__ import annotations

import numpy as np

from .check.distributed import validate_ray
from .check.validate import ValidateOptions
from .check.validate import validate as _validate
from .data import ImageSet, list_images
from .engines.cluster import RayOptions
from .engines.int8.quantize import QuantizeOptions, calibration_pixels, quantize_int8
from .engines.registry import BuildRecord, BuildRequest, RunnerOptions, build_engine, open_runner
from .graph.export import ExportInfo, export_onnx, load_onnx, read_metadata
from .search.tuning import TuneOptions, TuneReport, tune
from .serving.predict import PredictOptions, PredictSummary
from .serving.predict import predict as _predict

__all__ = ["ExportInfo", "PredictOptions", "PredictSummary", "QuantizeOptions", "RayOptions", "TuneOptions",
           "TuneReport", "build", "export", "predict", "quantize", "tune", "validate"]


def export(model_name: str, output: str, schedule="none", **kwargs) -> ExportInfo:
    """Export a timm ViT under a merge schedule to a static-shape ONNX file (``dsm-export export``).

    Args:
        model_name: a timm name (``deit_tiny_patch16_224``, with a pretrained tag, or ``hf-hub:``), or a
            Hugging Face Transformers vision model (a ``save_pretrained`` folder, or a cached hub id).
        output: the ``.onnx`` path, written through a temporary file.
        schedule: a :class:`~dsm_export.Schedule` or its spec (``"r=16,delay=3,windows=2x2,local=2"``,
            ``"none"``).
        **kwargs: ``weights`` (a checkpoint file), ``pretrained``, ``batch`` (None: dynamic),
            ``opset``, ``image_size``, ``num_classes``, ``full_last_block``, ``external_data``
            (weights in ``<output file name>.data`` beside it at any size; always over 2 GiB), or
            the last four grouped as ``options=``
            :class:`~dsm_export.graph.export.ExportOptions`
            (:func:`dsm_export.graph.export.export_onnx`).

    Returns:
        the :class:`ExportInfo` recorded in the file's metadata.

    Raises:
        DSMError, ScheduleError, UnsupportedModelError: a bad schedule, a model that is not a
            timm ViT, an unreadable weights file.
    """
    return export_onnx(model_name, output, schedule, **kwargs)


def validate(engine: str, images, threads: int | None = None, provider: str | None = "cpu",
             flavour: str = "auto", runtime_cache: str | None = None, ray: RayOptions | None = None,
             **kwargs) -> dict:
    """Validate an engine of any registered backend against PyTorch on ``images`` (``dsm-export
    validate``): ONNX Runtime for ``.onnx``, OpenVINO for ``.xml``, TensorRT for ``.plan``, ExecuTorch
    for ``.pte`` (:mod:`dsm_export.engines.registry`).

    Args:
        engine: the engine file (its metadata names the model, schedule and weights).
        images: an image folder or an :class:`~dsm_export.data.ImageSet`.
        threads, provider, flavour, runtime_cache: how it runs (:class:`~dsm_export.engines.RunnerOptions`).
        ray: run the images on Ray actors (:class:`~dsm_export.engines.cluster.RayOptions`; ``RayOptions()``:
            ``RAY_ADDRESS`` or a local instance); the report is the local one's, plus ``ray`` and ``ray_actors``.
        **kwargs: ``limit`` (images), ``weights``, ``batch_size``, ``precision`` (the criterion), ...
            (:class:`dsm_export.check.validate.ValidateOptions`).

    Returns:
        the report: ``passed`` and its ``criterion``, ``max_abs_diff`` (logits, against PyTorch
        with the same schedule), ``top1_match_pytorch``, ``kl_to_pytorch``, and ``kl`` (nats) and
        ``top1_agreement`` to the unmerged model; ``top1_accuracy`` where the images are labelled.

    Raises:
        DSMError: a foreign or corrupt file, missing weights, an unavailable runtime.
    """
    options = RunnerOptions(threads=threads, provider=provider, flavour=flavour, runtime_cache=runtime_cache)
    if ray is None:
        return _validate(engine, images, options, **kwargs)
    runner = open_runner(engine, options)  # the file and the runtime, checked here before Ray starts
    runner.close()
    settings = ValidateOptions(**{"source_path": runner.engine_file.source_path, **kwargs})
    image_set = images if isinstance(images, ImageSet) else list_images(images, settings.limit)
    report = validate_ray(runner.engine_file, image_set, settings, runner.judged_as, options, ray)
    report.update(engine=runner.engine_file.backend, runtime=runner.label)
    return report


def predict(engine: str, images: str, output: str, threads: int | None = None, provider: str | None = "cpu",
            ray: RayOptions | None = None, **kwargs) -> PredictSummary:
    """Run an engine of any backend over an image folder (recursive) or a Parquet list of paths and
    write one Parquet row per image to the folder ``output`` (``dsm-export predict``): ``path``, then
    ``top_k_classes``/``top_k_probs`` (and ``logits`` if asked) or ``embedding``; resumes an earlier
    run into ``output`` (:mod:`dsm_export.serving.predict`).

    Args:
        engine: the engine file; images: folder or ``.parquet`` with a ``path`` column; output: the
            Parquet folder.
        threads, provider: how a local run runs (:class:`~dsm_export.engines.RunnerOptions`).
        ray: run as a Ray Data pipeline (:class:`~dsm_export.engines.cluster.RayOptions`).
        **kwargs: ``top_k``, ``logits``, ``batch_size``, ``rows_per_file``, ``limit``, ``progress``
            (:class:`~dsm_export.serving.predict.PredictOptions`).

    Returns:
        :class:`~dsm_export.serving.predict.PredictSummary` (rows written, images/s, ...).

    Raises:
        DSMError: a bad engine, source, output folder or option; pyarrow or Ray not installed.
    """
    return _predict(engine, images, output, RunnerOptions(threads=threads, provider=provider),
                    PredictOptions(**kwargs), ray)


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
          calibration: str | None = None, calibration_count: int = 64, **options) -> BuildRecord:
    """An engine from a dsm-export ONNX file (``dsm-export build``), by any registered backend.

    Args:
        backend: ``onnxruntime`` (fp32, fp16, int8: an optimized or quantized ``.onnx``),
            ``openvino`` (fp32, bf16, int8: an IR, ``output`` ends in ``.xml``), ``tensorrt``
            (fp32, fp16, int8 from a quantized file: a plan) or ``executorch`` (fp32, int8: a ``.pte``);
            :func:`dsm_export.engines.registry.names` lists them.
        calibration: image folder for int8 (onnxruntime, openvino, executorch).
        **options: the backend's options (:class:`~dsm_export.engines.int8.quantize.QuantizeOptions`,
            :class:`~dsm_export.engines.openvino.OpenVINOOptions`,
            :class:`~dsm_export.engines.tensorrt.TensorRTOptions` fields).

    Returns:
        the backend's :class:`~dsm_export.engines.BuildRecord` (``record["fp32_matching_nodes"]``
        and the other keys of the backend's record read through it).

    Raises:
        DSMError: an unknown backend or precision, an option of another backend, int8 without
            calibration images, and what the backend raises.
    """
    request = BuildRequest(onnx_path, output, precision, calibration, calibration_count, options)
    return build_engine(request, backend, log=print)
