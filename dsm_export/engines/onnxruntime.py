"""The ONNX Runtime backend: engines from a validated DSM ONNX file, and their runner.

* optimized: the graph with ORT's graph optimizations applied and saved
  (``SessionOptions.optimized_model_filepath``);
* fp16: made with onnxconverter-common, in which the matching scores (keys -> cosine similarity ->
  ArgMax/TopK) and everything carrying token sizes stay in fp32 (:mod:`dsm_export.engines.fp16`);
* int8: static QDQ or dynamic, the matching path in fp32 (:mod:`dsm_export.engines.int8.quantize`).

Every ``.onnx`` file dsm-export writes (the export itself included) is an engine of this backend:
:class:`OnnxRuntimeRunner` runs it on any execution provider (:mod:`dsm_export.engines.providers`).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import fields

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import load_external_data_for_model

from .. import checks
from ..errors import DSMError
from ..graph.export import load_onnx, read_metadata
from ..graph.facts import is_quantized, precision_of
from ..graph.metadata import copy_props, dsm_props
from ..graph.onnx_file import has_external_data, model_files, needs_external_data, save_onnx
from .fp16 import convert_fp16
from .int8.quantize import QuantizeOptions, calibration_pixels, matching_nodes, quantize_int8
from .providers import create_session
from .registry import (
    Backend, BuildRecord, BuildRequest, EngineFile, OpTime, Profile, RunnerOptions, TritonPlacement, op_part,
    pad_batches, register,
)


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
        copy_props(model, result, {"engine": "onnxruntime", "precision": "fp16" if fp16 else "fp32"})
        files = save_onnx(result, output, external_data=True if external else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"backend": "onnxruntime", "precision": "fp16" if fp16 else "fp32", "output": output,
            "files": files, "fp32_nodes": kept}


def read_onnx_engine(path: str, model: onnx.ModelProto | None = None) -> EngineFile:
    """What a dsm-export ``.onnx`` file says about itself (read without its weights).

    Raises:
        DSMError: a file that is not ONNX or not written by dsm-export (or a missing data file).
    """
    model = load_onnx(path, weights=False) if model is None else model
    info = read_metadata(model, path)
    precision = precision_of(model)
    inp, out = model.graph.input[0], model.graph.output[0]
    batch = inp.type.tensor_type.shape.dim[0]
    meta = dsm_props(model)
    return EngineFile(
        path=path, backend="onnxruntime", info=info, precision=precision["precision"],
        input_name=inp.name, output_name=out.name,
        output_dims=tuple(int(d.dim_value) for d in out.type.tensor_type.shape.dim[1:]),
        static_batch=int(batch.dim_value) if batch.HasField("dim_value") and batch.dim_value > 0 else None,
        files=tuple(model_files(path, model)), source_path=path, meta=meta)


class OnnxRuntimeRunner:
    """An ONNX Runtime session on a dsm-export ``.onnx`` file, as a :class:`~dsm_export.engines.registry.Runner`.

    ``runner(x)``: ``[B, 3, H, W]`` float32 -> ``[B, D]`` float32 (logits or embeddings), any ``B``
    (a static-batch graph runs padded chunks). Judged by the precision the file records.

    Args:
        path: the ``.onnx`` file.
        options: provider, threads and spinning (:class:`~dsm_export.engines.registry.RunnerOptions`).

    Raises:
        DSMError: a foreign file, an unavailable provider, a graph ONNX Runtime cannot load.
    """

    def __init__(self, path: str, options: RunnerOptions | None = None):
        options = options or RunnerOptions()
        self.engine_file = read_onnx_engine(path)
        self.judged_as = self.engine_file.precision
        self.session = create_session(path, options.provider, options.threads, optimization="default",
                                      spinning=options.spinning)
        self.label = f"ONNX Runtime {ort.__version__} {self.session.get_providers()[0]}"
        self._input = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return pad_batches(x, self.engine_file.static_batch, lambda c: self.session.run(None, {self._input: c})[0])

    def close(self) -> None:
        """Free the session."""
        self.session = None


def _check_int8_request(request: BuildRequest) -> None:
    """Refuse INT8 mistakes before any work (one line)."""
    opts = request.options
    mode = opts.get("quantization") or "static"
    model = load_onnx(request.source, weights=False)
    read_metadata(model, request.source)
    precision = precision_of(model)["precision"]
    if is_quantized(model) or precision != "fp32":
        raise DSMError(f"{request.source!r} is already {precision if precision != 'fp32' else 'quantized'}: "
                       "--precision int8 takes the fp32 file written by 'dsm-export export'")
    if mode == "static" and not request.calibration:
        raise DSMError("static INT8 needs calibration images: --calibration DIR (or --quantization dynamic)")
    if mode == "dynamic" and request.calibration and opts.get("smooth_alpha") is None:
        raise DSMError("--quantization dynamic takes no --calibration (unless --smooth-alpha is given)")
    if opts.get("smooth_alpha") is not None and not request.calibration:
        raise DSMError("--smooth-alpha needs calibration images: --calibration DIR")
    if request.calibration and not os.path.isdir(request.calibration):
        raise DSMError(f"calibration folder {request.calibration!r} does not exist")


def _check_build(request: BuildRequest) -> None:
    if request.precision == "int8":
        _check_int8_request(request)
        quantize_options(request).check()
    elif request.options:
        raise DSMError(f"{', '.join('--' + k.replace('_', '-') for k in request.options)} apply to "
                       "--precision int8 only")
    elif request.calibration:
        raise DSMError("--calibration applies to --precision int8 only")


def quantize_options(request: BuildRequest) -> QuantizeOptions:
    """The :class:`QuantizeOptions` of an ONNX Runtime INT8 build request (``keep_fp32``: ``None`` for
    the mode's default, ``"none"`` or ``()`` for none, else comma-separated labels or a tuple)."""
    opts = dict(request.options)
    keep = opts.pop("keep_fp32", None)
    if isinstance(keep, str):
        keep = tuple(k.strip() for k in keep.split(",") if k.strip()) or None
    if keep == ("none",):
        keep = ()
    mode = opts.pop("quantization", None) or opts.pop("mode", None) or "static"
    return QuantizeOptions(mode=mode, calibration_count=request.calibration_count, keep_fp32=keep,
                           **{k: v for k, v in opts.items() if v is not None})


def int8_summary(rec: dict, options: QuantizeOptions) -> str:
    """The line ``dsm-export build`` prints for an ONNX Runtime INT8 record."""
    quantized = ", ".join(f"{v} {k}" for k, v in rec["quantized"].items())
    how = (f"static QDQ, {rec['activations']} activations, {rec['calibration_method']} calibration on "
           f"{rec['calibration_count']} images" if rec["mode"] == "static" else
           "dynamic (activations quantized per batch at run time; ONNX Runtime only)")
    if rec.get("smooth_alpha") is not None:
        how += (f"; SmoothQuant alpha {rec['smooth_alpha']} folded into {len(rec['smoothed_layers'])} layers' "
                f"inputs (ranges from {rec['calibration_count']} images)")
    others = ""
    if rec["fp32_other_candidates"]:
        kept = f", kept fp32: {','.join(options.kept())}" if options.kept() else ""
        others = f"; {rec['fp32_other_candidates']} more layers kept fp32 (attention q@k and attn@v{kept})"
    return (f"wrote {rec['output']}: INT8 {how}; quantized {quantized}; {rec['fp32_matching_nodes']} matching "
            f"and size nodes kept fp32 (which tokens merge is decided in fp32){others}")


def _build(request: BuildRequest, log=print) -> BuildRecord:
    """``build --backend onnxruntime``: fp32/fp16 (:func:`build_onnxruntime`) or INT8 (:func:`quantize_int8`)."""
    if request.precision == "int8":
        options = quantize_options(request)
        pixels = files = None
        if request.calibration:
            info = read_metadata(load_onnx(request.source, weights=False), request.source)
            pixels, files = calibration_pixels(info.model, request.calibration, options.calibration_count)
        rec = quantize_int8(request.source, request.output, pixels, options, files)
        return BuildRecord("onnxruntime", "int8", request.output, model_files(request.output),
                           [int8_summary(rec, options)], rec)
    rec = build_onnxruntime(request.source, request.output, fp16=request.precision == "fp16")
    data = [os.path.basename(f) for f in rec["files"][1:]]
    line = (f"wrote {request.output}: ONNX Runtime optimized graph, {rec['precision']}"
            + (f" ({rec['fp32_nodes']} nodes kept in fp32: matching and sizes)" if rec["fp32_nodes"] else "")
            + (f"; weights in {', '.join(data)} beside it" if data else ""))
    return BuildRecord("onnxruntime", rec["precision"], request.output, list(rec["files"]), [line], rec)


def _triton(engine: EngineFile) -> TritonPlacement:
    """ONNX Runtime's Triton backend: the file as ``model.onnx``, its data files under the names it records."""
    data = tuple((f, os.path.basename(f)) for f in engine.files[1:])
    return TritonPlacement(platform="onnxruntime_onnx", files=data + ((engine.path, "model.onnx"),),
                           accelerator=True)


def _preflight(path: str) -> None:
    checks.input_file(path, "ONNX file")


def profile_onnx(path: str, options: RunnerOptions, batch: int, runs: int = 10, warmup: int = 3) -> Profile:
    """ONNX Runtime's own time per node (``SessionOptions.enable_profiling``) over ``runs`` runs of one
    random ``[batch, 3, H, W]`` batch after ``warmup`` runs; nodes of the matching and size path
    (:func:`dsm_export.engines.int8.quantize.matching_nodes`, by name; a fused node counts where it is
    named after one) are the merge part.

    Raises:
        DSMError: as :class:`OnnxRuntimeRunner`; a static-batch graph and another ``batch``.
    """
    engine = read_onnx_engine(path)
    if engine.static_batch and batch != engine.static_batch:
        raise DSMError(f"{path!r} has a fixed batch of {engine.static_batch}: give --batch {engine.static_batch}")
    merge = set(matching_nodes(load_onnx(path, weights=False)))
    x = np.random.default_rng(0).standard_normal([batch, *engine.info.input_size], dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="dsm-profile-") as tmp:
        session = create_session(path, options.provider, options.threads, optimization="default",
                                 profile_prefix=os.path.join(tmp, "ort"))
        feed = {session.get_inputs()[0].name: x}
        walls = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            session.run(None, feed)
            if i >= warmup:
                walls.append(1000 * (time.perf_counter() - start))
        with open(session.end_profiling(), encoding="utf-8") as fh:
            events = json.load(fh)
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    after = starts[warmup] if len(starts) > warmup else 0
    totals: dict[tuple[str, str], float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["ts"] >= after and e["name"].endswith("_kernel_time"):
            key = (e["name"][:-len("_kernel_time")], e.get("args", {}).get("op_name", "?"))
            totals[key] = totals.get(key, 0.0) + e["dur"] / 1000 / runs
    ops = [OpTime(name, op, ms, op_part(name, op, merge)) for (name, op), ms in totals.items()]
    return Profile(path, "onnxruntime", f"ONNX Runtime {ort.__version__} {session.get_providers()[0]}", batch,
                   options.threads, runs, statistics.median(walls), ops)


BACKEND = register(Backend(
    name="onnxruntime", label="ONNX Runtime", suffixes=(".onnx",), precisions=("fp32", "fp16", "int8"),
    extra=None, build=_build, read=read_onnx_engine, open=OnnxRuntimeRunner, check_build=_check_build,
    options=("quantization", *(f.name for f in fields(QuantizeOptions) if f.name != "calibration_count")),
    triton=_triton, preflight=_preflight, file_hint="an ONNX Runtime engine is an .onnx file",
    providers=True, baseline=lambda path, options, folder: OnnxRuntimeRunner(path, options), profile=profile_onnx))
