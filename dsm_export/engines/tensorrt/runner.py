"""Run and time TensorRT engines written by :func:`.build.build_tensorrt` (needs an NVIDIA GPU).

* The engine's sidecar names the flavour and release that built it: the runner imports that
  flavour and refuses another release (engines do not load across releases).
* TensorRT-RTX: ``Runtime.get_engine_validity`` reads the header first, so an engine built for
  other compute capabilities is refused with the reason instead of failing to deserialize; a
  runtime cache (``IRuntimeConfig``/``IRuntimeCache``, TensorRT-RTX docs, *Working with Runtime
  Cache*) keeps the kernels JIT-compiled on this GPU for the next start.
* Batches are split into pieces within the engine's profile (``get_tensor_profile_shape``) and
  padded up to its minimum (static-batch engines: to their batch); ``set_input_shape``'s result
  is checked.
"""

from __future__ import annotations

import json
import os
import statistics

import numpy as np
import torch

from ...errors import DSMError
from ...graph.export import read_metadata
from ...graph.metadata import proto_with_props
from ...fileio import atomic_path, copy_file  # noqa: F401  (copy_file: callers import it from here)
from .common import build_log, require_gpu
from ..registry import EngineFile
from .flavours import import_tensorrt, version_tuple

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


def read_sidecar(plan_path: str) -> dict:
    """The JSON sidecar ``build`` wrote next to a plan.

    Raises:
        DSMError: the sidecar is missing or unreadable.
    """
    sidecar = plan_path + ".json"
    if not os.path.isfile(sidecar):
        raise DSMError(f"{sidecar!r} is missing: dsm-export needs the sidecar written by 'build'")
    try:
        with open(sidecar, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise DSMError(f"{sidecar!r} is not a dsm-export sidecar: {exc}") from None


def engine_info(plan_path: str):
    """``(ExportInfo, sidecar)``: the dsm-export metadata of the ONNX file an engine was built from."""
    data = read_sidecar(plan_path)
    proto = proto_with_props(data.get("onnx_metadata", {}), data.get("output") or None)
    return read_metadata(proto, plan_path), data


def read_plan(path: str) -> EngineFile:
    """What a plan says about itself, from its sidecar (no TensorRT, no GPU).

    Raises:
        DSMError: the sidecar is missing or is not dsm-export's.
    """
    info, sidecar = engine_info(path)
    source = sidecar.get("source_onnx")
    if source and not os.path.isabs(source):
        source = os.path.join(os.path.dirname(os.path.abspath(path)), source)
    return EngineFile(
        path=path, backend="tensorrt", info=info, precision=sidecar.get("precision", "fp32"),
        input_name="pixel_values", output_name=sidecar.get("output") or info.output,
        output_dims=(int(sidecar.get("num_classes", 1000)),), static_batch=info.batch,
        files=(path, path + ".json"), source_path=source or path,
        meta={k: str(v) for k, v in sidecar.items() if not isinstance(v, (dict, list))})


def tensorrt_for_engine(sidecar: dict, plan_path: str, flavour: str = "auto"):
    """Import the TensorRT flavour that built an engine, refusing another flavour or release.

    Raises:
        DSMError: the flavour is missing, differs from ``flavour``, or its release is not the builder's.
    """
    built = sidecar.get("flavour", "enterprise")
    if flavour not in ("auto", built):
        raise DSMError(f"{plan_path!r} was built by {built} TensorRT, not --tensorrt {flavour}")
    trt = import_tensorrt(built)
    want = sidecar.get("tensorrt_version")
    same = want == trt.version if built == "rtx" else version_tuple(str(want)) == version_tuple(trt.version)
    if want and not same:
        raise DSMError(f"{plan_path!r} was built by {built} TensorRT {want} and this is {trt.version}: "
                       "engines do not load across releases; rebuild it with this one")
    return trt


def engine_validity(trt, data: bytes) -> tuple[str, list[str]]:
    """TensorRT-RTX's verdict on an engine's header for this system: ``("VALID" | "SUBOPTIMAL" |
    "INVALID", [diagnostic names])``; ``("VALID", [])`` for full TensorRT (it has no such check).
    Needs a GPU: without one TensorRT-RTX answers INVALID with no diagnostic."""
    runtime_cls = trt.module.Runtime
    if trt.flavour != "rtx" or not hasattr(runtime_cls, "get_engine_validity"):
        return "VALID", []
    runtime = runtime_cls(build_log(trt))
    validity, bits = runtime.get_engine_validity(data[:runtime.engine_header_size])
    names = [n for n, v in trt.module.EngineInvalidityDiagnostics.__members__.items() if int(bits) & int(v)]
    return validity.name, names


class TensorRTRunner:
    """Run a serialized engine: ``[B, 3, H, W]`` float32 numpy -> its first output, float32 numpy
    (``[B, classes]`` logits or ``[B, dim]`` embeddings); :meth:`run_all` returns every output.

    Any ``B`` works: the images are run in pieces within the engine's optimization profile 0
    (``ICudaEngine.get_tensor_profile_shape``; a static-batch engine takes exactly its batch), the
    last piece padded by repeating its last image (:func:`batch_chunks`). I/O buffers are torch CUDA
    tensors; inference through ``execute_async_v3`` on a torch stream.

    Args:
        plan_path: the ``.plan`` (its ``.plan.json`` sidecar beside it).
        flavour: ``auto`` (the sidecar's), ``enterprise`` or ``rtx``.
        runtime_cache: TensorRT-RTX: a runtime-cache file, read if present and written back after
            each :meth:`run_all` (the JIT-compiled kernels of this GPU).

    Raises:
        DSMError: no GPU, TensorRT of the engine's flavour and release missing, an engine not valid
            for this GPU (TensorRT-RTX's diagnostics named), one that does not deserialize, a
            rejected input shape, or a failed inference.
    """

    def __init__(self, plan_path: str, flavour: str = "auto", runtime_cache: str | None = None):
        require_gpu()
        if not os.path.isfile(plan_path):
            raise DSMError(f"engine {plan_path!r} does not exist")
        sidecar = read_sidecar(plan_path)
        self.trt = trt = tensorrt_for_engine(sidecar, plan_path, flavour)
        module = trt.module
        self.logger = build_log(trt)
        with open(plan_path, "rb") as fh:
            data = fh.read()
        validity, why = engine_validity(trt, data)
        if validity == "INVALID":
            raise DSMError(f"{plan_path!r} does not run here ({', '.join(why) or 'no reason given'}): "
                           f"{sidecar.get('where', '')}")
        self.engine = module.Runtime(self.logger).deserialize_cuda_engine(data)
        if self.engine is None:
            raise DSMError(f"{plan_path!r} is not a TensorRT engine for this TensorRT and GPU")
        self.runtime_cache_path = runtime_cache if trt.flavour == "rtx" else None
        self._runtime_config = self._runtime_cache = None
        if self.runtime_cache_path and hasattr(self.engine, "create_runtime_config"):
            self._runtime_config = self.engine.create_runtime_config()
            self._runtime_cache = self._runtime_config.create_runtime_cache()
            if os.path.isfile(self.runtime_cache_path):
                with open(self.runtime_cache_path, "rb") as fh:
                    self._runtime_cache.deserialize(fh.read())
            self._runtime_config.set_runtime_cache(self._runtime_cache)
            self.context = self.engine.create_execution_context(self._runtime_config)
        else:
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise DSMError(f"TensorRT could not create an execution context for {plan_path!r}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == module.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == module.TensorIOMode.OUTPUT]
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
        self.dtypes = {n: _torch_dtype(module, self.engine.get_tensor_dtype(n)) for n in self.outputs}
        self.stream = torch.cuda.Stream()
        self.engine_file = read_plan(plan_path)
        self.judged_as = self.engine_file.precision
        self.label = f"{trt.name} {trt.version}"

    def close(self) -> None:
        """Write the runtime cache and free the execution context."""
        self.save_runtime_cache()
        self.context = None

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
            with torch.cuda.stream(self.stream):  # copied on the stream the engine runs on
                inp = torch.from_numpy(chunk).to("cuda")
            for name, value in self._run(inp).items():
                pieces[name].append((value.float() if value.is_floating_point() else value).cpu().numpy()[:stop - start])
        self.save_runtime_cache()
        return {n: np.concatenate(v) if v else np.zeros((0,), np.float32) for n, v in pieces.items()}

    def _run(self, inp):
        """Outputs (CUDA tensors) for one CUDA input batch within the profile."""
        with torch.cuda.stream(self.stream):
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
        return outs

    def throughput(self, batch: int, repeats: int = 7, iters: int = 10, warmup: int = 3) -> float:
        """Median images/s over ``repeats`` timings of ``iters`` runs of one random device-resident
        ``[batch, C, H, W]`` batch (CUDA events on the engine's stream, each run synchronised; no
        host copies timed).

        Raises:
            DSMError: ``batch`` outside the engine's profile.
        """
        if not self.min_batch <= batch <= self.max_batch:
            raise DSMError(f"batch {batch} is outside the engine's profile {self.min_batch}..{self.max_batch}")
        shape = (batch, *tuple(self.engine.get_tensor_shape(self.input))[1:])
        with torch.cuda.stream(self.stream):
            inp = torch.randn(shape, device="cuda")
        for _ in range(warmup):
            self._run(inp)
        rates = []
        for _ in range(repeats):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            for _ in range(iters):
                self._run(inp)
            stop.record(self.stream)
            stop.synchronize()
            rates.append(batch * iters / (start.elapsed_time(stop) / 1000))
        return statistics.median(rates)

    def save_runtime_cache(self) -> None:
        """Write the TensorRT-RTX runtime cache (atomically) if one was asked for."""
        if self._runtime_cache is None:
            return
        with self._runtime_cache.serialize() as data, atomic_path(self.runtime_cache_path) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(bytes(data))


def _torch_dtype(module, dtype):
    table = {}
    for name in ("float32", "float16", "bfloat16", "int32", "int64", "int8", "bool"):
        if hasattr(module, name):
            table[getattr(module, name)] = getattr(torch, name)
    if dtype not in table:
        raise DSMError(f"engine output type {dtype} is not supported by dsm-export's runner")
    return table[dtype]
