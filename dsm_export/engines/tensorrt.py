"""TensorRT engines (``tensorrt`` imported lazily; it cannot be installed everywhere).

Written against the TensorRT 10.x Python API (and what TensorRT 11 removes), following Polygraphy's
builder configuration:

* ONNX parser, builder config with a workspace memory-pool limit, an optimization profile for a
  dynamic batch axis.
* Precision (:func:`build_settings`, a pure function of version and options): fp32 engines clear
  ``BuilderFlag.TF32`` (on by default) unless TF32 is asked for; fp16 engines are built from the
  fp16 ONNX graph (fp32 islands for matching and sizes, see :mod:`.onnxruntime`) as a
  ``STRONGLY_TYPED`` network on every TensorRT 10.x (the ``FP16`` builder flag would let TensorRT
  drop the fp32 islands; TensorRT 11 has no weak typing and no ``FP16`` flag at all); INT8
  engines come from the QDQ file of ``build --precision int8`` (explicit quantization) as a
  strongly typed network with no precision flag, as TensorRT's "Explicit Quantization" guide says.
* Timing cache: read if present; a cache TensorRT cannot read or that another TensorRT/GPU wrote is
  replaced by an empty one (with a warning); written back atomically after the build.
* Running (:class:`TensorRTRunner`): batches are split into pieces within the engine's profile
  (``get_tensor_profile_shape``) and padded up to its minimum (static-batch engines: to their batch),
  and ``set_input_shape``'s result is checked.

A JSON sidecar records TensorRT version, GPU, precision, profile, output and schedule.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import DSMError
from ..export import load_onnx, read_metadata
from ..fileio import atomic_path, write_json
from .onnxruntime import convert_fp16

TENSORRT_INSTALL_HINT = (
    "tensorrt is not installed: it needs an NVIDIA GPU with its driver, and "
    "'pip install tensorrt' (NVIDIA's wheels, TensorRT 10.0 or newer, matching the CUDA of the driver)")
MIN_VERSION = (10, 0)
STRONGLY_TYPED_FP32_FROM = (10, 12)  # weak typing is deprecated from 10.12 and gone in 11


def import_tensorrt():
    """Import ``tensorrt``.

    Raises:
        DSMError: with install instructions when it is missing.
    """
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError:
        raise DSMError(TENSORRT_INSTALL_HINT) from None
    return trt


def version_tuple(v: str) -> tuple[int, int]:
    """``"10.12.0.36"`` -> ``(10, 12)``."""
    parts = [int(p) for p in v.split(".")[:2] if p.isdigit()]
    return tuple((parts + [0, 0])[:2])


@dataclass
class TensorRTOptions:
    """Options of :func:`build_tensorrt`.

    Attributes:
        precision: ``fp32``, ``fp16`` or ``int8`` (the input must then be a static, symmetric QDQ
            file written by ``build --backend onnxruntime --precision int8``).
        workspace_mib: workspace memory-pool limit (MiB).
        timing_cache: timing-cache file, read if present and written back after the build.
        min_batch, opt_batch, max_batch: optimization profile when the batch axis is dynamic.
        tf32: allow TF32 for fp32 math (TensorRT's default; off here, as in Polygraphy).
    """

    precision: str = "fp32"
    workspace_mib: int = 1024
    timing_cache: str | None = None
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 64
    tf32: bool = False


@dataclass(frozen=True)
class BuildSettings:
    """How to build for a TensorRT version and precision (:func:`build_settings`).

    Attributes:
        strongly_typed: create the network with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``.
        fp16_graph: parse the fp16 conversion of the ONNX graph (fp32 islands kept).
        set_flags, clear_flags: ``BuilderFlag`` member names to set / clear on the config.
    """

    strongly_typed: bool
    fp16_graph: bool
    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]


def build_settings(version: tuple[int, int], precision: str, tf32: bool, builder_flags) -> BuildSettings:
    """Network typing and builder flags for ``precision`` on TensorRT ``version``.

    * fp16: the fp16 ONNX graph as a strongly typed network on every version (10.0+); no ``FP16``
      flag (with it, weakly typed TensorRT may run the fp32 islands in fp16; TensorRT 11 removed it).
    * fp32: strongly typed from 10.12 (weak typing deprecated there, removed in 11), weakly typed
      before; the same engine either way, since nothing in the graph is below fp32.
    * int8: the QDQ graph as a strongly typed network (explicit quantization: the Q/DQ nodes fix
      the precisions; no ``INT8`` flag).
    * ``TF32`` is cleared unless ``tf32`` (it is on by default), where the flag exists.

    Args:
        version: ``(major, minor)`` of TensorRT.
        precision: ``fp32``, ``fp16`` or ``int8``.
        tf32: allow TF32.
        builder_flags: names of the ``trt.BuilderFlag`` members of this TensorRT.

    Raises:
        DSMError: an unknown precision, TensorRT older than 10.0, or ``tf32`` where this TensorRT
            has no such flag.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise DSMError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    if tuple(version) < MIN_VERSION:
        raise DSMError(f"TensorRT {version[0]}.{version[1]} is too old: dsm-export needs TensorRT 10.0 or newer")
    flags = set(builder_flags)
    fp16 = precision == "fp16"
    strongly_typed = fp16 or precision == "int8" or tuple(version) >= STRONGLY_TYPED_FP32_FROM
    set_flags, clear_flags = [], []
    if "TF32" in flags:
        (set_flags if tf32 else clear_flags).append("TF32")
    elif tf32:
        raise DSMError(f"TensorRT {version[0]}.{version[1]} has no TF32 builder flag")
    return BuildSettings(strongly_typed, fp16, tuple(set_flags), tuple(clear_flags))


def batch_chunks(n: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """Split ``n`` images into runs an engine's profile accepts.

    Args:
        n: images.
        min_batch, max_batch: the profile's batch range (equal for a static-batch engine).

    Returns:
        ``(start, stop, run_batch)`` per run: images ``start:stop`` padded to ``run_batch``
        (``min_batch <= run_batch <= max_batch``; padding only where ``stop - start < min_batch``).

    Raises:
        DSMError: if the range is empty or below 1.
    """
    if not 1 <= min_batch <= max_batch:
        raise DSMError(f"engine batch range {min_batch}..{max_batch} is invalid")
    out = []
    for start in range(0, n, max_batch):
        stop = min(start + max_batch, n)
        out.append((start, stop, max(stop - start, min_batch)))
    return out


def load_timing_cache(config, path: str | None):
    """Attach a timing cache to a builder config: the file's if TensorRT accepts it, else an empty
    one (warning why). Returns the attached ``ITimingCache``.

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


def build_tensorrt(onnx_path: str, output: str, options: TensorRTOptions) -> dict:
    """Build a serialized TensorRT engine (``.plan``) and its JSON sidecar (``.plan.json``).

    Raises:
        DSMError: tensorrt missing or older than 10.0, bad input or options, parser errors, or a
            failed build.
    """
    trt = import_tensorrt()
    model = original = load_onnx(onnx_path)
    info = read_metadata(model, onnx_path)
    if not 1 <= options.min_batch <= options.opt_batch <= options.max_batch:
        raise DSMError("need 1 <= --min-batch <= --opt-batch <= --max-batch")
    settings = build_settings(version_tuple(trt.__version__), options.precision, options.tf32,
                              trt.BuilderFlag.__members__)
    check_tensorrt_int8_input(model, onnx_path, options.precision)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if settings.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if settings.fp16_graph:
        model, _ = convert_fp16(model)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors))
        raise DSMError(f"TensorRT's ONNX parser rejected {onnx_path!r}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    for name in settings.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in settings.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    load_timing_cache(config, options.timing_cache)
    profile = None
    inp = network.get_input(0)
    c, h, w = info.input_size
    if info.batch is None:
        profile = {"min": [options.min_batch, c, h, w], "opt": [options.opt_batch, c, h, w],
                   "max": [options.max_batch, c, h, w]}
        p = builder.create_optimization_profile()
        p.set_shape(inp.name, *(tuple(v) for v in profile.values()))
        config.add_optimization_profile(p)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise DSMError(f"TensorRT failed to build an engine from {onnx_path!r} (see the log above)")
    with atomic_path(output) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(bytes(plan))
    if options.timing_cache:
        cache = config.get_timing_cache()
        save_timing_cache(options.timing_cache, cache.serialize() if cache is not None else None)
    out = original.graph.output[0]
    sidecar = {
        "tensorrt_version": trt.__version__,
        **gpu_info(),
        "precision": options.precision,
        "strongly_typed": settings.strongly_typed,
        "tf32": options.tf32,
        "profile": profile,
        "batch": info.batch,
        "workspace_mib": options.workspace_mib,
        "source_onnx": os.path.abspath(onnx_path),
        "output": out.name,
        "num_classes": int(out.type.tensor_type.shape.dim[-1].dim_value),
        "onnx_metadata": {p.key: p.value for p in original.metadata_props},
    }
    write_json(output + ".json", sidecar)
    return sidecar


def check_tensorrt_int8_input(model: onnx.ModelProto, path: str, precision: str) -> None:
    """Check that the file fits the precision asked of TensorRT (no TensorRT needed).

    ``int8`` needs the static QDQ file of ``build --precision int8`` with symmetric INT8 activations
    (TensorRT's explicit quantization is symmetric, zero point 0); ``fp32``/``fp16`` need an
    unquantized file.

    Raises:
        DSMError: naming what the file is and what to do.
    """
    from ..quantize import is_quantized, quantization_record

    record = quantization_record(model)
    if precision != "int8":
        if record or is_quantized(model):
            raise DSMError(f"{path!r} is quantized: build it with --precision int8")
        return
    if record is None:
        raise DSMError(f"{path!r} is not quantized: TensorRT INT8 takes the QDQ file of "
                       "'dsm-export build --backend onnxruntime --precision int8'")
    if record.get("mode") != "static" or not str(record.get("activations", "")).startswith("int8"):
        raise DSMError(f"{path!r} is {record.get('mode')} INT8 with {record.get('activations')} activations: "
                       "TensorRT needs static QDQ with symmetric int8 activations (--quantization static "
                       "--activations int8)")


def gpu_info() -> dict:
    """GPU name and compute capability of device 0 (through torch)."""
    import torch

    if not torch.cuda.is_available():
        return {"gpu": None, "compute_capability": None}
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


class TensorRTRunner:
    """Run a serialized engine: ``[B, 3, H, W]`` float32 numpy -> its first output, float32 numpy
    (``[B, classes]`` logits or ``[B, dim]`` embeddings); :meth:`run_all` returns every output.

    Any ``B`` works: the images are run in pieces within the engine's optimization profile 0
    (``ICudaEngine.get_tensor_profile_shape``; a static-batch engine takes exactly its batch), the
    last piece padded by repeating its last image (:func:`batch_chunks`). I/O buffers are torch CUDA
    tensors; inference through ``execute_async_v3`` on a torch stream.

    Raises:
        DSMError: tensorrt missing, no GPU, an engine that does not deserialize, a rejected input
            shape, or a failed inference.
    """

    def __init__(self, plan_path: str):
        trt = import_tensorrt()
        import torch

        if not torch.cuda.is_available():
            raise DSMError("running a TensorRT engine needs an NVIDIA GPU")
        if not os.path.isfile(plan_path):
            raise DSMError(f"engine {plan_path!r} does not exist")
        self.torch = torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        with open(plan_path, "rb") as fh:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(fh.read())
        if self.engine is None:
            raise DSMError(f"{plan_path!r} is not a TensorRT engine for this TensorRT and GPU")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise DSMError(f"TensorRT could not create an execution context for {plan_path!r}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not self.outputs:
            raise DSMError(f"{plan_path!r}: expected one input and at least one output")
        self.input = inputs[0]
        self.output = self.outputs[0]
        static = int(self.engine.get_tensor_shape(self.input)[0])
        if static > 0:
            self.min_batch = self.max_batch = static
        else:
            low, _, high = self.engine.get_tensor_profile_shape(self.input, 0)
            self.min_batch, self.max_batch = int(low[0]), int(high[0])
        self.dtypes = {n: _torch_dtype(torch, trt, self.engine.get_tensor_dtype(n)) for n in self.outputs}
        self.stream = torch.cuda.Stream()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run_all(x)[self.output]

    def run_all(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the engine for ``x`` (``[B, 3, H, W]``), by tensor name."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        pieces: dict[str, list[np.ndarray]] = {n: [] for n in self.outputs}
        for start, stop, run_batch in batch_chunks(len(x), self.min_batch, self.max_batch):
            chunk = x[start:stop]
            if run_batch > len(chunk):
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], run_batch - len(chunk), axis=0)])
            for name, value in self._run(chunk).items():
                pieces[name].append(value[:stop - start])
        return {n: np.concatenate(v) if v else np.zeros((0,), np.float32) for n, v in pieces.items()}

    def _run(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.cuda.stream(self.stream):
            inp = torch.from_numpy(chunk).to("cuda", non_blocking=False)
            if not self.context.set_input_shape(self.input, tuple(inp.shape)):
                raise DSMError(f"the engine rejected input shape {tuple(inp.shape)} (profile batch "
                               f"{self.min_batch}..{self.max_batch})")
            self.context.set_tensor_address(self.input, inp.data_ptr())
            outs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise DSMError(f"TensorRT left output {name!r} with an unknown shape {shape}")
                outs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
                self.context.set_tensor_address(name, outs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise DSMError("TensorRT inference failed")
        self.stream.synchronize()
        return {n: (t.float() if t.is_floating_point() else t).cpu().numpy() for n, t in outs.items()}


def _torch_dtype(torch, trt, dtype):
    table = {}
    for name in ("float32", "float16", "bfloat16", "int32", "int64", "int8", "bool"):
        if hasattr(trt, name):
            table[getattr(trt, name)] = getattr(torch, name)
    if dtype not in table:
        raise DSMError(f"engine output type {dtype} is not supported by dsm-export's runner")
    return table[dtype]


def engine_info(plan_path: str):
    """The dsm-export metadata of the ONNX file an engine was built from (its JSON sidecar)."""
    sidecar = plan_path + ".json"
    if not os.path.isfile(sidecar):
        raise DSMError(f"{sidecar!r} is missing: dsm-export needs the sidecar written by 'build'")
    with open(sidecar, encoding="utf-8") as fh:
        data = json.load(fh)
    proto = onnx.ModelProto()
    for key, value in data.get("onnx_metadata", {}).items():
        proto.metadata_props.add(key=key, value=value)
    if data.get("output"):
        proto.graph.output.add(name=data["output"])
    return read_metadata(proto, plan_path), data


def copy_file(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
