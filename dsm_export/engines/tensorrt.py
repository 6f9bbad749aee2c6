"""TensorRT engines (``tensorrt`` imported lazily; it cannot be installed everywhere).

ONNX parser, builder config with a workspace memory-pool limit, a timing cache file reused across
builds, an optimization profile for a dynamic batch axis, fp32 or fp16 (the FP16 builder flag before
TensorRT 10.12; a strongly typed network from the fp16 ONNX graph from 10.12 on, where weak typing
is deprecated), or INT8 by explicit quantization from the QDQ file of ``build --precision int8``
(a strongly typed network: the Q/DQ nodes fix every precision and no precision flag is set, as
TensorRT's "Explicit Quantization" guide says; the INT8 builder flag only before TensorRT 10).
A JSON sidecar records TensorRT version, GPU, precision, profile and schedule.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import DSMError
from ..export import load_onnx, read_metadata
from ..fileio import atomic_path, write_json
from .onnxruntime import convert_fp16

TENSORRT_INSTALL_HINT = (
    "tensorrt is not installed: install it on a machine with an NVIDIA GPU and driver with "
    "'pip install tensorrt'; its wheels come from NVIDIA's package index)")



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


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".")[:2] if p.isdigit())


@dataclass
class TensorRTOptions:
    """Options of :func:`build_tensorrt`.

    Attributes:
        precision: ``fp32``, ``fp16`` or ``int8`` (the input must then be a static, symmetric QDQ
            file written by ``build --backend onnxruntime --precision int8``).
        workspace_mib: workspace memory-pool limit (MiB).
        timing_cache: timing-cache file, read if present and written back after the build.
        min_batch, opt_batch, max_batch: optimization profile when the batch axis is dynamic.
    """

    precision: str = "fp32"
    workspace_mib: int = 1024
    timing_cache: str | None = None
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 64


def build_tensorrt(onnx_path: str, output: str, options: TensorRTOptions) -> dict:
    """Build a serialized TensorRT engine (``.plan``) and its JSON sidecar (``.plan.json``).

    Raises:
        DSMError: tensorrt missing, bad input, parser errors, or a failed build.
    """
    trt = import_tensorrt()
    model = original = load_onnx(onnx_path)
    info = read_metadata(model, onnx_path)
    if options.precision not in ("fp32", "fp16", "int8"):
        raise DSMError(f"precision must be fp32, fp16 or int8, got {options.precision!r}")
    check_tensorrt_int8_input(model, onnx_path, options.precision)
    if not options.min_batch <= options.opt_batch <= options.max_batch:
        raise DSMError("need --min-batch <= --opt-batch <= --max-batch")
    version = _version_tuple(trt.__version__)
    strongly_typed = ((options.precision == "fp16" and version >= (10, 12))
                      or (options.precision == "int8" and version >= (10, 0)))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if options.precision == "fp16":
            model, _ = convert_fp16(model)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DSMError(f"TensorRT's ONNX parser rejected {onnx_path!r}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.precision == "fp16" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.precision == "int8" and not strongly_typed:
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization before TensorRT 10
    cache_bytes = b""
    if options.timing_cache and os.path.isfile(options.timing_cache):
        with open(options.timing_cache, "rb") as fh:
            cache_bytes = fh.read()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
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
        with atomic_path(options.timing_cache) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(bytes(config.get_timing_cache().serialize()))
    sidecar = {
        "tensorrt_version": trt.__version__,
        **gpu_info(),
        "precision": options.precision,
        "strongly_typed": strongly_typed,
        "profile": profile,
        "batch": info.batch,
        "workspace_mib": options.workspace_mib,
        "source_onnx": os.path.abspath(onnx_path),
        "num_classes": int(original.graph.output[0].type.tensor_type.shape.dim[-1].dim_value),
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
    """Run a serialized engine: ``[B, 3, H, W]`` float32 numpy -> ``[B, classes]`` float32 numpy.

    I/O buffers are torch CUDA tensors; inference through ``execute_async_v3`` on a torch stream.

    Raises:
        DSMError: tensorrt missing, no GPU, or an engine that does not deserialize.
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
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.stream = torch.cuda.Stream()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        inp = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).cuda()
        self.context.set_input_shape(self.input, tuple(inp.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(self.input, inp.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise DSMError("TensorRT inference failed")
        self.stream.synchronize()
        return out.cpu().numpy()


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
    return read_metadata(proto, plan_path), data


def copy_file(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
