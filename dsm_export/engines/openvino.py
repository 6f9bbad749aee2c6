"""OpenVINO engines (IR: ``.xml`` + ``.bin``) from a validated DSM ONNX file.

* ``fp32``: ``openvino.convert_model`` of the ONNX file, run with ``INFERENCE_PRECISION_HINT`` f32.
* ``bf16``: the same IR, run in bf16 (OpenVINO's CPU default where the CPU has AVX-512 BF16 or AMX;
  a CPU without them runs f32, and the build says so).
* ``int8``: NNCF post-training quantization (``nncf.quantize``, ``ModelType.TRANSFORMER``) on
  calibration images, with the matching and size path (key mean, normalisation, similarity MatMul,
  ArgMax/TopK, one-hot assignment, sizes, ``log(size)``; the same node list the ONNX Runtime INT8 and
  fp16 paths keep in fp32, :func:`dsm_export.engines.int8.quantize.matching_nodes`) and the attention MatMuls
  (``q @ k^T``, ``attn @ v``) in NNCF's ignored scope. SmoothQuant's migration strength is chosen by
  measurement (:func:`_choose_smooth_alpha`: KL to fp32 on calibration images the trial did not
  calibrate on), not by default: on DeiT-Tiny's r=24,r_end=8,delay=3,protect=16,merge=mlerp graph
  with 64 calibration images, ``build --precision int8`` printed KL 0.0189 for none, 0.0273 for 0.5
  and 0.0899 for NNCF's ModelType.TRANSFORMER default 0.95. Ops left unquantized run at the CPU's
  default precision (bf16 where it has it).

OpenVINO's inference precision is a compile-time property, not part of the IR (``rt_info``
``runtime_options`` does not carry it, checked on 2026.4), so the IR records it under
``rt_info["dsm_export"]["inference_precision"]`` with the rest of the export's metadata, and
:class:`OpenVINORunner` compiles with it. The CPU plugin has no per-node fp32 pin that survives in IR
(``disable_fp16_compression`` rt_info had no effect under bf16): in bf16 and int8 engines the
matching ops run in bf16 too; the bf16 criterion of :mod:`dsm_export.check.validate` covers it.

Sources: OpenVINO docs, "Precision Control" and ``ov::hint::inference_precision``; NNCF docs,
"Post-training Quantization" (``IgnoredScope``, ``AdvancedSmoothQuantParameters``).
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from .. import checks
from ..errors import DSMError
from ..graph.export import load_onnx, read_metadata
from ..graph.facts import is_quantized, precision_of
from ..graph.facts import weight_inputs as _weight_inputs
from ..graph.metadata import dsm_props, prefixed, proto_with_props
from ..metrics import kl_divergence
from .int8.quantize import calibration_pixels, images_sha256, matching_nodes
from .registry import (
    Backend, BuildRecord, BuildRequest, EngineFile, OpTime, Profile, RunnerOptions, TritonPlacement, import_optional,
    op_part, pad_batches, register,
)

OPENVINO_INSTALL_HINT = "OpenVINO is not installed: pip install 'dsm-export[openvino]' (openvino, nncf)"
PRECISIONS = ("fp32", "bf16", "int8")
RT_KEY = "dsm_export"  # rt_info section that holds the metadata
# SmoothQuant migration strengths tried on the calibration images when none is given; 0 is "off"
# (alpha 0 migrates nothing: NNCF's -1). 0.95 is NNCF's ModelType.TRANSFORMER default for MatMuls.
SMOOTH_CANDIDATES = (0.0, 0.5, 0.95)


def import_openvino():
    """``openvino``, imported on first use.

    Raises:
        DSMError: OpenVINO is not installed (one line naming the ``openvino`` extra).
    """
    return import_optional("openvino", "openvino", "OpenVINO")


def import_nncf():
    """``nncf``, imported on first use (OpenVINO INT8).

    Raises:
        DSMError: NNCF is not installed (one line naming the ``openvino`` extra).
    """
    return import_optional("nncf", "openvino", "NNCF")


def cpu_has_bf16(core) -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 here (AVX-512 BF16 or AMX: ``BF16`` among
    ``OPTIMIZATION_CAPABILITIES``)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def inference_hint(precision: str, core) -> str:
    """The ``INFERENCE_PRECISION_HINT`` an engine of ``precision`` compiles with: ``f32`` for fp32;
    ``bf16`` for bf16 and for int8's unquantized ops where the CPU has it, else ``f32``."""
    if precision == "fp32" or not cpu_has_bf16(core):
        return "f32"
    return "bf16"


@dataclass
class OpenVINOOptions:
    """What :func:`build_openvino` builds.

    Attributes:
        precision: ``fp32``, ``bf16`` or ``int8``.
        smooth_alpha: int8: SmoothQuant migration strength in [0, 1] (0: none), or None to choose among
            :data:`SMOOTH_CANDIDATES` by KL on the calibration images.
        quantize_attention: int8: also quantize ``q @ k^T`` and ``attn @ v`` (default: kept out).
        calibration_batch: images per NNCF calibration batch (a graph with a static batch uses its own).
        candidates: int8 with no ``smooth_alpha``: the strengths tried (:data:`SMOOTH_CANDIDATES`).
    """

    precision: str = "fp32"
    smooth_alpha: float | None = None
    quantize_attention: bool = False
    calibration_batch: int = 16
    candidates: tuple[float, ...] = field(default=SMOOTH_CANDIDATES)

    def check(self) -> None:
        """Raises DSMError on an unknown precision or an alpha outside [0, 1]."""
        if self.precision not in PRECISIONS:
            raise DSMError(f"OpenVINO precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise DSMError(f"--smooth-alpha must be in [0, 1], got {self.smooth_alpha}")


def check_openvino_input(onnx_path: str) -> onnx.ModelProto:
    """Refuse, before OpenVINO is imported, a file OpenVINO engines are not built from: one that is
    not a dsm-export file, already quantized, fp16, or optimized by ONNX Runtime (contrib ops).

    Returns:
        The loaded ONNX model.

    Raises:
        DSMError: one line naming the file to give instead.
    """
    model = load_onnx(onnx_path, weights=False)
    read_metadata(model, onnx_path)
    precision = precision_of(model)["precision"]
    if is_quantized(model) or precision != "fp32":
        raise DSMError(f"{onnx_path!r} is already {precision if precision != 'fp32' else 'quantized'}: "
                       "--backend openvino takes the fp32 file written by 'dsm-export export'")
    contrib = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if contrib:
        raise DSMError(f"{onnx_path!r} holds ONNX Runtime-only ops ({', '.join(contrib)}): --backend openvino "
                       "takes the fp32 file written by 'dsm-export export'")
    return model


def ignored_nodes(model: onnx.ModelProto, quantize_attention: bool = False) -> tuple[list[str], dict]:
    """ONNX node names kept out of INT8: the matching and size path and, unless ``quantize_attention``,
    the activation-by-activation MatMuls.

    Returns:
        ``(names, {"matching": n, "attention": m})``.
    """
    matching = set(matching_nodes(model))
    weights = _weight_inputs(model)
    attention = [] if quantize_attention else [
        n.name for n in model.graph.node
        if n.op_type == "MatMul" and n.name not in matching and not set(n.input) & weights]
    return sorted(matching) + attention, {"matching": len(matching), "attention": len(attention)}


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    return float(kl_divergence(p_logits, q_logits).mean())


def _quantize(ov, nncf, onnx_path, dataset, count, names, alpha):
    """NNCF post-training quantization of the ONNX file's OpenVINO model; ``count`` is in batches."""
    params = import_optional("nncf.quantization.advanced_parameters", "openvino", "NNCF")
    AdvancedQuantizationParameters = params.AdvancedQuantizationParameters
    AdvancedSmoothQuantParameters = params.AdvancedSmoothQuantParameters
    nncf.set_log_level(logging.WARNING)  # not one INFO line per node left unquantized
    model = ov.convert_model(onnx_path)
    present = {op.get_friendly_name() for op in model.get_ordered_ops()}
    scope = nncf.IgnoredScope(names=[n for n in names if n in present], validate=False)
    smooth = AdvancedSmoothQuantParameters(matmul=-1 if alpha == 0 else alpha, convolution=-1)
    return nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=count,
                         ignored_scope=scope,
                         advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alphas=smooth))


def _batches(pixels: np.ndarray, batch: int) -> list[np.ndarray]:
    out = []
    for start in range(0, len(pixels), batch):
        chunk = pixels[start:start + batch]
        if len(chunk) < batch:  # a static-batch graph: pad with the last image
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        out.append(np.ascontiguousarray(chunk, dtype=np.float32))
    return out


def _run(compiled, batches: list[np.ndarray], n: int) -> np.ndarray:
    return np.concatenate([compiled(b)[0] for b in batches])[:n]


def _choose_smooth_alpha(ov, nncf, core, onnx_path, pixels, batch, names, hint, candidates, log):
    """SmoothQuant strength by measurement: quantize on the first 3/4 of the calibration images with
    each candidate, score each by KL to fp32 on the last 1/4, which that calibration did not see (a
    trial scored on its own calibration images rates itself too well)."""
    if len(pixels) < 8:
        raise DSMError(f"choosing SmoothQuant needs at least 8 calibration images, got {len(pixels)} "
                       "(or give --smooth-alpha)")
    cut = len(pixels) * 3 // 4
    fit, held = _batches(pixels[:cut], batch), _batches(pixels[cut:], batch)
    n = len(pixels) - cut
    reference = _run(core.compile_model(ov.convert_model(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}),
                     held, n)
    trials = []
    for alpha in candidates:
        model = _quantize(ov, nncf, onnx_path, nncf.Dataset(fit), len(fit), names, alpha)
        got = _run(core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint}), held, n)
        trials.append((alpha, _kl(reference, got)))
        log(f"  SmoothQuant alpha {alpha:g}{' (none)' if alpha == 0 else ''}: KL {trials[-1][1]:.4f} to fp32 on "
            f"{n} calibration images, calibrated on the other {cut}")
    return min(trials, key=lambda t: t[1])[0], trials


def build_openvino(onnx_path: str, output: str, options: OpenVINOOptions, pixels: np.ndarray | None = None,
                   files: list[str] | None = None, log=print) -> dict:
    """Write an OpenVINO IR (``output`` .xml and its .bin) from a dsm-export fp32 ONNX file.

    Args:
        onnx_path: fp32 ONNX file written by ``dsm-export export``.
        output: the ``.xml`` path; the weights go next to it as ``.bin``. Both are written to
            temporary names first, then renamed.
        options: :class:`OpenVINOOptions`.
        pixels: int8: calibration images, ``[N, 3, H, W]`` float32 through the model's timm eval
            transform (:func:`dsm_export.engines.int8.quantize.calibration_pixels`).
        files: the calibration image paths (their sha256 goes into the metadata).
        log: where progress lines of the SmoothQuant choice go.

    Returns:
        ``{"backend", "precision", "inference_precision", "cpu_bf16", "output", "bin", "openvino_version"}``;
        int8 adds ``nncf_version``, ``calibration_count``, ``calibration_sha256``, ``fp32_matching_nodes``,
        ``fp32_attention_matmuls``, ``fake_quantize``, ``smooth_alpha`` and ``smooth_trials``
        (``[(alpha, KL)]`` of :func:`_choose_smooth_alpha`, empty when ``smooth_alpha`` was given).

    Raises:
        DSMError: OpenVINO or NNCF missing, a bad input file, no calibration images for int8, an
            output not ending in ``.xml`` or in a missing folder.
    """
    options.check()
    if not output.endswith(".xml"):
        raise DSMError(f"--output {output!r}: an OpenVINO IR is an .xml file (its weights go in the .bin beside it)")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise DSMError(f"output folder {folder!r} does not exist")
    proto = check_openvino_input(onnx_path)
    info = read_metadata(proto, onnx_path)
    if options.precision == "int8" and (pixels is None or len(pixels) == 0):
        raise DSMError("--backend openvino --precision int8 needs calibration images: --calibration DIR")
    ov = import_openvino()
    core = ov.Core()
    hint = inference_hint(options.precision, core)
    rec: dict = {"backend": "openvino", "precision": options.precision, "inference_precision": hint,
                 "cpu_bf16": cpu_has_bf16(core), "output": output, "bin": output[:-4] + ".bin",
                 "openvino_version": ov.__version__}
    if options.precision == "int8":
        nncf = import_nncf()
        batch = info.batch or options.calibration_batch
        names, counts = ignored_nodes(proto, options.quantize_attention)
        trials = []
        alpha = options.smooth_alpha
        if alpha is None:
            alpha, trials = _choose_smooth_alpha(ov, nncf, core, onnx_path, pixels, batch, names, hint,
                                                 options.candidates, log)
        batches = _batches(pixels, batch)
        model = _quantize(ov, nncf, onnx_path, nncf.Dataset(batches), len(batches), names, alpha)
        rec.update({"nncf_version": nncf.__version__, "calibration_count": len(pixels),
                    "calibration_sha256": images_sha256(files) if files else "",
                    "fp32_matching_nodes": counts["matching"], "fp32_attention_matmuls": counts["attention"],
                    "fake_quantize": sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops()),
                    "smooth_alpha": alpha, "smooth_trials": trials})
    else:
        model = ov.convert_model(onnx_path)
    for key, value in dsm_props(proto).items():
        model.set_rt_info(value, [RT_KEY, key])
    model.set_rt_info(info.output, [RT_KEY, "output"])
    for key in ("precision", "inference_precision", "openvino_version", "nncf_version", "calibration_count",
                "calibration_sha256", "smooth_alpha", "fp32_matching_nodes", "fp32_attention_matmuls"):
        if key in rec:
            model.set_rt_info(str(rec[key]), [RT_KEY, key])
    model.set_rt_info("openvino", [RT_KEY, "engine"])
    # the matching and size path by ONNX node name (= the IR's friendly names): `profile` splits by it
    model.set_rt_info(",".join(matching_nodes(proto)), [RT_KEY, "matching_nodes"])
    tmp = os.path.join(folder, f".{os.path.basename(output)[:-4]}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        ov.save_model(model, tmp + ".xml", compress_to_fp16=False)
        os.replace(tmp + ".bin", rec["bin"])
        os.replace(tmp + ".xml", output)
    finally:
        for leftover in (tmp + ".xml", tmp + ".bin"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return rec


def read_ir_metadata(xml_path: str, core=None):
    """``(ExportInfo, meta)``: the dsm-export metadata an OpenVINO IR carries in ``rt_info``.

    Raises:
        DSMError: OpenVINO missing, an unreadable IR, or one not written by ``dsm-export build``.
    """
    _, info, meta = read_ir(xml_path, core)
    return info, meta


def read_ir(xml_path: str, core=None):
    """``(ov.Model, ExportInfo, meta)``: the IR, read once, and its dsm-export metadata.

    Raises:
        DSMError: as :func:`read_ir_metadata`.
    """
    ov = import_openvino()
    core = core or ov.Core()
    try:
        model = core.read_model(xml_path)
    except RuntimeError as exc:
        raise DSMError(f"{xml_path!r} is not a readable OpenVINO IR: {str(exc).splitlines()[0]}") from exc
    if not model.has_rt_info([RT_KEY]):
        raise DSMError(f"{xml_path!r} has no dsm-export metadata (was it built by 'dsm-export build --backend openvino'?)")
    meta = {k: str(v) for k, v in model.get_rt_info([RT_KEY]).value.items()}
    proto = proto_with_props(prefixed(meta), meta.get("output", "logits"))
    return model, read_metadata(proto, xml_path), meta


def stream_count(streams: int | None, threads: int | None, batch: int) -> int:
    """How many OpenVINO streams a call of ``batch`` images is split over.

    A stream is an infer request that runs on its own share of the ``INFERENCE_NUM_THREADS``
    threads (``NUM_STREAMS``; OpenVINO's THROUGHPUT hint uses streams alike). Each stream runs its
    part of the batch on fewer threads, so the small ops of a merged graph stop paying a
    synchronisation across every thread each: a batch of 32 split over 2 single-thread streams ran
    a merged bf16 DeiT-Tiny (``r=16,r_end=8,delay=3,protect=16,merge=mlerp``) 1.16x faster and its
    unmerged IR 1.12x faster than one 2-thread request (Intel Xeon with AMX, 2 threads, static
    batches; two streams won at every batch from 2 to 32).

    Args:
        streams: the streams asked for (at most ``batch`` are used); None: one per thread.
        threads: ``INFERENCE_NUM_THREADS``; None: the CPUs this process may run on.
        batch: images in the call.

    Returns:
        ``1 <= n <= max(batch, 1)``.
    """
    wanted = streams if streams is not None else (threads or len(os.sched_getaffinity(0)))
    return max(1, min(int(wanted), batch))


class StaticBatchCompiler:
    """An OpenVINO model compiled once per batch size (and stream count), its batch made static first.

    A dynamic-batch IR compiled as it is leaves OpenVINO's CPU plugin to allocate memory as shapes
    arrive, and a merged graph (hundreds of small ops between the blocks) paid for it: with
    ``PERF_COUNT``, the first fully connected layer after each merge ran 40-60 % slower than in
    a graph of the same token counts without the merges, and the bf16 DeiT-Tiny
    ``r=16,r_end=4,delay=3`` IR ran 0.90x its unmerged IR dynamic but 1.04x reshaped to batch 32
    (``dsm-export profile``, Intel Xeon with AMX, 2 threads). The first ``keep`` batch sizes are each
    compiled on first use (seconds); any other batch runs on the model as written (dynamic), compiled
    once, so a server whose batches vary never recompiles. A static-batch IR is compiled once.

    Args:
        core: an ``openvino.Core``.
        model: an ``openvino.Model`` with one input ``[B, ...]``.
        config: the ``compile_model`` properties.
        keep: batch sizes compiled static (each holds its own copy of the weights).
    """

    def __init__(self, core, model, config: dict, keep: int = 2):
        self.core, self.model, self.config, self.keep = core, model, dict(config), keep
        self.static = model.inputs[0].get_partial_shape().is_static
        # (batch or None, streams) -> (compiled model, one infer request per stream)
        self._compiled: dict[tuple[int | None, int], tuple] = {}

    def compiled(self, batch: int | None, streams: int = 1):
        """The compiled model for ``batch`` images (any batch for a static IR)."""
        return self._entry(batch, streams)[0]

    def request(self, batch: int | None):
        """The infer request of :meth:`compiled` ``(batch)`` (one per batch size, reused)."""
        return self._entry(batch, 1)[1][0]

    def requests(self, batch: int | None, streams: int) -> list:
        """``streams`` infer requests of one model compiled for ``batch`` images with ``NUM_STREAMS``
        ``streams``, which run in parallel (reused)."""
        return self._entry(batch, streams)[1]

    def _entry(self, batch: int | None, streams: int):
        size = None if self.static else batch
        sizes = {b for b, _ in self._compiled if b is not None}
        if size is not None and size not in sizes and len(sizes) >= self.keep:
            size = None  # more batch sizes than kept (a server's batcher): the model as written, no recompiles
        key = (size, streams)
        if key not in self._compiled:
            model = self.model
            if size is not None:
                model = self.model.clone()
                rest = list(model.inputs[0].get_partial_shape())[1:]
                model.reshape([size, *[d.get_length() for d in rest]])
            config = {**self.config, "NUM_STREAMS": streams} if streams > 1 else self.config
            compiled = self.core.compile_model(model, "CPU", config)
            self._compiled[key] = (compiled, [compiled.create_infer_request() for _ in range(streams)])
        return self._compiled[key]

    def run(self, x: np.ndarray, static_batch: int | None, streams: int | None, threads: int | None) -> np.ndarray:
        """``[N, ...]`` outputs of ``x``: in chunks of ``static_batch`` (padded, one request each),
        else split over :func:`stream_count` streams, near-equal parts run in parallel."""
        def run_chunk(chunk: np.ndarray) -> np.ndarray:
            n = len(chunk)
            count = 1 if static_batch else stream_count(streams, threads, n)
            if count == 1:
                return self.request(n).infer({0: chunk})[0].copy()
            sizes = [n // count + (i < n % count) for i in range(count)]
            starts = np.cumsum([0, *sizes])
            running = []
            for i, (start, size) in enumerate(zip(starts, sizes)):
                request = self.requests(size, count)[i]
                request.start_async({0: chunk[start:start + size]})
                running.append(request)
            for request in running:
                request.wait()
            return np.concatenate([r.get_output_tensor(0).data for r in running])

        return pad_batches(x, static_batch, run_chunk)

    def close(self) -> None:
        self._compiled.clear()


class OpenVINORunner:
    """Run an OpenVINO IR built by :func:`build_openvino` on the CPU, as a
    :class:`~dsm_export.engines.registry.Runner`.

    Args:
        xml_path: the IR.
        threads: ``INFERENCE_NUM_THREADS`` (default: OpenVINO's, all cores).
        precision: ``INFERENCE_PRECISION_HINT`` (``f32``/``bf16``); default: the one the IR records,
            else OpenVINO's default.
        streams: the streams a call's batch is split over (:func:`stream_count`; None: one per
            thread, at most one per image; 1: one request, OpenVINO's latency default).

    Calling it maps ``[B, 3, H, W]`` float32 to ``[B, classes]`` logits (or ``[B, dim]`` embeddings);
    a graph with a static batch takes any B (padded chunks, one stream). Calls from several threads
    (a server's) take turns on the infer requests. ``judged_as``: int8 for an int8 IR, else what
    OpenVINO runs (bf16, or fp32 where a bf16 IR runs f32 on a CPU without BF16).

    Raises:
        DSMError: as :func:`read_ir_metadata`.
    """

    def __init__(self, xml_path: str, threads: int | None = None, precision: str | None = None,
                 streams: int | None = None):
        ov = import_openvino()
        self.core = ov.Core()
        model, self.info, self.meta = read_ir(xml_path, self.core)
        self.engine_file = _engine_file(xml_path, model, self.info, self.meta)
        config = {}
        hint = precision or self.meta.get("inference_precision")
        if hint:
            config["INFERENCE_PRECISION_HINT"] = hint
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.threads, self.streams = threads, streams
        self.compiler = StaticBatchCompiler(self.core, model, config)
        self.inference_precision = _runs_at(self.core, hint)
        built = self.meta.get("precision", "fp32")
        self.judged_as = "int8" if built == "int8" else "bf16" if self.inference_precision == "bf16" else "fp32"
        self.label = f"OpenVINO {ov.__version__.split('-')[0]} CPU, running {self.inference_precision}"
        self.static_batch = self.engine_file.static_batch
        self._lock = threading.Lock()
        self.input_name = self.engine_file.input_name
        self.output_name = self.engine_file.output_name
        self.output_dims = self.engine_file.output_dims

    def request(self, batch: int):
        """The one-stream infer request that runs ``batch`` images (compiled for that batch on first use)."""
        with self._lock:
            return self.compiler.request(batch)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            return self.compiler.run(x, self.static_batch, self.streams, self.threads)

    def close(self) -> None:
        """Free the compiled models."""
        with self._lock:
            self.compiler.close()


class DefaultCompileRunner:
    """OpenVINO's default CPU compile of an unmerged fp32 ONNX export (``convert_model``, no precision
    hint: bf16 on a CPU with AVX-512 BF16 or AMX, else f32): the runtime's fastest unmerged engine that
    needs no calibration, the baseline ``bench`` times OpenVINO engines against. Compiled per batch
    size and split over streams as :class:`OpenVINORunner` is (:class:`StaticBatchCompiler`).

    Raises:
        DSMError: OpenVINO missing, a file that is not a dsm-export ONNX file.
    """

    def __init__(self, onnx_path: str, threads: int | None = None, streams: int | None = None):
        ov = import_openvino()
        core = ov.Core()
        model = ov.convert_model(onnx_path)
        proto = load_onnx(onnx_path, weights=False)
        info = read_metadata(proto, onnx_path)
        self.threads, self.streams = threads, streams
        self.compiler = StaticBatchCompiler(core, model, {"INFERENCE_NUM_THREADS": int(threads)} if threads else {})
        self.inference_precision = _runs_at(core, None)
        self.engine_file = replace(_engine_file(onnx_path, model, info, {"precision": "fp32"}), files=(onnx_path,))
        self.judged_as = "bf16" if self.inference_precision == "bf16" else "fp32"
        self.label = (f"OpenVINO's default compile (OpenVINO {ov.__version__.split('-')[0]} CPU, running "
                      f"{self.inference_precision})")

    def request(self, batch: int):
        """The one-stream infer request that runs ``batch`` images."""
        return self.compiler.request(batch)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.compiler.run(x, self.engine_file.static_batch, self.streams, self.threads)

    def close(self) -> None:
        self.compiler.close()


def _runs_at(core, hint: str | None) -> str:
    """What the CPU plugin runs at (``f32``/``bf16``) under ``INFERENCE_PRECISION_HINT`` ``hint``
    (None: its default), known without compiling: bf16 needs a CPU with it."""
    text = hint or core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    return "bf16" if text == "bf16" and cpu_has_bf16(core) else "f32" if text in ("bf16", "f32") else text


def _engine_file(xml_path: str, model, info, meta: dict) -> EngineFile:
    """The :class:`EngineFile` of an IR already read."""
    inp, out = model.inputs[0], model.outputs[0]
    batch = inp.get_partial_shape()[0]
    return EngineFile(
        path=xml_path, backend="openvino", info=info, precision=meta.get("precision", "fp32"),
        input_name=inp.get_any_name(), output_name=out.get_any_name(),
        output_dims=tuple(d.get_length() for d in list(out.get_partial_shape())[1:]),
        static_batch=batch.get_length() if batch.is_static else None,
        files=(xml_path, xml_path[:-4] + ".bin"), source_path=xml_path, meta=meta)


def read_openvino_engine(xml_path: str) -> EngineFile:
    """What an IR built by ``dsm-export build --backend openvino`` says about itself.

    Raises:
        DSMError: OpenVINO missing, the ``.bin`` missing, an unreadable or foreign IR.
    """
    checks.input_file(xml_path[:-4] + ".bin", "OpenVINO weights (.bin)")
    model, info, meta = read_ir(xml_path)
    return _engine_file(xml_path, model, info, meta)


def _open(path: str, options: RunnerOptions) -> OpenVINORunner:
    if options.provider not in (None, "cpu"):
        raise DSMError("--provider is for ONNX files: an OpenVINO IR runs in OpenVINO on the CPU")
    return OpenVINORunner(path, options.threads, streams=options.streams)


def _check_build(request: BuildRequest) -> None:
    """Refuse an OpenVINO build request before OpenVINO runs (one line)."""
    checks.output_file(request.output[:-4] + ".bin", "--output weights (.bin)")
    OpenVINOOptions(precision=request.precision, **request.options).check()
    if request.precision != "int8":
        if request.calibration or request.options.get("smooth_alpha") is not None:
            raise DSMError("--calibration and --smooth-alpha apply to --precision int8 only")
        return
    if not request.calibration:
        raise DSMError("--backend openvino --precision int8 needs calibration images: --calibration DIR")
    if not os.path.isdir(request.calibration):
        raise DSMError(f"calibration folder {request.calibration!r} does not exist")


def _build(request: BuildRequest, log=print) -> BuildRecord:
    """``build --backend openvino``: :func:`build_openvino`, calibration images read for int8."""
    opts = OpenVINOOptions(precision=request.precision, **request.options)
    opts.check()
    model = check_openvino_input(request.source)
    pixels = files = None
    if request.precision == "int8":
        pixels, files = calibration_pixels(read_metadata(model, request.source).model, request.calibration,
                                           request.calibration_count)
    rec = build_openvino(request.source, request.output, opts, pixels, files, log)
    return BuildRecord("openvino", request.precision, request.output, [request.output, rec["bin"]],
                       _summary(rec), rec)


def _summary(rec: dict) -> list[str]:
    """The lines ``dsm-export build`` prints for an OpenVINO record."""
    precision = rec["precision"]
    line = (f"wrote {rec['output']} and {rec['bin']}: OpenVINO {rec['openvino_version'].split('-')[0]} IR, "
            f"{precision}")
    if precision == "int8":
        chosen = "none" if rec["smooth_alpha"] == 0 else f"alpha {rec['smooth_alpha']:g}"
        how = "given" if not rec["smooth_trials"] else "lowest KL on held-apart calibration images"
        line += (f" (NNCF {rec['nncf_version']}, {rec['calibration_count']} calibration images, "
                 f"{rec['fake_quantize']} FakeQuantize; SmoothQuant {chosen}, {how}); "
                 f"{rec['fp32_matching_nodes']} matching and size nodes and {rec['fp32_attention_matmuls']} "
                 "attention MatMuls kept out of quantization (which tokens merge is not decided in INT8)")
    note = "" if rec["cpu_bf16"] or precision == "fp32" else " (this CPU has no AVX-512 BF16 or AMX: f32)"
    return [line, f"  runs in {rec['inference_precision']} on this CPU{note}; other ops run at OpenVINO's "
                  "inference precision"]


def _triton(engine: EngineFile) -> TritonPlacement:
    """Triton's OpenVINO backend: ``model.xml`` and ``model.bin``; bf16 asked for where the IR runs it."""
    params, notes = {}, ()
    if engine.meta.get("inference_precision") == "bf16":
        params["HINT_BF16"] = "YES"
    elif engine.precision == "fp32":
        notes = ("{name}: Triton's OpenVINO backend cannot ask for f32 (only HINT_BF16); on a CPU with bf16 "
                 "this fp32 engine runs in bf16 there, as OpenVINO's default compile does",)
    return TritonPlacement(backend="openvino", instance_kind="cpu", only_kind=True, parameters=params,
                           notes=notes, files=((engine.files[1], "model.bin"), (engine.path, "model.xml")))


def profile_openvino(path: str, options: RunnerOptions, batch: int, runs: int = 10, warmup: int = 3) -> Profile:
    """OpenVINO's own time per executed node (``PERF_COUNT``, ``InferRequest.get_profiling_info``) over
    ``runs`` runs of one random batch after ``warmup`` runs, compiled as :class:`OpenVINORunner` compiles
    it, in one stream (one infer request on every thread, so the op times add up to the wall time;
    the runner splits a batch over streams, :func:`stream_count`). An executed node is in the merge
    part where one of the layers it runs (``originalLayersNames`` of the runtime model) is a node of
    the matching path the IR records.

    Raises:
        DSMError: OpenVINO missing, a foreign IR, a static-batch IR and another ``batch``.
    """
    if options.provider not in (None, "cpu"):
        raise DSMError("--provider is for ONNX files: an OpenVINO IR runs in OpenVINO on the CPU")
    ov = import_openvino()
    core = ov.Core()
    model, info, meta = read_ir(path, core)
    engine = _engine_file(path, model, info, meta)
    if engine.static_batch and batch != engine.static_batch:
        raise DSMError(f"{path!r} has a fixed batch of {engine.static_batch}: give --batch {engine.static_batch}")
    merge = set(filter(None, meta.get("matching_nodes", "").split(",")))
    config = {"PERF_COUNT": True, **({"INFERENCE_PRECISION_HINT": meta["inference_precision"]}
                                     if meta.get("inference_precision") else {})}
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = int(options.threads)
    compiler = StaticBatchCompiler(core, model, config, keep=1)
    compiled = compiler.compiled(batch)
    originals = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        names = str(rt["originalLayersNames"].astype(str)) if "originalLayersNames" in rt else ""
        originals[op.get_friendly_name()] = set(names.split(","))
    request = compiler.request(batch)
    x = np.random.default_rng(0).standard_normal([batch, *info.input_size], dtype=np.float32)
    totals: dict[tuple[str, str], float] = {}
    walls = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        request.infer({0: x})
        if i < warmup:
            continue
        walls.append(1000 * (time.perf_counter() - start))
        for p in request.get_profiling_info():
            key = (p.node_name, p.node_type)
            totals[key] = totals.get(key, 0.0) + p.real_time.total_seconds() * 1000 / runs
    ops = [OpTime(name, kind, ms, "merge" if originals.get(name, set()) & merge else op_part(name, kind, merge))
           for (name, kind), ms in totals.items() if ms > 0]
    label = f"OpenVINO {ov.__version__.split('-')[0]} CPU, running {compiled.get_property('INFERENCE_PRECISION_HINT').to_string()}"
    return Profile(path, "openvino", label, batch, options.threads, runs, statistics.median(walls), ops)


def _preflight(path: str) -> None:
    checks.input_file(path, "OpenVINO IR")
    checks.input_file(path[:-4] + ".bin", "OpenVINO weights (.bin)")


BACKEND = register(Backend(
    name="openvino", label="OpenVINO", suffixes=(".xml",), precisions=PRECISIONS, extra="openvino",
    build=_build, read=read_openvino_engine, open=_open, check_build=_check_build,
    options=("smooth_alpha", "quantize_attention", "calibration_batch", "candidates"),
    triton=_triton, preflight=_preflight,
    file_hint="an OpenVINO IR is an .xml file (its weights go in the .bin beside it)",
    foreign_note="OpenVINO INT8 is NNCF's static quantization",
    baseline=lambda path, options, folder: DefaultCompileRunner(path, options.threads, options.streams),
    profile=profile_openvino, streams=stream_count, timed_against_runtime=True))
