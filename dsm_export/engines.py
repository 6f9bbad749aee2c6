"""Engines from a validated DSM ONNX file: ONNX Runtime (optimized, fp16) and TensorRT.

* ONNX Runtime: the graph with ORT's graph optimizations applied and saved
  (``SessionOptions.optimized_model_filepath``), and an fp16 variant made with onnxconverter-common
  in which the matching scores (keys -> cosine similarity -> ArgMax/TopK) and everything carrying
  token sizes stay in fp32.
* TensorRT (``tensorrt`` imported lazily; it cannot be installed everywhere): ONNX parser, builder
  config with a workspace memory-pool limit, a timing cache file reused across builds, an
  optimization profile for a dynamic batch axis, fp32 or fp16 (the FP16 builder flag before
  TensorRT 10.12; a strongly typed network from the fp16 ONNX graph from 10.12 on, where weak typing
  is deprecated). A JSON sidecar records TensorRT version, GPU, precision, profile and schedule.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import DSMError
from .export import META_PREFIX, load_onnx, read_metadata
from .fileio import atomic_path, write_json

TENSORRT_INSTALL_HINT = (
    "tensorrt is not installed: install it on a machine with an NVIDIA GPU and driver with "
    "'pip install tensorrt'; its wheels come from NVIDIA's package index)")


# ----------------------------------------------------------------------------- ONNX Runtime
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

    Returns:
        ``{"backend", "precision", "output", "fp32_nodes"}``.

    Raises:
        DSMError: bad input file or output folder.
    """
    import onnxruntime as ort

    model = load_onnx(onnx_path)
    read_metadata(model, onnx_path)
    kept = 0
    src = onnx_path
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise DSMError(f"output folder {folder!r} does not exist")
    with atomic_path(output) as tmp:
        if fp16:
            half, kept = convert_fp16(model)
            onnx.save(half, tmp)
            src = tmp
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        optimized = tmp + ".opt"
        opts.optimized_model_filepath = optimized
        try:
            ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
            result = onnx.load(optimized)
        finally:
            if os.path.exists(optimized):
                os.unlink(optimized)
        _copy_metadata(model, result, {"engine": "onnxruntime", "precision": "fp16" if fp16 else "fp32"})
        onnx.save(result, tmp)
    return {"backend": "onnxruntime", "precision": "fp16" if fp16 else "fp32", "output": output, "fp32_nodes": kept}


def fp32_island_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of nodes to keep in fp32 in an fp16 conversion of a DSM graph.

    * Sizes: every node with a float input or output whose last dimension is 1 (token sizes,
      ``log(size)``) or the embedding width + 1 (features and sizes merged together), found by
      shape inference: the size-weighted merge and the proportional-attention term.
    * Matching: ``TopK``/``ArgMax`` and, as for the above, every node whose outputs feed only
      (transitively) into fp32 nodes -- the key mean over heads, normalisation, similarity MatMul,
      ReduceMax, the one-hot assignment.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        if t.elem_type == onnx.TensorProto.FLOAT and t.HasField("shape") and t.shape.dim:
            shapes[v.name] = t.shape.dim[-1].dim_value
    for init in inferred.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and init.dims:
            shapes[init.name] = init.dims[-1]
    width = shapes.get(next(n.input[0] for n in inferred.graph.node if n.op_type == "LayerNormalization"), 0)
    size_dims = {1, width + 1}

    consumers: dict[str, list] = {}
    for node in inferred.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    keep = {n.name for n in inferred.graph.node if n.op_type in ("TopK", "ArgMax")}
    for node in inferred.graph.node:
        tensors = [t for t in list(node.input) + list(node.output) if t in shapes]
        if any(shapes[t] in size_dims for t in tensors) and node.op_type not in ("Constant", "Shape"):
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
    half = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep,
                                            disable_shape_infer=False)
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


# ----------------------------------------------------------------------------- TensorRT
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
        precision: ``fp32`` or ``fp16``.
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
    if options.precision not in ("fp32", "fp16"):
        raise DSMError(f"precision must be fp32 or fp16, got {options.precision!r}")
    if not options.min_batch <= options.opt_batch <= options.max_batch:
        raise DSMError("need --min-batch <= --opt-batch <= --max-batch")
    version = _version_tuple(trt.__version__)
    strongly_typed = options.precision == "fp16" and version >= (10, 12)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
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
