"""Build TensorRT engines (``.plan`` + JSON sidecar) from dsm-export ONNX files, with full TensorRT or
TensorRT-RTX (:mod:`.flavours`).

Following Polygraphy's builder configuration: ONNX parser, builder config with a workspace
memory-pool limit, an optimization profile for a dynamic batch axis, precision as
:func:`.flavours.build_settings` says. fp16 engines are built from the fp16 ONNX graph (fp32 islands
for matching and sizes, see :mod:`..onnxruntime`) as a strongly typed network; INT8 engines from the
static QDQ file of ``build --precision int8`` (explicit quantization, TensorRT's "Working with
Quantized Types"). TensorRT-RTX builds for the compute capabilities asked (or its default ones) with
no GPU; full TensorRT builds for its GPU and may keep a timing cache.

What TensorRT cannot take is refused before TensorRT is touched (:func:`check_tensorrt_input`): an
ONNX Runtime-optimized file (``com.microsoft`` contrib ops such as ``FusedMatMul``), a dynamic or
U8S8 INT8 file, a quantized file for a float engine.

A successful parse is not a successful build (an op can parse and then have no kernel), so nothing
short of ``build_serialized_network`` returning an engine counts; every error and warning TensorRT
logs during the build is kept in the sidecar.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import onnx

from ...errors import DSMError
from ...graph.export import load_onnx, read_metadata
from ...graph.facts import is_quantized, precision_of, quantization_record
from ...graph.metadata import read_props
from ...graph.onnx_file import has_external_data, session_source
from ...fileio import atomic_path, write_json
from ..fp16 import convert_fp16
from .common import build_log, gpu_info
from .flavours import (
    COMPUTE_CAPABILITIES,
    TensorRT,
    build_settings,
    import_tensorrt,
    read_rtx_header,
    version_tuple,
    where_it_runs,
)

# Ops ONNX Runtime's dynamic quantization writes: no TensorRT layer takes them.
DYNAMIC_INT8_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
                              "DynamicQuantizeMatMul"})
MAX_LOG_LINES = 20


@dataclass
class TensorRTOptions:
    """Options of :func:`build_tensorrt`.

    Attributes:
        precision: ``fp32``, ``fp16`` or ``int8`` (the input must then be a static, symmetric QDQ
            file written by ``build --backend onnxruntime --precision int8``).
        flavour: ``auto`` (full TensorRT if installed, else TensorRT-RTX), ``enterprise`` or ``rtx``.
        compute_capabilities: TensorRT-RTX targets such as ``("8.6", "8.9", "12.0")``; empty: the
            release's defaults. Refused for full TensorRT (it builds for the GPU it runs on).
        workspace_mib: workspace memory-pool limit (MiB).
        timing_cache: full TensorRT only: timing-cache file, read if present and written back.
        min_batch, opt_batch, max_batch: optimization profile when the batch axis is dynamic.
        tf32: allow TF32 for fp32 math (TensorRT's default; off here, as in Polygraphy).
    """

    precision: str = "fp32"
    flavour: str = "auto"
    compute_capabilities: tuple[str, ...] = ()
    workspace_mib: int = 1024
    timing_cache: str | None = None
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 64
    tf32: bool = False


# ------------------------------------------------------------------------------------- input checks
def contrib_ops(model: onnx.ModelProto) -> list[str]:
    """``domain::op`` of every node outside the default ONNX domain (sorted, once each)."""
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})


def check_tensorrt_input(model: onnx.ModelProto, path: str, precision: str) -> None:
    """Check that the file is one TensorRT can build at ``precision`` (no TensorRT needed).

    * No op outside the default ONNX domain: ``build --backend onnxruntime`` writes ONNX Runtime
      contrib ops (``FusedMatMul``, ``SkipLayerNormalization``, ...) that TensorRT's parser rejects.
    * fp32/fp16: an unquantized fp32 file (fp16 engines are made from the fp32 export).
    * int8: the static QDQ file of ``build --precision int8`` with symmetric INT8 activations
      (TensorRT's explicit quantization is symmetric, zero point 0); no dynamic-quantization ops.

    Raises:
        DSMError: one line naming what the file is and the ``build`` command that makes a
            TensorRT-ready file.
    """
    export_hint = f"'dsm-export build EXPORT.onnx --backend tensorrt --precision {precision}' with the file of 'dsm-export export'"
    int8_hint = ("'dsm-export build EXPORT.onnx --backend onnxruntime --precision int8 --calibration DIR' "
                 "(static QDQ, int8 activations), then --backend tensorrt --precision int8 on its output")
    foreign = contrib_ops(model)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DSMError(f"{path!r} holds ONNX Runtime-only ops ({shown}): it was optimized for ONNX Runtime "
                       f"and TensorRT cannot parse it; use {int8_hint if precision == 'int8' else export_hint}")
    dynamic = sorted({n.op_type for n in model.graph.node if n.op_type in DYNAMIC_INT8_OPS})
    record = quantization_record(model)
    if precision != "int8":
        if record or is_quantized(model):
            raise DSMError(f"{path!r} is quantized: build it with --precision int8")
        stored = precision_of(model)["precision"]
        if stored != "fp32":
            raise DSMError(f"{path!r} is already {stored}: TensorRT engines are built from the fp32 file of "
                           f"'dsm-export export' ({export_hint})")
        return
    if dynamic:
        raise DSMError(f"{path!r} is dynamic INT8 ({', '.join(dynamic)}), which only ONNX Runtime runs: "
                       f"TensorRT needs static QDQ with symmetric int8 activations; make it with {int8_hint}")
    if record is None:
        raise DSMError(f"{path!r} is not quantized: TensorRT INT8 takes the QDQ file of {int8_hint}")
    if record.get("mode") != "static" or not str(record.get("activations", "")).startswith("int8"):
        raise DSMError(f"{path!r} is {record.get('mode')} INT8 with {record.get('activations')} activations: "
                       "TensorRT needs static QDQ with symmetric int8 activations (--quantization static "
                       "--activations int8)")


def check_tensorrt_int8_input(model: onnx.ModelProto, path: str, precision: str) -> None:
    """The quantization part of :func:`check_tensorrt_input` (kept under its earlier name)."""
    check_tensorrt_input(model, path, precision)


def check_flavour_options(trt: TensorRT, options: TensorRTOptions) -> None:
    """Refuse options the chosen flavour does not have, before any work.

    Raises:
        DSMError: ``compute_capabilities`` for full TensorRT, a ``timing_cache`` for TensorRT-RTX
            (no effect there, and it forces a GPU query that breaks a CPU-only build), or a target
            this TensorRT-RTX release has no member for.
    """
    if trt.flavour == "enterprise" and options.compute_capabilities:
        raise DSMError(f"--compute-capability is for TensorRT-RTX builds; {trt.name} builds for the GPU it "
                       "runs on (use --tensorrt rtx for RTX targets)")
    if trt.flavour == "rtx":
        if options.timing_cache:
            raise DSMError(f"{trt.name} has no timing cache (it would need a GPU at build time and changes "
                           "nothing): drop --timing-cache; a runtime cache (validate --engine --runtime-cache) "
                           "keeps the kernels compiled on the GPU instead")
        for cc in options.compute_capabilities:
            if COMPUTE_CAPABILITIES.get(cc) not in trt.module.ComputeCapability.__members__:
                raise DSMError(f"{trt.name} has no target for compute capability {cc}")


# ------------------------------------------------------------------------------------- timing cache
def load_timing_cache(config, path: str | None):
    """Attach a timing cache to a builder config (full TensorRT): the file's if TensorRT accepts
    it, else an empty one (warning why). Returns the attached ``ITimingCache``.

    Raises:
        DSMError: if TensorRT cannot create even an empty timing cache.
    """
    data = b""
    if path and os.path.isfile(path):
        with open(path, "rb") as fh:
            data = fh.read()
    cache = None
    if data:
        try:
            cache = config.create_timing_cache(data)
        except (RuntimeError, TypeError, ValueError):
            cache = None
        if cache is None:
            warnings.warn(f"timing cache {path!r} is not readable by this TensorRT: starting an empty one",
                          stacklevel=2)
        elif not config.set_timing_cache(cache, ignore_mismatch=False):
            warnings.warn(f"timing cache {path!r} was made by another TensorRT version or GPU: "
                          "starting an empty one", stacklevel=2)
            cache = None
        else:
            return cache
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise DSMError("TensorRT could not create a timing cache")
    return cache


def save_timing_cache(path: str, serialized) -> bool:
    """Write a serialized timing cache atomically; ``serialized`` None or empty writes nothing
    (warning) and returns False."""
    data = bytes(serialized) if serialized is not None else b""
    if not data:
        warnings.warn(f"TensorRT returned no timing cache: {path!r} not written", stacklevel=2)
        return False
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return True


# -------------------------------------------------------------------------------------------- build
def _failure_hint(errors: list[str]) -> str:
    text = " ".join(errors)
    if "Turing" in text and "FP32 GEMM" in text:
        return (" (TensorRT-RTX has no fp32 GEMM on Turing, and a DSM graph keeps its matching path in fp32 by "
                "design: leave 7.5 out of --compute-capability)")
    return ""


def _set_targets(trt: TensorRT, config, targets: tuple[str, ...]) -> None:
    module = trt.module
    config.num_compute_capabilities = len(targets)
    for i, cc in enumerate(targets):
        member = getattr(module.ComputeCapability, COMPUTE_CAPABILITIES[cc])
        # returns False (logging an API error) instead of raising when slot i does not exist
        if not config.set_compute_capability(member, i):
            raise DSMError(f"{trt.name} did not accept compute capability {cc} as target {i + 1}")


def build_tensorrt(onnx_path: str, output: str, options: TensorRTOptions) -> dict:
    """Build a serialized TensorRT engine (``.plan``) and its JSON sidecar (``.plan.json``).

    Args:
        onnx_path: a dsm-export ONNX file: the fp32 export (fp32/fp16 engines) or the static QDQ
            file of ``build --precision int8`` (int8 engines).
        output: the ``.plan`` to write (atomically; the sidecar goes to ``output + ".json"``).
        options: :class:`TensorRTOptions`.

    Returns:
        The sidecar: flavour, TensorRT version, precision, targets asked (``compute_capabilities``,
        ``[]`` for the defaults) and read back from the engine header (``engine_targets``,
        TensorRT-RTX), ``where`` the engine runs, ``build_seconds`` (wall time of
        ``build_serialized_network``), the build ``log`` (errors, warnings), profile, batch, output
        and the ONNX metadata.

    Raises:
        DSMError: TensorRT missing or too old, an input TensorRT cannot take, options the flavour
            does not have, parser errors, or a failed build (with TensorRT's first error).
    """
    if not 1 <= options.min_batch <= options.opt_batch <= options.max_batch:
        raise DSMError("need 1 <= --min-batch <= --opt-batch <= --max-batch")
    model = original = load_onnx(onnx_path, weights=False)  # the weights of external data stay on disk
    info = read_metadata(model, onnx_path)
    check_tensorrt_input(model, onnx_path, options.precision)  # the file first: its fault is the user's to fix
    trt = import_tensorrt(options.flavour)
    check_flavour_options(trt, options)
    module = trt.module
    settings = build_settings(version_tuple(trt.version), options.precision, options.tf32,
                              module.BuilderFlag.__members__, trt.flavour)
    log = build_log(trt)
    log.reset()
    builder = module.Builder(log)
    external = has_external_data(original)
    if settings.fp16_graph:
        model, _ = convert_fp16(load_onnx(onnx_path) if external else model)
    # the parser owns the weights the network points to: it lives until the build is done
    network, _parser = _parse_network(trt, builder, log, model, onnx_path,
                                      from_file=model is original and external,
                                      strongly_typed=settings.strongly_typed)
    config, profile = _builder_config(trt, builder, network, settings, options, info)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        first = log.errors[0] if log.errors else "see TensorRT's log"
        raise DSMError(f"{trt.name} failed to build an engine from {onnx_path!r}: {first}{_failure_hint(log.errors)}")
    data = bytes(plan)
    header = read_rtx_header(data[:64]) if trt.flavour == "rtx" else None
    with atomic_path(output) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    if settings.timing_cache and options.timing_cache:
        cache = config.get_timing_cache()
        save_timing_cache(options.timing_cache, cache.serialize() if cache is not None else None)
    built = BuiltPlan(profile, info.batch, round(seconds, 2), len(data), network.num_layers)
    sidecar = _sidecar(trt, settings, options, header, original, onnx_path, built, log)
    write_json(output + ".json", sidecar)
    if log.warnings:
        print(f"{trt.name} logged {len(log.warnings)} warnings (in {output}.json); first: {log.warnings[0]}",
              file=sys.stderr)
    return sidecar


def _parse_network(trt, builder, log, model, onnx_path: str, from_file: bool, strongly_typed: bool):
    """``(network, parser)``: ``model`` parsed into a new network (``from_file``: read from
    ``onnx_path``, which finds its external data beside it). Raises DSMError with the parser's errors."""
    module = trt.module
    flags = 1 << int(module.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = module.OnnxParser(network, log)
    with tempfile.TemporaryDirectory(prefix="dsm-trt-") as work:
        if from_file:
            parsed = parser.parse_from_file(os.path.abspath(onnx_path))
        else:
            source = session_source(model, work)  # bytes, or a copy with external data over 2 GiB
            parsed = parser.parse(source) if isinstance(source, bytes) else parser.parse_from_file(source)
    if not parsed:
        errors = "; ".join(str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors))
        raise DSMError(f"{trt.name}'s ONNX parser rejected {onnx_path!r}: {errors}")
    return network, parser


def _builder_config(trt, builder, network, settings, options: TensorRTOptions, info):
    """``(config, profile)``: the builder config (workspace, flags, timing cache, targets) and, for a
    graph with a dynamic batch, the optimization profile added to it (``{"min", "opt", "max"}``
    input shapes; None for a static batch)."""
    module = trt.module
    config = builder.create_builder_config()
    config.set_memory_pool_limit(module.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    for name in settings.set_flags:
        config.set_flag(getattr(module.BuilderFlag, name))
    for name in settings.clear_flags:
        config.clear_flag(getattr(module.BuilderFlag, name))
    if settings.timing_cache:
        load_timing_cache(config, options.timing_cache)
    if options.compute_capabilities:
        _set_targets(trt, config, options.compute_capabilities)
    if info.batch is not None:
        return config, None
    c, h, w = info.input_size
    profile = {"min": [options.min_batch, c, h, w], "opt": [options.opt_batch, c, h, w],
               "max": [options.max_batch, c, h, w]}
    p = builder.create_optimization_profile()
    p.set_shape(network.get_input(0).name, *(tuple(v) for v in profile.values()))
    config.add_optimization_profile(p)
    return config, profile


@dataclass(frozen=True)
class BuiltPlan:
    """What one build produced, for the sidecar: the optimization ``profile`` (``{"min", "opt", "max"}``
    input shapes, None for a static batch), the static ``batch`` (None: dynamic), the build time in
    seconds, the plan's size in bytes and the network's layer count."""

    profile: dict | None
    batch: int | None
    build_seconds: float
    plan_bytes: int
    layers: int


def _sidecar(trt, settings, options: TensorRTOptions, header, original, onnx_path: str, built: BuiltPlan,
             log) -> dict:
    """The ``.plan.json`` sidecar of :func:`build_tensorrt`."""
    gpu = gpu_info()
    targets = list(options.compute_capabilities)
    out = original.graph.output[0]
    return {
        "flavour": trt.flavour,
        "tensorrt_version": trt.version,
        "tensorrt_module": trt.module.__name__,
        **gpu,
        "compute_capabilities": targets,
        "engine_targets": header["targets"] if header else None,
        "where": where_it_runs(trt.flavour, tuple(targets or (header or {}).get("targets") or ()),
                               gpu["gpu"], gpu["compute_capability"]),
        "precision": options.precision,
        "strongly_typed": settings.strongly_typed,
        "tf32": options.tf32,
        "profile": built.profile,
        "batch": built.batch,
        "workspace_mib": options.workspace_mib,
        "build_seconds": built.build_seconds,
        "plan_bytes": built.plan_bytes,
        "layers": built.layers,
        "log": {"errors": log.errors[:MAX_LOG_LINES], "warnings": log.warnings[:MAX_LOG_LINES],
                "error_count": len(log.errors), "warning_count": len(log.warnings)},
        "source_onnx": os.path.abspath(onnx_path),
        "output": out.name,
        "num_classes": int(out.type.tensor_type.shape.dim[-1].dim_value),
        "onnx_metadata": read_props(original),
    }
