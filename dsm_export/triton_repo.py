"""Triton Inference Server model repositories for DSM engines.

Writes ``<repo>/<name>/config.pbtxt`` and ``<repo>/<name>/1/model.onnx`` (platform
``onnxruntime_onnx``) or ``<repo>/<name>/1/model.plan`` (``tensorrt_plan``). The config is built as
Triton's own ``ModelConfig`` protobuf (``tritonclient.grpc.model_config_pb2``) and printed with
``google.protobuf.text_format``: ``max_batch_size`` with dims that leave out the batch axis, dynamic
batching with preferred batch sizes, and an instance group; a fixed-batch export gets
``max_batch_size: 0`` and full dims.
"""

from __future__ import annotations

import os
import re

import onnx

from .errors import DSMError
from .export import load_onnx, read_metadata
from .fileio import atomic_path

_DTYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}


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
    model = load_onnx(path)
    read_metadata(model, path)
    inputs, outputs = [], []
    for vals, out in ((model.graph.input, inputs), (model.graph.output, outputs)):
        for v in vals:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out.append((v.name, _DTYPES.get(t.elem_type, "TYPE_FP32"), dims))
    return inputs, outputs


def _io_from_plan(path: str):
    from .engines import engine_info

    info, sidecar = engine_info(path)
    c, h, w = info.input_size
    batch = info.batch or -1
    classes = int(sidecar.get("num_classes", 1000))
    return [("pixel_values", "TYPE_FP32", [batch, c, h, w])], [("logits", "TYPE_FP32", [batch, classes])], sidecar


def model_config(path: str, name: str, max_batch: int = 64, preferred=(8, 16, 32), instances: int = 1,
                 queue_delay_us: int = 2000):
    """The ``ModelConfig`` protobuf for an ``.onnx`` or ``.plan`` file.

    Raises:
        DSMError: unknown file type, or a file dsm-export did not write.
    """
    pb2, _ = _pb2()
    cfg = pb2.ModelConfig(name=name)
    if path.endswith(".plan"):
        inputs, outputs, sidecar = _io_from_plan(path)
        cfg.platform = "tensorrt_plan"
        kind = pb2.ModelInstanceGroup.KIND_GPU
        if sidecar.get("profile"):
            max_batch = min(max_batch, sidecar["profile"]["max"][0])
    elif path.endswith(".onnx"):
        inputs, outputs = _io_from_onnx(path)
        cfg.platform = "onnxruntime_onnx"
        kind = pb2.ModelInstanceGroup.KIND_CPU
    else:
        raise DSMError(f"{path!r}: expected an .onnx or .plan file")
    dynamic = inputs[0][2][0] == -1
    cfg.max_batch_size = max_batch if dynamic else 0
    for spec, target in ((inputs, cfg.input), (outputs, cfg.output)):
        for tname, dtype, dims in spec:
            t = target.add(name=tname, data_type=getattr(pb2, dtype))
            t.dims.extend(dims[1:] if dynamic else dims)
    if dynamic:
        cfg.dynamic_batching.preferred_batch_size.extend([b for b in preferred if b <= max_batch])
        cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    cfg.instance_group.add(count=instances, kind=kind)
    return cfg


def source_info(path: str):
    """The dsm-export metadata of an ``.onnx`` file or of a ``.plan``'s source (:class:`ExportInfo`)."""
    if path.endswith(".plan"):
        from .engines import engine_info

        return engine_info(path)[0]
    return read_metadata(load_onnx(path), path)


def refuse_random_init(files: list[str], what: str) -> None:
    """Refuse files exported from randomly initialised weights (almost always a forgotten --weights).

    Raises:
        DSMError: naming the first such file and the flag that allows it.
    """
    for f in files:
        if not source_info(f).weights_sha256:
            raise DSMError(f"{f!r} was exported without --weights (random init): {what} refuses it "
                           "unless --allow-random-init is given")


def write_repository(files: list[str], repo: str, max_batch: int = 64, instances: int = 1,
                     allow_random_init: bool = False) -> list[str]:
    """Write a model repository holding ``files``; returns the model names.

    Everything is read and checked before the first file is written.

    Raises:
        DSMError: missing files, duplicate model names, files dsm-export did not write, or (without
            ``allow_random_init``) a file exported from random weights.
    """
    from .engines import copy_file

    _, text_format = _pb2()
    names = [model_name_for(f) for f in files]
    if len(set(names)) != len(names):
        raise DSMError(f"two files map to the same model name: {names}")
    for f in files:
        if not os.path.isfile(f):
            raise DSMError(f"{f!r} does not exist")
    if not allow_random_init:
        refuse_random_init(files, "triton-repo")
    configs = [model_config(f, n, max_batch=max_batch, instances=instances) for f, n in zip(files, names)]
    for f, name, cfg in zip(files, names, configs):
        os.makedirs(os.path.join(repo, name, "1"), exist_ok=True)
        ext = "plan" if f.endswith(".plan") else "onnx"
        copy_file(f, os.path.join(repo, name, "1", f"model.{ext}"))
        with atomic_path(os.path.join(repo, name, "config.pbtxt")) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text_format.MessageToString(cfg))
    return names
