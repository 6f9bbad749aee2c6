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

from ..errors import DSMError
from ..graph.export import load_onnx, read_metadata
from ..graph.onnx_file import model_files
from ..fileio import atomic_path

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


def _pb2():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise DSMError("triton-repo needs tritonclient: pip install 'dsm-export[serve]'") from None
    return model_config_pb2, text_format


def model_name_for(path: str) -> str:
    """A Triton model name from a file name (letters, digits, ``_`` and ``-``)."""
    stem = os.path.basename(path).split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "model"


def _io_from_onnx(path: str):
    model = load_onnx(path, weights=False)
    read_metadata(model, path)
    inputs, outputs = [], []
    for vals, out in ((model.graph.input, inputs), (model.graph.output, outputs)):
        for v in vals:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append((v.name, triton_dtype(t.elem_type, f"{path!r} tensor {v.name!r}"), dims))
    return inputs, outputs


def _io_from_plan(path: str):
    from ..engines import engine_info

    info, sidecar = engine_info(path)
    c, h, w = info.input_size
    batch = info.batch or -1
    classes = int(sidecar.get("num_classes", 1000))
    output = sidecar.get("output") or info.output
    return [("pixel_values", "TYPE_FP32", [batch, c, h, w])], [(output, "TYPE_FP32", [batch, classes])], sidecar


def _io_from_ir(path: str):
    """Inputs, outputs (name, Triton type, dims with -1 for a dynamic batch) and the metadata of an IR."""
    from ..engines.openvino import read_ir

    model, _, meta = read_ir(path)
    types = {"f32": "TYPE_FP32", "f16": "TYPE_FP16", "bf16": "TYPE_BF16", "i64": "TYPE_INT64", "i32": "TYPE_INT32"}
    spec = []
    for ports in (model.inputs, model.outputs):
        io = []
        for port in ports:
            kind = port.get_element_type().to_string()
            if kind not in types:
                raise DSMError(f"{path!r} tensor {port.get_any_name()!r} has element type {kind}, which Triton cannot express")
            dims = [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()]
            io.append((port.get_any_name(), types[kind], dims))
        spec.append(io)
    return spec[0], spec[1], meta


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


def _engine_instances(path: str, what: str, kind: str, given: str | None, ort_tensorrt: str | None) -> str:
    """``kind``, the only instance kind an engine file runs on; refuse another and the ONNX Runtime
    TensorRT accelerator (an .onnx-only option)."""
    if given not in (None, kind):
        raise DSMError(f"{path!r}: {what} on {kind.upper()} instances only (--instance-kind {kind})")
    if ort_tensorrt:
        raise DSMError(f"{path!r}: the ONNX Runtime TensorRT accelerator applies to .onnx models only")
    return kind


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
    pb2, _ = _pb2()
    if instance_kind is not None and instance_kind not in INSTANCE_KINDS:
        raise DSMError(f"instance kind must be one of {', '.join(INSTANCE_KINDS)}, got {instance_kind!r}")
    if ort_tensorrt is not None and ort_tensorrt not in ORT_TENSORRT_PRECISIONS:
        raise DSMError(f"ONNX Runtime TensorRT precision must be fp32 or fp16, got {ort_tensorrt!r}")
    cfg = pb2.ModelConfig(name=name)
    sidecar = None
    notes = []
    if path.endswith(".xml"):
        inputs, outputs, meta = _io_from_ir(path)
        cfg.backend = "openvino"
        instance_kind = _engine_instances(path, "dsm-export's OpenVINO engines run", "cpu", instance_kind, ort_tensorrt)
        if meta.get("inference_precision") == "bf16":
            cfg.parameters["HINT_BF16"].string_value = "YES"
        elif meta.get("precision") in ("fp32", None):
            notes.append(f"{name}: Triton's OpenVINO backend cannot ask for f32 (only HINT_BF16); on a CPU with "
                         "bf16 this fp32 engine runs in bf16 there, as OpenVINO's default compile does")
    elif path.endswith(".plan"):
        inputs, outputs, sidecar = _io_from_plan(path)
        if sidecar.get("flavour") == "rtx":
            raise DSMError(f"{path!r} is a TensorRT-RTX engine: Triton's TensorRT backend (tensorrt_plan) loads "
                           "full-TensorRT plans only; give triton-repo the .onnx (ONNX Runtime backend) or build "
                           "the plan with --tensorrt enterprise on the serving GPU")
        cfg.platform = "tensorrt_plan"
        instance_kind = _engine_instances(path, "a TensorRT plan runs", "gpu", instance_kind, ort_tensorrt)
        if sidecar.get("profile"):
            max_batch = min(max_batch, sidecar["profile"]["max"][0])
    elif path.endswith(".onnx"):
        inputs, outputs = _io_from_onnx(path)
        cfg.platform = "onnxruntime_onnx"
        instance_kind = instance_kind or "cpu"
        if ort_tensorrt and instance_kind != "gpu":
            raise DSMError("the ONNX Runtime TensorRT accelerator needs --instance-kind gpu")
    else:
        raise DSMError(f"{path!r}: expected an .onnx, .plan or OpenVINO .xml file")
    kind = pb2.ModelInstanceGroup.KIND_GPU if instance_kind == "gpu" else pb2.ModelInstanceGroup.KIND_CPU
    dynamic = inputs[0][2][0] == -1
    if sidecar is not None:
        check_plan_batching(sidecar.get("profile"), dynamic, path)
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
        notes_out.extend(notes)
    return cfg


def source_info(path: str):
    """The dsm-export metadata of an ``.onnx`` file, an OpenVINO ``.xml`` or a ``.plan``'s source (:class:`ExportInfo`)."""
    if path.endswith(".xml"):
        from ..engines.openvino import read_ir_metadata

        return read_ir_metadata(path)[0]
    if path.endswith(".plan"):
        from ..engines import engine_info

        return engine_info(path)[0]
    return read_metadata(load_onnx(path, weights=False), path)


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
    from ..engines import copy_file

    _, text_format = _pb2()
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
    for f, name, cfg in zip(files, names, configs):
        os.makedirs(os.path.join(repo, name, "1"), exist_ok=True)
        ext = f.rsplit(".", 1)[-1]
        if ext == "xml":  # the weights first: the .xml is what makes the model readable
            copy_file(f[:-4] + ".bin", os.path.join(repo, name, "1", "model.bin"))
        if ext == "onnx":  # external data files first, under the names the model records
            for data in model_files(f)[1:]:
                copy_file(data, os.path.join(repo, name, "1", os.path.basename(data)))
        copy_file(f, os.path.join(repo, name, "1", f"model.{ext}"))
        with atomic_path(os.path.join(repo, name, "config.pbtxt")) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text_format.MessageToString(cfg))
    return names
