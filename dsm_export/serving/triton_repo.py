"""Triton Inference Server model repositories for DSM engines.

Writes ``<repo>/<name>/config.pbtxt`` and ``<repo>/<name>/1/model.onnx`` (platform
``onnxruntime_onnx``), ``<repo>/<name>/1/model.plan`` (``tensorrt_plan``) or, for an OpenVINO IR,
``<repo>/<name>/1/model.xml`` with its ``model.bin`` (``backend: "openvino"``, CPU instances). The config is built as
Triton's own ``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``) and printed with
``google.protobuf.text_format``: ``max_batch_size`` with dims that leave out the batch axis, dynamic
batching with preferred batch sizes, and an instance group (``KIND_CPU`` or ``KIND_GPU``; plans
are GPU-only); a fixed-batch export gets ``max_batch_size: 0`` and full dims. An ONNX model on GPU
instances can have ONNX Runtime's TensorRT execution accelerator
(``optimization.execution_accelerators.gpu_execution_accelerator``, Triton's onnxruntime backend).

Triton's OpenVINO backend takes its precision from the config's ``parameters`` and can only ask
for bf16 (``HINT_BF16: YES``; openvino_backend ``ParseParameterHelper``), not f32: an engine that
records bf16 gets it; an fp32 IR runs at the CPU's default there, which is bf16 on a CPU with AVX-512
BF16 or AMX, and :func:`model_config` says so (``notes_out``).

Refused rather than written wrong: a TensorRT-RTX plan (Triton's TensorRT backend runs full
TensorRT); a plan whose optimization profile starts above batch 1 under
dynamic batching (Triton forms batches of any size from 1), and tensor element types with no Triton
equivalent.
"""

from __future__ import annotations

import os
import re

import onnx
from google.protobuf import text_format

from ..engines.registry import EngineFile, TritonPlacement, backend_for, import_optional, read_engine
from ..errors import DSMError
from ..fileio import atomic_path, copy_file

# ONNX element type -> Triton data type (model_config.proto DataType).
_DTYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32", onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING",
}
INSTANCE_KINDS = ("cpu", "gpu")
ORT_TENSORRT_PRECISIONS = ("fp32", "fp16")


def triton_dtype(elem_type: int, where: str) -> str:
    """The Triton data type of an ONNX element type.

    Raises:
        DSMError: for an element type Triton has no type for (e.g. complex, float8).
    """
    if elem_type not in _DTYPES:
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() \
            else str(elem_type)
        raise DSMError(f"{where}: element type {name} has no Triton data type")
    return _DTYPES[elem_type]


def _model_config_pb2():
    """Triton's ``ModelConfig`` protobuf module (tritonclient, the ``serve`` extra)."""
    return import_optional("tritonclient.grpc.model_config_pb2", "serve", "tritonclient")


def model_name_for(path: str) -> str:
    """A Triton model name from a file name (letters, digits, ``_`` and ``-``)."""
    stem = os.path.basename(path).split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "model"


def check_plan_batching(profile: dict | None, dynamic_batching: bool, path: str) -> None:
    """Refuse a plan whose optimization profile cannot take every batch Triton's dynamic batcher
    may form (1 up to ``max_batch_size``): one with a minimum batch above 1.

    Args:
        profile: the sidecar's profile (``{"min": [b, c, h, w], "opt": ..., "max": ...}``) or None.
        dynamic_batching: whether the config turns dynamic batching on.

    Raises:
        DSMError: naming the profile's minimum.
    """
    if profile and dynamic_batching and int(profile["min"][0]) > 1:
        raise DSMError(f"{path!r}: its optimization profile starts at batch {profile['min'][0]}, but "
                       "Triton's dynamic batcher sends batches from 1 (rebuild with --min-batch 1)")


def _instance_kind(path: str, placement: TritonPlacement, given: str | None, ort_tensorrt: str | None,
                   label: str) -> str:
    """The instance kind: the one an engine runs on alone, or the user's, or the backend's default; the
    ONNX Runtime TensorRT accelerator only where the backend takes it, on GPU instances."""
    if placement.only_kind and given not in (None, placement.instance_kind):
        raise DSMError(f"{path!r}: dsm-export's {label} engines run on {placement.instance_kind.upper()} instances only "
                       f"(--instance-kind {placement.instance_kind})")
    if ort_tensorrt and not placement.accelerator:
        raise DSMError(f"{path!r}: the ONNX Runtime TensorRT accelerator applies to .onnx models only")
    kind = given or placement.instance_kind
    if ort_tensorrt and kind != "gpu":
        raise DSMError("the ONNX Runtime TensorRT accelerator needs --instance-kind gpu")
    return kind


def _io(engine: EngineFile) -> tuple[list, list]:
    """Inputs and outputs (name, Triton type, dims with -1 for a dynamic batch): pixels in, logits or
    embeddings out, float32 (every dsm-export engine keeps fp32 inputs and outputs)."""
    batch = engine.static_batch or -1
    return ([(engine.input_name, "TYPE_FP32", [batch, *engine.info.input_size])],
            [(engine.output_name, "TYPE_FP32", [batch, *engine.output_dims])])


def model_config(path: str, name: str, max_batch: int = 64, preferred=(8, 16, 32), instances: int = 1,
                 queue_delay_us: int = 2000, instance_kind: str | None = None,
                 ort_tensorrt: str | None = None, workspace_mib: int = 1024, notes_out: list | None = None):
    """The ``ModelConfig`` protobuf for an ``.onnx`` or ``.plan`` file.

    Args:
        path: the file.
        name: the model name.
        max_batch: ``max_batch_size`` (capped at a plan's profile maximum).
        preferred: preferred batch sizes of the dynamic batcher.
        instances: instances in the instance group.
        queue_delay_us: the dynamic batcher's maximum queue delay (µs).
        instance_kind: ``cpu`` or ``gpu``; None: ``gpu`` for plans, ``cpu`` for ONNX.
        ort_tensorrt: ONNX only: ``fp32`` or ``fp16`` turns on ONNX Runtime's TensorRT execution
            accelerator with that ``precision_mode`` (needs ``gpu`` instances); None leaves it off.
        workspace_mib: the accelerator's ``max_workspace_size_bytes``, in MiB.
        notes_out: where to append one-line notes on what the config cannot express (an fp32
            OpenVINO IR, whose precision Triton's OpenVINO backend cannot pin to f32).

    Raises:
        DSMError: unknown file type, a file dsm-export did not write, a plan on CPU instances, the
            TensorRT accelerator without GPU instances or for a plan, a plan whose profile does not
            start at batch 1 under dynamic batching, or an element type Triton cannot express.
    """
    pb2 = _model_config_pb2()
    if instance_kind is not None and instance_kind not in INSTANCE_KINDS:
        raise DSMError(f"instance kind must be one of {', '.join(INSTANCE_KINDS)}, got {instance_kind!r}")
    if ort_tensorrt is not None and ort_tensorrt not in ORT_TENSORRT_PRECISIONS:
        raise DSMError(f"ONNX Runtime TensorRT precision must be fp32 or fp16, got {ort_tensorrt!r}")
    engine = read_engine(path)
    backend = backend_for(path)
    if backend.triton is None:
        raise DSMError(f"{path!r}: Triton Inference Server has no backend for {backend.label} engines")
    placement = backend.triton(engine)
    cfg = pb2.ModelConfig(name=name, platform=placement.platform, backend=placement.backend)
    for key, value in placement.parameters.items():
        cfg.parameters[key].string_value = value
    instance_kind = _instance_kind(path, placement, instance_kind, ort_tensorrt, backend.label)
    if placement.max_batch:
        max_batch = min(max_batch, placement.max_batch)
    inputs, outputs = _io(engine)
    kind = pb2.ModelInstanceGroup.KIND_GPU if instance_kind == "gpu" else pb2.ModelInstanceGroup.KIND_CPU
    dynamic = inputs[0][2][0] == -1
    if placement.min_batch > 1:
        check_plan_batching({"min": [placement.min_batch]}, dynamic, path)
    cfg.max_batch_size = max_batch if dynamic else 0
    for spec, target in ((inputs, cfg.input), (outputs, cfg.output)):
        for tname, dtype, dims in spec:
            t = target.add(name=tname, data_type=getattr(pb2, dtype))
            t.dims.extend(dims[1:] if dynamic else dims)
    if dynamic:
        cfg.dynamic_batching.preferred_batch_size.extend([b for b in preferred if b <= max_batch])
        cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    cfg.instance_group.add(count=instances, kind=kind)
    if ort_tensorrt:
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        acc.parameters["precision_mode"] = ort_tensorrt.upper()
        acc.parameters["max_workspace_size_bytes"] = str(workspace_mib << 20)
    if notes_out is not None:
        notes_out.extend(note.format(name=name) for note in placement.notes)
    return cfg


def source_info(path: str):
    """The dsm-export metadata (:class:`ExportInfo`) of an engine of any registered backend."""
    return read_engine(path).info


def refuse_random_init(files: list[str], what: str) -> None:
    """Refuse files exported from randomly initialised weights (almost always a forgotten --weights).

    ``instance_kind`` and ``ort_tensorrt`` as for :func:`model_config`. Every config is made before
    anything is written.

    Raises:
        DSMError: naming the first such file and the flag that allows it.
    """
    for f in files:
        if not source_info(f).weights_sha256:
            raise DSMError(f"{f!r} was exported without --weights (random init): {what} refuses it "
                           "unless --allow-random-init is given")


def write_repository(files: list[str], repo: str, max_batch: int = 64, instances: int = 1,
                     instance_kind: str | None = None, ort_tensorrt: str | None = None,
                     allow_random_init: bool = False, notes_out: list | None = None) -> list[str]:
    """Write a model repository holding ``files``; returns the model names.

    Each file goes to ``<repo>/<name>/1/model.<ext>``; an OpenVINO ``.xml`` brings its ``.bin``
    (``model.bin``), an ONNX file with external data its data files, under the file names the
    model records (``vit.onnx`` -> ``1/model.onnx`` and ``1/vit.onnx.data``), copied first.

    Everything is read and checked before the first file is written; ``notes_out`` as for
    :func:`model_config`.

    Raises:
        DSMError: missing files, duplicate model names, files dsm-export did not write, or (without
            ``allow_random_init``) a file exported from random weights, and what :func:`model_config`
            refuses.
    """
    _model_config_pb2()  # without tritonclient: one line, before anything is written
    names = [model_name_for(f) for f in files]
    if len(set(names)) != len(names):
        raise DSMError(f"two files map to the same model name: {names}")
    for f in files:
        if not os.path.isfile(f):
            raise DSMError(f"{f!r} does not exist")
    if not allow_random_init:
        refuse_random_init(files, "triton-repo")
    configs = [model_config(f, n, max_batch=max_batch, instances=instances, instance_kind=instance_kind,
                            ort_tensorrt=ort_tensorrt, notes_out=notes_out) for f, n in zip(files, names)]
    placements = [backend_for(f).triton(read_engine(f)) for f in files]
    for f, name, cfg, placement in zip(files, names, configs, placements):
        os.makedirs(os.path.join(repo, name, "1"), exist_ok=True)
        for source, target in placement.files:  # the engine file last: it is what makes the model readable
            copy_file(source, os.path.join(repo, name, "1", target))
        with atomic_path(os.path.join(repo, name, "config.pbtxt")) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text_format.MessageToString(cfg))
    return names
