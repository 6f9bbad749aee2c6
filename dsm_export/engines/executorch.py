"""ExecuTorch engines (``.pte`` + ``.pte.json`` sidecar) for phones and edge CPUs, through the XNNPACK
delegate.

An ExecuTorch program is made from PyTorch, not from ONNX, so ``build`` takes the fp32 ONNX file of
``dsm-export export`` for what it records (model, schedule, weights, batch, input size, classes, last
block form; :func:`dsm_export.graph.export.read_metadata`) and rebuilds the module that export traced:
:func:`dsm_export.core.models.create_model` with the recorded weights (their sha256 checked), then
:func:`dsm_export.core.patch.apply` with ``impl="export"`` and the recorded last-block form, as
:func:`dsm_export.graph.export.export_model` does. That module goes through ``torch.export.export``
with a static input of the file's batch (1 where the ONNX batch axis is dynamic),
``to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` and ``to_executorch``. The ops XNNPACK
takes (linear, matmul, softmax, layer norm, GELU, ...) run in its delegate; the rest (top-k, argmax,
gathers of the matching) in ExecuTorch's portable CPU kernels.

* ``fp32``: the program as traced.
* ``int8``: PyTorch's PT2E post-training static quantization (``prepare_pt2e``/``convert_pt2e`` of
  torchao) with ExecuTorch's ``XNNPACKQuantizer``, set per operator type for ``aten.linear`` and
  ``aten.conv2d`` only (:data:`QUANTIZED_OPS`): weights int8 per output channel, activations int8 per
  tensor, calibrated on images through the model's timm eval transform. The quantizer's global
  config is left unset on purpose: set globally it would also quantize ``add``, ``mul`` and ``cat``,
  which here are the size-weighted merge, the size bookkeeping and the window reassembly. So, as in
  the ONNX Runtime and OpenVINO INT8 paths, the matching and size path (key mean over heads,
  normalisation, the similarity matmul, top-k/argmax, the one-hot assignment matmul, sizes and
  ``log(size)``) and the attention matmuls (``q @ k^T``, ``attn @ v``, activation by activation)
  stay fp32, and which tokens merge is decided in fp32 on keys computed by INT8 linears. Each
  linear's output is quantized too: XNNPACK's partitioner takes a static INT8 linear only with a
  quantize node after it (its kernel writes int8), so the keys carry the int8 rounding of the ``qkv``
  output. For calibration the module is traced with a dynamic batch axis and the images run in
  chunks of :data:`CALIBRATION_BATCH` (each image seen once, whatever the engine's batch); the
  quantized module is traced again at the static batch for lowering. DeiT-Tiny under
  ``r=34,r_end=0,delay=3,local=1``, 64 calibration images, 192 other photos: top-1 equal to fp32
  PyTorch on 93.2 %, KL 0.037 (calibrated one image at a time instead: KL 0.047).

The sidecar ``<file>.pte.json`` holds the ONNX file's dsm-export metadata verbatim (``onnx_metadata``,
read back into an :class:`~dsm_export.graph.export.ExportInfo` as the TensorRT sidecar is), the source
file relative to the program, the precision, ExecuTorch and torch versions, the static batch, input and
output names and dimensions, what XNNPACK took, the quantization record and the program's size. It is
written first and the program last (atomically), so a ``.pte`` never lacks its sidecar; a sidecar whose
recorded size is not the program's (a build that failed while writing over an older program) is
refused.

ExecuTorch and torchao are optional (the ``executorch`` extra): imported only inside the functions
that need them, through :func:`~dsm_export.engines.registry.import_optional`.

Sources: ExecuTorch docs, "Exporting to ExecuTorch", "XNNPACK Backend" (partitioner, quantization with
``XNNPACKQuantizer``), "Runtime Python API" (``executorch.runtime``); PyTorch docs, "PyTorch 2 Export
Post Training Quantization".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import operator
import os
import threading
import time
import weakref
from collections import Counter

import numpy as np
import onnx
import torch

from .. import checks
from ..core.models import create_model, is_embedding_model, pretrained_file, sha256_file
from ..core.patch import apply, input_size
from ..errors import DSMError
from ..fileio import atomic_path, write_json
from ..graph.export import INPUT_NAME, ExportInfo, load_onnx, read_metadata, weights_path
from ..graph.facts import is_quantized, precision_of
from ..graph.metadata import proto_with_props, read_props
from .int8.quantize import calibration_pixels, images_sha256
from .registry import (
    Backend, BuildRecord, BuildRequest, EngineFile, RunnerOptions, import_optional, pad_batches, register,
)

PRECISIONS = ("fp32", "int8")
EXTRA = "executorch"
SIDECAR_FORMAT = "dsm-export executorch sidecar 1"
METHOD = "forward"
# The ATen ops whose weight layers INT8 quantizes (timm's nn.Linear and the patch embedding's Conv2d).
QUANTIZED_OPS = ("aten.linear.default", "aten.conv2d.default")
# Calibration images per forward pass of the observed module.
CALIBRATION_BATCH = 16
# ExecuTorch programs are flatbuffers with the file identifier "ET" + two digits at bytes 4..8.
_MAGIC_AT = slice(4, 6)
_MAGIC = b"ET"
# ExecuTorch's thread pool is one per process: runners take turns on it (and resize it under this lock).
_RUN_LOCK = threading.Lock()


def sidecar_path(pte_path: str) -> str:
    """The JSON sidecar beside a program: ``<file>.pte.json``."""
    return pte_path + ".json"


def executorch_version() -> str:
    """The installed ExecuTorch release (``1.5.1``), without the local ``+cpu`` tag.

    Raises:
        DSMError: ExecuTorch is not installed (names the extra).
    """
    version = import_optional("executorch.version", EXTRA, "ExecuTorch")
    return str(version.__version__).split("+")[0]


# ------------------------------------------------------------------------------------------ the model
def rebuild_module(info: ExportInfo, onnx_path: str) -> torch.nn.Module:
    """The module ``dsm-export export`` traced for ``onnx_path``, rebuilt from its metadata.

    The timm model is created with the weights the export recorded (timm's pretrained weights, or
    the local file relative to the ONNX file's folder, its sha256 checked), and wrapped as
    :func:`dsm_export.graph.export.export_model` wraps it: :func:`dsm_export.core.patch.apply` with
    ``impl="export"`` and the recorded last-block form.

    Returns:
        The :class:`~dsm_export.core.patch.MergedViT` in eval mode: ``[B, C, H, W]`` float32 ->
        ``[B, classes]`` logits (or ``[B, dim]`` embeddings).

    Raises:
        DSMError: a graph exported from random weights (nothing to rebuild), a weights file missing or
            not the one the graph was exported from, a model whose input size, output kind or token
            counts differ from the file's.
    """
    if info.pretrained:
        model = create_model(info.model, None, pretrained=True, num_classes=info.num_classes, output=info.output)
        cached = pretrained_file(model)
        if info.weights_sha256 and cached and os.path.isfile(cached) and sha256_file(cached) != info.weights_sha256:
            raise DSMError(f"timm's pretrained weights for {info.model} ({cached}) are not the ones "
                           f"{onnx_path!r} was exported from (sha256 {info.weights_sha256[:12]}...)")
    elif info.weights:
        path = weights_path(info, onnx_path)
        if not os.path.isfile(path):
            raise DSMError(f"weights file {path!r} recorded in {onnx_path!r} does not exist (the ExecuTorch "
                           "program is made from PyTorch, which needs them)")
        if info.weights_sha256 and sha256_file(path) != info.weights_sha256:
            raise DSMError(f"weights {path!r} are not the ones {onnx_path!r} was exported from "
                           f"(sha256 {info.weights_sha256[:12]}...)")
        model = create_model(info.model, path, num_classes=info.num_classes, output=info.output)
    else:
        raise DSMError(f"{onnx_path!r} was exported from randomly initialised weights: an ExecuTorch program "
                       "is made from PyTorch, which cannot rebuild them (export with --weights or --pretrained)")
    if tuple(input_size(model)) != tuple(info.input_size):
        raise DSMError(f"{onnx_path!r} takes {info.input_size} inputs but {info.model} takes {input_size(model)}")
    if is_embedding_model(model) != info.embeddings:
        raise DSMError(f"{onnx_path!r} outputs {info.output} but {info.model} (num_classes {model.num_classes}) "
                       "does not")
    merged = apply(model, info.schedule, impl="export", name=info.model,
                   full_last_block=info.last_block != "prefix").eval()
    tokens = tuple(t.tokens_out for t in merged.tokens)
    if info.tokens and tokens != tuple(info.tokens):
        raise DSMError(f"{onnx_path!r} records tokens per block {list(info.tokens)} but this dsm-export gives "
                       f"{list(tokens)} for its schedule: export it again with this version")
    return merged


def _quantizer():
    """ExecuTorch's XNNPACK quantizer set for the weight layers alone (:data:`QUANTIZED_OPS`):
    weights int8 symmetric per output channel, activations int8 per tensor (histogram observer)."""
    xq = import_optional("executorch.backends.xnnpack.quantizer.xnnpack_quantizer", EXTRA, "ExecuTorch")

    class WeightLayersQuantizer(xq.XNNPACKQuantizer):
        def transform_for_annotation(self, model):
            # XNNPACKQuantizer lifts every scalar operand of add/mul into a float32 buffer before
            # annotating (pytorch/executorch#22062, still so in 1.5.1), which turns the windowed merge's
            # int64 index arithmetic into float and breaks its gathers. Only linear and conv are
            # annotated here, so no scalar needs lifting.
            return model

    config = xq.get_symmetric_quantization_config(is_per_channel=True)
    quantizer = WeightLayersQuantizer()
    for name in QUANTIZED_OPS:
        packet, overload = name.split(".")[1:]
        quantizer.set_operator_type(getattr(getattr(torch.ops.aten, packet), overload), config)
    return quantizer


def quantize_module(module: torch.nn.Module, example: torch.Tensor, pixels: np.ndarray):
    """PT2E static INT8 of a module's weight layers (:data:`QUANTIZED_OPS`), calibrated on ``pixels``.

    The module is traced for calibration with a dynamic batch axis, so that the calibration images
    run in chunks of :data:`CALIBRATION_BATCH` whatever the engine's batch (none repeated), and the
    quantized module is traced again at ``example``'s static shape for lowering.

    Args:
        module: the module to quantize (:func:`rebuild_module`).
        example: the engine's static input, ``[batch, C, H, W]``.
        pixels: calibration images ``[N, C, H, W]`` float32.

    Returns:
        ``(exported program of the quantized module at example's shape, {op: layers quantized})``,
        e.g. ``{"conv2d": 1, "linear": 49}``.

    Raises:
        DSMError: ExecuTorch or torchao missing.
    """
    pt2e = import_optional("torchao.quantization.pt2e.quantize_pt2e", EXTRA, "torchao (ExecuTorch's quantizer)")
    _, c, h, w = example.shape
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        traced = torch.export.export(module, (torch.zeros(2, c, h, w),), dynamic_shapes=({0: batch},))
    prepared = pt2e.prepare_pt2e(traced.module(), _quantizer())
    with torch.no_grad():
        for start in range(0, len(pixels), CALIBRATION_BATCH):
            prepared(torch.from_numpy(np.ascontiguousarray(pixels[start:start + CALIBRATION_BATCH], dtype=np.float32)))
    converted = pt2e.convert_pt2e(prepared)
    counts: Counter = Counter()
    for node in converted.graph.nodes:
        if node.op == "call_function" and str(node.target) in QUANTIZED_OPS and any(
                "dequantize" in str(getattr(a, "target", "")) for a in node.args[:2]):
            counts[str(node.target).split(".")[1]] += 1
    with torch.no_grad():
        program = torch.export.export(converted, (example,))
    return program, dict(sorted(counts.items()))


def delegation(graph_module) -> dict:
    """What the XNNPACK partitioner took, read from a lowered edge program's graph.

    Returns:
        ``{"delegated_subgraphs", "delegated_nodes", "non_delegated_nodes", "non_delegated_ops"}``:
        ops inside delegate calls, ops left to ExecuTorch's own kernels, and those by op name
        (``{"aten.topk.default": 3, ...}``); ``getitem`` (tuple unpacking) is not counted.
    """
    subgraphs = delegated = 0
    others: Counter = Counter()
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if getattr(node.target, "__name__", "") == "executorch_call_delegate":
            subgraphs += 1
            lowered = getattr(graph_module, node.args[0].target)
            delegated += sum(1 for n in lowered.original_module.graph.nodes
                             if n.op == "call_function" and n.target is not operator.getitem)
            continue
        name = str(getattr(node.target, "_name", None) or getattr(node.target, "__name__", node.target))
        others[name.split("::")[-1] if "::" in name else name] += 1
    return {"delegated_subgraphs": subgraphs, "delegated_nodes": delegated,
            "non_delegated_nodes": sum(others.values()), "non_delegated_ops": dict(sorted(others.items()))}


# ------------------------------------------------------------------------------------------- build
def _source(path: str) -> tuple[onnx.ModelProto, ExportInfo]:
    """The ONNX file's graph (weights left on disk) and metadata; refuses anything but fp32.

    Raises:
        DSMError: not a dsm-export file, or a quantized or fp16/bf16 file.
    """
    model = load_onnx(path, weights=False)
    info = read_metadata(model, path)
    if is_quantized(model):
        raise DSMError(f"{path!r} is quantized: an ExecuTorch program is made from the fp32 file of "
                       "'dsm-export export' (--precision int8 quantizes it in PyTorch)")
    stored = precision_of(model)["precision"]
    if stored != "fp32":
        raise DSMError(f"{path!r} is {stored}: an ExecuTorch program is made from the fp32 file of 'dsm-export export'")
    return model, info


def check_build(request: BuildRequest) -> None:
    """Refuse an ExecuTorch build request before any work (one line).

    Raises:
        DSMError: ExecuTorch not installed, calibration images given for fp32 or missing for int8,
            a backend option (ExecuTorch takes none), the sidecar not writable.
    """
    if importlib.util.find_spec("executorch") is None:
        raise DSMError(f"ExecuTorch is not installed: pip install 'dsm-export[{EXTRA}]'")
    if request.options:
        raise DSMError(f"--backend executorch takes no {', '.join('--' + k.replace('_', '-') for k in request.options)}")
    if request.precision == "int8":
        if not request.calibration:
            raise DSMError("--backend executorch --precision int8 needs calibration images: --calibration DIR")
        if not os.path.isdir(request.calibration):
            raise DSMError(f"calibration folder {request.calibration!r} does not exist")
        if request.calibration_count < 1:
            raise DSMError(f"--calibration-count must be at least 1, got {request.calibration_count}")
    elif request.calibration:
        raise DSMError("--calibration applies to --precision int8 only")
    checks.output_file(sidecar_path(request.output), "--output sidecar")


def build(request: BuildRequest, log=print) -> BuildRecord:
    """Build an ExecuTorch program (``.pte``) and its sidecar (``.pte.json``) from an fp32 export.

    Args:
        request: ``source`` the fp32 ONNX file of ``dsm-export export`` (its weights must be on disk,
            or be timm's pretrained ones); ``output`` the ``.pte``; ``precision`` ``fp32`` or ``int8``
            (``calibration``: an image folder, its first ``calibration_count`` images).
        log: prints progress lines.

    Returns:
        The :class:`BuildRecord`: files ``[.pte, .pte.json]``, the lines ``build`` prints, and the
        sidecar as ``details``.

    Raises:
        DSMError: what :func:`check_build` refuses, a file that is not an fp32 dsm-export file, weights
            that cannot be rebuilt (:func:`rebuild_module`), or ExecuTorch failing to export or lower
            (its first line).
    """
    check_build(request)
    exir = import_optional("executorch.exir", EXTRA, "ExecuTorch")
    partition = import_optional("executorch.backends.xnnpack.partition.xnnpack_partitioner", EXTRA, "ExecuTorch")
    version = executorch_version()
    onnx_model, info = _source(request.source)
    batch = info.batch or 1
    start = time.perf_counter()
    module = rebuild_module(info, request.source)
    c, h, w = info.input_size
    example = torch.zeros(batch, c, h, w)
    program, quantization = _export_program(module, example, request, info, log)
    export_seconds = time.perf_counter() - start
    log("lowering to ExecuTorch with the XNNPACK partitioner")
    t0 = time.perf_counter()
    try:
        edge = exir.to_edge_transform_and_lower(program, partitioner=[partition.XnnpackPartitioner()])
        delegated = delegation(edge.exported_program().graph_module)
        data = bytes(edge.to_executorch().buffer)
    except Exception as exc:  # noqa: BLE001 - ExecuTorch's lowering raises many types
        raise DSMError(f"ExecuTorch could not lower {info.model} to XNNPACK: {_first_line(exc)}") from None
    lower_seconds = time.perf_counter() - t0
    out = onnx_model.graph.output[0]
    output_dims = [int(d.dim_value) for d in out.type.tensor_type.shape.dim[1:]]
    folder = os.path.dirname(os.path.abspath(request.output))
    sidecar = {
        "format": SIDECAR_FORMAT,
        "backend": "executorch",
        "executorch_version": version,
        "torch_version": torch.__version__.split("+")[0],
        "precision": request.precision,
        "delegate": "XnnpackBackend",
        "batch": batch,
        "input_name": INPUT_NAME,
        "input_shape": [batch, c, h, w],
        "output_name": out.name,
        "output_dims": output_dims,
        **delegated,
        "quantization": quantization,
        "export_seconds": round(export_seconds, 2),
        "lower_seconds": round(lower_seconds, 2),
        "build_seconds": round(time.perf_counter() - start, 2),
        "pte_bytes": len(data),
        "source_onnx": _relative(request.source, folder),
        "onnx_metadata": read_props(onnx_model),
    }
    write_json(sidecar_path(request.output), sidecar)
    with atomic_path(request.output) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return BuildRecord("executorch", request.precision, request.output,
                       [request.output, sidecar_path(request.output)], _summary(request.output, sidecar), sidecar)


def _export_program(module: torch.nn.Module, example: torch.Tensor, request: BuildRequest, info, log):
    """``(program, quantization)``: ``torch.export`` of the rebuilt module at ``example``'s shape
    ``[batch, 3, H, W]``, PT2E-quantized for XNNPACK when ``request.precision`` is int8 (the
    quantization record for the sidecar, None for fp32). Raises DSMError on any failure (a bug)."""
    try:
        if request.precision == "int8":
            pixels, files = calibration_pixels(info.model, request.calibration, request.calibration_count)
            log(f"quantizing {info.model} ({info.schedule.spec()}) to INT8 with PT2E (XNNPACK quantizer), "
                f"calibrated on {len(pixels)} images")
            program, counts = quantize_module(module, example, pixels)
            quantization = {
                "method": "pt2e static", "quantizer": "XNNPACKQuantizer", "ops": list(QUANTIZED_OPS),
                "quantized": counts, "weights": "int8 symmetric per output channel",
                "activations": "int8 per tensor (histogram observer), linear outputs included",
                "calibration_count": len(pixels), "calibration_sha256": images_sha256(files),
                "fp32": "matching and size path, attention matmuls, layer norms, softmax, GELU",
            }
        else:
            log(f"exporting {info.model} ({info.schedule.spec()}) with torch.export at batch {example.shape[0]}")
            with torch.no_grad():
                program = torch.export.export(module, (example,))
            quantization = None
    except DSMError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.export and PT2E raise many types; a failure here is a bug
        raise DSMError(f"torch.export or PT2E quantization failed on {info.model} (a bug): {_first_line(exc)}") from None
    return program, quantization


def _summary(output: str, rec: dict) -> list[str]:
    """The lines ``dsm-export build`` prints for an ExecuTorch build."""
    total = rec["delegated_nodes"] + rec["non_delegated_nodes"]
    rest = ", ".join(f"{op.split('.')[0]} x{n}" for op, n in sorted(rec["non_delegated_ops"].items(),
                                                                     key=lambda kv: -kv[1])[:6])
    lines = [f"wrote {output} and {sidecar_path(output)}: ExecuTorch {rec['executorch_version']} program, "
             f"{rec['precision']}, static batch {rec['batch']}, {rec['pte_bytes'] / 2**20:.1f} MiB, "
             f"built in {rec['build_seconds']:.1f} s",
             f"  XNNPACK runs {rec['delegated_nodes']} of {total} ops in {rec['delegated_subgraphs']} delegated "
             f"subgraphs; ExecuTorch's portable kernels the other {rec['non_delegated_nodes']}"
             + (f" ({rest})" if rest else "")]
    q = rec.get("quantization")
    if q:
        done = ", ".join(f"{n} {op}" for op, n in sorted(q["quantized"].items()))
        lines.append(f"  int8: PT2E static quantization of the weight layers only ({done}; weights per channel, "
                     f"activations per tensor), calibrated on {q['calibration_count']} images; the matching and "
                     "size path and the attention matmuls stay fp32 (which tokens merge is not decided in INT8)")
    return lines


def _relative(path: str, folder: str) -> str:
    """``path`` relative to ``folder`` (portable when both move together), else absolute (another drive)."""
    try:
        return os.path.relpath(os.path.abspath(path), folder)
    except ValueError:
        return os.path.abspath(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -------------------------------------------------------------------------------------------- read
def read_sidecar(pte_path: str) -> dict:
    """The sidecar ``build`` wrote beside a program.

    Raises:
        DSMError: missing, unreadable, or not a dsm-export ExecuTorch sidecar.
    """
    path = sidecar_path(pte_path)
    if not os.path.isfile(path):
        raise DSMError(f"{path!r} is missing: dsm-export needs the sidecar 'build --backend executorch' writes "
                       "beside the .pte")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise DSMError(f"{path!r} is not a dsm-export sidecar: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise DSMError(f"{path!r} is not a dsm-export ExecuTorch sidecar")
    return data


def read_executorch_engine(pte_path: str) -> EngineFile:
    """What a program built by ``build --backend executorch`` says about itself, from its sidecar and
    header (no ExecuTorch needed).

    The :class:`~dsm_export.graph.export.ExportInfo` is the ONNX file's metadata with the batch the
    program is fixed at; ``source_path`` is the ONNX file it was built from (a relative weights path
    in the metadata is taken from its folder).

    Raises:
        DSMError: the program or its sidecar missing, a file that is not an ExecuTorch program, a
            sidecar that describes another build (its recorded size is not the program's).
    """
    checks.input_file(pte_path, "ExecuTorch program")
    sidecar = read_sidecar(pte_path)
    with open(pte_path, "rb") as fh:
        head = fh.read(8)
    if head[_MAGIC_AT] != _MAGIC:
        raise DSMError(f"{pte_path!r} is not an ExecuTorch program (no ET flatbuffer identifier)")
    size = os.path.getsize(pte_path)
    if sidecar.get("pte_bytes") != size:
        raise DSMError(f"{sidecar_path(pte_path)!r} describes a {sidecar.get('pte_bytes')}-byte program but "
                       f"{pte_path!r} has {size} bytes (a build that did not finish?): build it again")
    proto = proto_with_props(sidecar.get("onnx_metadata", {}), sidecar["output_name"])
    info = dataclasses.replace(read_metadata(proto, pte_path), batch=int(sidecar["batch"]))
    source = sidecar.get("source_onnx") or pte_path
    if not os.path.isabs(source):
        source = os.path.join(os.path.dirname(os.path.abspath(pte_path)), source)
    meta = {k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v))
            for k, v in sidecar.items() if k != "onnx_metadata" and v is not None}
    return EngineFile(
        path=pte_path, backend="executorch", info=info, precision=sidecar["precision"],
        input_name=sidecar.get("input_name", INPUT_NAME), output_name=sidecar["output_name"],
        output_dims=tuple(int(d) for d in sidecar["output_dims"]), static_batch=int(sidecar["batch"]),
        files=(pte_path, sidecar_path(pte_path)), source_path=source, meta=meta)


# ------------------------------------------------------------------------------------------ runner
_DEFAULT_THREADS: list[int] = []  # the pool's size before any runner resized it
_OPEN_RUNNERS: "weakref.WeakSet[ExecuTorchRunner]" = weakref.WeakSet()


def _size_threadpool(threads: int | None) -> int:
    """Set ExecuTorch's process-wide thread pool to ``threads`` (None: its size at first use) before a
    program is loaded; call it holding :data:`_RUN_LOCK`.

    XNNPACK keeps the pool a method was loaded with: resizing it (``_unsafe_reset_threadpool``) while a
    loaded method lives and then running that method deadlocked (ExecuTorch 1.5.1), while methods
    loaded after a resize run. So the pool is resized only while no runner of this module is open.

    Returns:
        The pool's size the new runner runs with.

    Raises:
        DSMError: ``threads`` differs from the size an open runner uses.
    """
    lib = import_optional("executorch.extension.pybindings.portable_lib", EXTRA, "ExecuTorch")
    current = int(lib._threadpool_get_thread_count())
    if not _DEFAULT_THREADS:
        _DEFAULT_THREADS.append(current)
    want = int(threads or _DEFAULT_THREADS[0])
    if want == current:
        return current
    if any(r.is_open for r in list(_OPEN_RUNNERS)):
        if threads is None:
            return current
        raise DSMError(f"ExecuTorch's thread pool is one per process and an open ExecuTorch runner uses it at "
                       f"{current} threads: close that runner before opening one at {threads} threads")
    lib._unsafe_reset_threadpool(want)
    return want


class ExecuTorchRunner:
    """Run a ``.pte`` built by :func:`build` in ExecuTorch's Python runtime on the CPU, as a
    :class:`~dsm_export.engines.registry.Runner`.

    Calling it maps ``[B, C, H, W]`` float32 (numpy) to ``[B, classes]`` logits (or ``[B, dim]``
    embeddings) float32 for any ``B``: the program's static batch is run in padded chunks
    (:func:`~dsm_export.engines.registry.pad_batches`).

    Args:
        pte_path: the program (its sidecar beside it).
        threads: threads of ExecuTorch's thread pool (XNNPACK's and the portable kernels'); None: the
            runtime's default (one per core), or the size open runners use. The pool is one per
            process: it is resized before the program loads, only while no other runner is open
            (:func:`_size_threadpool`), and runners take turns on it (a lock).

    Attributes:
        engine_file: the :class:`EngineFile` (``engine``: the same).
        judged_as: the precision the program was built at (``fp32`` or ``int8``).
        label: the runtime, delegate, thread count and static batch.

    Raises:
        DSMError: as :func:`read_executorch_engine`; ExecuTorch missing; ``threads`` below 1 or other
            than an open runner's; a program whose input is not the sidecar's shape, or that the
            runtime cannot load (its first line).
    """

    def __init__(self, pte_path: str, threads: int | None = None):
        self._method = self._program = None
        self.engine_file = read_executorch_engine(pte_path)
        runtime = import_optional("executorch.runtime", EXTRA, "ExecuTorch")
        if threads is not None and threads < 1:
            raise DSMError(f"threads must be at least 1, got {threads}")
        with _RUN_LOCK:
            self.threads = _size_threadpool(threads)
            try:
                self._program = runtime.Runtime.get().load_program(pte_path)
                self._method = self._program.load_method(METHOD)
            except Exception as exc:  # noqa: BLE001 - the runtime raises RuntimeError and ValueError
                self._program = None
                raise DSMError(f"ExecuTorch could not load {pte_path!r}: {_first_line(exc)}") from None
            if self._method is None:
                self._program = None
                raise DSMError(f"{pte_path!r} has no {METHOD!r} method")
            _OPEN_RUNNERS.add(self)
        want = [self.engine_file.static_batch, *self.engine_file.info.input_size]
        got = list(self._method.metadata.input_tensor_meta(0).sizes())
        if got != want:
            self.close()
            raise DSMError(f"{pte_path!r} takes {got} inputs but its sidecar says {want}: build it again")
        self.judged_as = self.engine_file.precision
        self.label = (f"ExecuTorch {self.engine_file.meta.get('executorch_version', '')} XNNPACK CPU, "
                      f"{self.threads} threads, static batch {self.engine_file.static_batch}")

    @property
    def engine(self) -> EngineFile:
        """The :class:`EngineFile` it runs (as :attr:`engine_file`)."""
        return self.engine_file

    @property
    def is_open(self) -> bool:
        """Whether its program is loaded (not yet closed)."""
        return self._method is not None

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        out = self._method.execute([torch.from_numpy(chunk)])
        return out[0].detach().numpy().astype(np.float32, copy=True)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """``[B, C, H, W]`` float32 -> ``[B, D]`` float32.

        Raises:
            DSMError: an input that is not ``[B, C, H, W]`` of the program's size; a closed runner.
        """
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.engine_file.info.input_size):
            raise DSMError(f"{self.engine_file.path!r} takes [B, {', '.join(map(str, self.engine_file.info.input_size))}] "
                           f"images, got {list(x.shape)}")
        if self._method is None:
            raise DSMError(f"{self.engine_file.path!r}: the runner is closed")
        with _RUN_LOCK:
            return pad_batches(x, self.engine_file.static_batch, self._run)

    def close(self) -> None:
        """Free the loaded method and program (then the thread pool may be resized for another runner)."""
        with _RUN_LOCK:
            self._method = self._program = None
            _OPEN_RUNNERS.discard(self)


def open_runner(pte_path: str, options: RunnerOptions) -> ExecuTorchRunner:
    """An :class:`ExecuTorchRunner` with ``options.threads``.

    Raises:
        DSMError: a provider other than ``cpu`` (ExecuTorch runs here on the CPU through XNNPACK), and
            what :class:`ExecuTorchRunner` raises.
    """
    if options.provider not in (None, "cpu"):
        raise DSMError("--provider is for ONNX files: an ExecuTorch program runs in ExecuTorch on the CPU (XNNPACK)")
    return ExecuTorchRunner(pte_path, options.threads)


def baseline(onnx_path: str, options: RunnerOptions, folder: str) -> ExecuTorchRunner:
    """``bench``'s unmerged engine: an fp32 program built from the unmerged fp32 export ``onnx_path``
    into ``folder`` (``<name>.pte`` and its sidecar), opened with ``options``.

    Raises:
        DSMError: as :func:`build` and :func:`open_runner`.
    """
    name = os.path.splitext(os.path.basename(onnx_path))[0] + ".pte"
    output = os.path.join(folder, name)
    build(BuildRequest(onnx_path, output, "fp32"), log=lambda line: None)
    return open_runner(output, options)


def _preflight(path: str) -> None:
    checks.input_file(path, "ExecuTorch program")
    read_sidecar(path)


BACKEND = register(Backend(
    name="executorch", label="ExecuTorch", suffixes=(".pte",), precisions=PRECISIONS, extra=EXTRA,
    build=build, read=read_executorch_engine, open=open_runner, check_build=check_build,
    preflight=_preflight, baseline=baseline,
    file_hint="an ExecuTorch program is a .pte file (its sidecar .pte.json beside it)",
    foreign_note="ExecuTorch INT8 is PT2E static quantization of the linear and conv layers (no backend options)"))
