"""Static-shape ONNX export of a timm ViT under a merge schedule.

The model runs the ``export`` implementation of :mod:`dsm_export.core.patch` (merges as Gather plus a
one-hot assignment MatMul) and is exported with PyTorch's ``torch.export``-based ONNX exporter.
Every shape is static except an optional dynamic batch axis; the graph is cleaned with onnxslim
(constant folding, dead nodes), passes the full ``onnx.checker`` check and shape inference, and
holds the schedule, source model, weights sha256 and tool version in ``metadata_props``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, fields, replace

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import onnxslim
import torch
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_model

from .._version import __version__
from ..errors import DSMError
from ..fileio import atomic_path
from .metadata import META_PREFIX, dsm_props, prefixed, write_props  # noqa: F401  (META_PREFIX: callers import it from here)
from .onnx_file import MAX_PROTO, data_file_name, has_external_data, publish, read_graph
from ..core.hf import HIDDEN_STATE, is_hf_name
from ..core.models import create_hf_model, create_model, pretrained_file, pretrained_name, sha256_file
from ..core.models import output_name as model_output_name
from .onnx_graph import graph_problems, unknown_shapes
from ..core.patch import apply, input_size
from ..core.schedule import Schedule

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
EMBEDDINGS_NAME = "embeddings"  # output of models with an identity head (timm num_classes=0)
BATCH_DIM = "batch"
DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`read_metadata` finds in an exported file.

    Attributes:
        model: timm model name, with the pretrained tag timm resolved when ``pretrained``.
        schedule: the merge schedule (explicit per-block form).
        weights: weights path given at export, relative to the ONNX file's folder ("" for random
            init or timm pretrained weights; absolute in files written before 0.2).
        weights_sha256: sha256 of the weights file ("" for random init or an unknown file).
        version: dsm-export version that wrote the file.
        input_size: ``(C, H, W)``.
        batch: static batch size, or None if the batch axis is dynamic.
        tokens: tokens leaving each block (prefix tokens included).
        pretrained: the weights were timm's pretrained weights of ``model`` (``--pretrained``).
        num_classes: the ``num_classes`` the model was created with (None: timm's default).
        output: the graph output, ``logits`` or ``embeddings`` (identity head); for a Hugging Face model
            Optimum's name (``logits``, ``pooler_output``, ``image_embeds``).
        last_block: ``"prefix"`` if the last block runs for the prefix tokens alone (see
            :meth:`dsm_export.core.patch.MergedViT._last_block_prefix`), ``"full"`` if for every token
            (as timm's model; files without ``dsm.last_block`` metadata are ``"full"``).
    """

    model: str
    schedule: Schedule
    weights: str
    weights_sha256: str
    version: str
    input_size: tuple[int, int, int]
    batch: int | None
    tokens: tuple[int, ...]
    pretrained: bool = False
    num_classes: int | None = None
    output: str = OUTPUT_NAME
    last_block: str = "full"

    @property
    def embeddings(self) -> bool:
        """Whether the graph outputs pooled features (``embeddings``) rather than logits."""
        return self.output != OUTPUT_NAME


@dataclass(frozen=True)
class ExportOptions:
    """The rarely changed export settings, grouped (:func:`export_onnx` and :func:`export_model` also
    take each as a keyword, e.g. ``opset=19``).

    Attributes:
        opset: ONNX opset, at least 17.
        image_size: expected ``(H, W)``; must equal the model's (None: the model's; only
            :func:`export_onnx` checks it).
        full_last_block: run the last block on every token as timm does (the timm-equivalent
            baseline), instead of on the prefix tokens alone where only they reach the head.
        external_data: write the weights to ``<file name>.data`` beside the output (ONNX external
            data, location recorded relative) at any size; models whose weights reach 2 GiB
            (protobuf's limit) are always written so.
        last_hidden_state: a Hugging Face model without a classifier outputs ``last_hidden_state``
            ``[batch, tokens, dim]``, every token the last block leaves (``tokens``: the last entry
            of :attr:`ExportInfo.tokens`), instead of its pooled output (:func:`export_onnx` only).
    """

    opset: int = DEFAULT_OPSET
    image_size: tuple[int, int] | None = None
    full_last_block: bool = False
    external_data: bool = False
    last_hidden_state: bool = False

    @classmethod
    def merged(cls, options: ExportOptions | None, overrides: dict) -> ExportOptions:
        """``options`` (default: the defaults) with the keyword ``overrides`` applied.

        Raises:
            TypeError: a keyword that is not an export option (as an unknown keyword argument would).
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                            f"export options are {', '.join(sorted(known))}")
        return replace(options or cls(), **overrides)


def parse_input_size(text: str) -> tuple[int, int]:
    """Parse ``224`` or ``224x224`` to ``(height, width)``.

    Raises:
        DSMError: if malformed.
    """
    parts = text.lower().split("x")
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        raise DSMError(f"input size {text!r}: expected N or HxW, e.g. 224 or 224x224") from None
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 1:
        raise DSMError(f"input size {text!r}: expected N or HxW, e.g. 224 or 224x224")
    return hw


def check_input_size(model: torch.nn.Module, name: str, hw: tuple[int, int] | None) -> None:
    """Refuse an input size other than the model's (position embeddings are fixed).

    Raises:
        DSMError: naming both sizes.
    """
    _, h, w = input_size(model)
    if hw is not None and tuple(hw) != (h, w):
        raise DSMError(
            f"input size {hw[0]}x{hw[1]} differs from {name}'s {h}x{w} (its position embeddings and "
            "token counts are fixed at export)")


def export_onnx(
    model_name: str,
    output: str,
    schedule: Schedule | str = "none",
    weights: str | None = None,
    batch: int | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    options: ExportOptions | None = None,
    **extra,
) -> ExportInfo:
    """Export ``model_name`` under ``schedule`` to a static-shape ONNX file.

    Args:
        model_name: timm model name, optionally with a pretrained tag or as ``hf-hub:ORG/REPO``; or a
            Hugging Face Transformers vision model: a ``save_pretrained`` folder (its weights are loaded)
            or a hub id in the local cache (weights with ``pretrained``), see :mod:`dsm_export.core.hf`;
            its output is named as Optimum names it (``logits``, ``pooler_output``, ``image_embeds``).
        output: ``.onnx`` path; written atomically (no partial file on failure).
        schedule: merge schedule or its text form; ``"none"`` exports the unmerged baseline.
        weights: local checkpoint (loaded by timm); None for timm's pretrained weights
            (``pretrained``) or random init (warns).
        batch: fix the batch axis to this size; None keeps it dynamic (named ``batch``).
        pretrained: load timm's pretrained weights of ``model_name`` (Hugging Face hub cache).
        num_classes: timm's ``num_classes``; 0 exports pooled features as output ``embeddings``.
        options: the rarely changed settings (:class:`ExportOptions`: ``opset``, ``image_size``,
            ``full_last_block``, ``external_data``); None for the defaults.
        **extra: any :class:`ExportOptions` field as a keyword (``opset=19``,
            ``full_last_block=True``, ...), applied over ``options``.

    Returns:
        The :class:`ExportInfo` written into the file's metadata.

    Raises:
        DSMError: bad model name, weights, schedule, input size, opset or batch; or if the graph
            fails the checker, shape inference or the op check (a bug, reported clearly).
    """
    opts = ExportOptions.merged(options, extra)
    if isinstance(schedule, str):
        schedule = Schedule.parse(schedule)
    if opts.opset < 17:
        raise DSMError(f"opset {opts.opset} is too old: dsm-export needs opset 17 or newer")
    if batch is not None and batch < 1:
        raise DSMError(f"batch must be at least 1, got {batch}")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise DSMError(f"output folder {folder!r} does not exist")
    if opts.last_hidden_state:
        if not is_hf_name(model_name):
            raise DSMError("last_hidden_state is for Hugging Face models (ViTModel, Dinov2Model, CLIP and SigLIP "
                           f"vision models); {model_name!r} is a timm name")
        model = create_hf_model(model_name, weights, pretrained=pretrained, num_classes=num_classes,
                                output=HIDDEN_STATE)
    else:
        model = create_model(model_name, weights, pretrained=pretrained, num_classes=num_classes)
    check_input_size(model, model_name, opts.image_size)
    return export_model(model, model_name, output, schedule, weights=weights, batch=batch,
                        pretrained=pretrained and not weights, num_classes=num_classes, options=opts)


def export_model(
    model: torch.nn.Module,
    model_name: str,
    output: str,
    schedule: Schedule | str = "none",
    weights: str | None = None,
    batch: int | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    options: ExportOptions | None = None,
    **extra,
) -> ExportInfo:
    """Export an already built timm ViT (see :func:`export_onnx`, which builds it by name).

    A model with an identity head (timm ``num_classes=0``) gets the output ``embeddings``
    (``[batch, dim]``), any other ``logits`` (``[batch, classes]``).

    Args:
        model: timm ``VisionTransformer`` in eval mode.
        model_name: name recorded in the metadata (``validate`` rebuilds the model from it).
        weights: checkpoint file: hashed, and recorded relative to the output's folder; or None.
        pretrained: the weights are timm's pretrained weights of ``model_name``: the name is recorded
            with its resolved tag and the cached file's sha256.
        num_classes: the ``num_classes`` the model was created with (recorded; None: timm's default).
        output, schedule, batch, options, **extra: as for :func:`export_onnx` (``image_size`` is not
            checked here: the model is already built).

    With external data (asked, or weights of 2 GiB or more) the weights never pass through a
    protobuf: each initializer of :data:`EXTERNAL_MIN_BYTES` or more is cut out of the exporter's
    graph, which is cleaned and checked without it (an input in its place), and streamed, one
    tensor at a time, into the data file (offsets 4 KiB aligned). The model and data file are
    written in a temporary folder beside ``output``, checked from there (``onnx.checker``, full),
    and renamed into place, the data file first.

    Raises:
        DSMError: unsupported model, impossible schedule, or a graph that fails its checks.
    """
    opts = ExportOptions.merged(options, extra)
    if isinstance(schedule, str):
        schedule = Schedule.parse(schedule)
    merged = apply(model, schedule, impl="export", name=model_name, full_last_block=opts.full_last_block).eval()
    c, h, w = input_size(model)
    dummy = torch.randn(batch or 2, c, h, w)
    dynamic_shapes = None if batch else ({0: torch.export.Dim(BATCH_DIM, min=1, max=4096)},)

    hf = getattr(model, "hf_spec", None)
    pretrained = pretrained or bool(hf and hf.pretrained)  # a Hugging Face folder or cache entry
    source_file = weights or (pretrained_file(model) if pretrained else None)
    output_name = model_output_name(model)
    info = ExportInfo(
        model=pretrained_name(model_name, model) if pretrained else model_name,
        schedule=Schedule.from_dict(schedule.to_dict(len(model.blocks))),
        weights=_relative(weights, output) if weights else "",
        weights_sha256=sha256_file(source_file) if source_file else "",
        version=__version__,
        input_size=(c, h, w),
        batch=batch,
        tokens=tuple(t.tokens_out for t in merged.tokens),
        pretrained=pretrained,
        num_classes=num_classes,
        output=output_name,
        last_block="prefix" if merged.prefix_only_last else "full",
    )
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            merged, (dummy,), dynamo=True, optimize=False,
            input_names=[INPUT_NAME], output_names=[output_name], opset_version=opts.opset,
            dynamic_shapes=dynamic_shapes, verbose=False,
        )
    uneven = any(len(t.windows) > 1 for t in merged.tokens)
    ir_model = program.model
    if not (opts.external_data or _initializer_bytes(ir_model) >= MAX_PROTO):
        onnx_model = _finish(ir_model, info, schedule, len(model.blocks), uneven_windows=uneven)
        with atomic_path(output) as tmp:
            onnx.save(onnx_model, tmp)
        return info
    _export_external(ir_model, info, schedule, len(model.blocks), output, uneven_windows=uneven)
    return info


# Initializers of at least this many bytes go to the data file when a model is written with
# external data (smaller ones, scalars and shape constants, stay in the graph).
EXTERNAL_MIN_BYTES = 4096
_ALIGN = 4096


def _export_external(ir_model, info: ExportInfo, schedule: Schedule, depth: int, output: str, **finish) -> None:
    """Write the exporter's ``ir_model`` to ``output`` and ``<file name>.data`` (see
    :func:`export_model`): cleaned and checked with its weights set aside, then published
    atomically.

    Raises:
        DSMError: a graph that fails its checks (a bug).
    """
    onnxscript.optimizer.fold_constants(ir_model)
    onnxscript.optimizer.remove_unused_nodes(ir_model)
    folder = os.path.dirname(os.path.abspath(output))
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=folder)
    try:
        aside = _weights_as_inputs(ir_model)
        onnx_model = _finish(ir_model, info, schedule, depth, weights_aside=aside, **finish)
        data_name = data_file_name(output)
        _write_external_weights(onnx_model, aside, os.path.join(work, data_name), data_name)
        del aside
        problems = graph_problems(onnx_model)
        unknown = unknown_shapes(onnx_model, BATCH_DIM if info.batch is None else None)
        if problems or unknown:
            raise DSMError("exported graph failed its checks (a bug): " + "; ".join((problems + unknown)[:5]))
        model_tmp = os.path.join(work, os.path.basename(output))
        onnx.save(onnx_model, model_tmp)
        try:
            onnx.checker.check_model(model_tmp, full_check=True)
        except Exception as exc:  # noqa: BLE001 - the checker raises several types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DSMError(f"exported graph failed onnx.checker (a bug): {first}") from None
        publish(work, output, [data_name, os.path.basename(output)])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _initializer_bytes(ir_model) -> int:
    """Bytes of the exporter's initializers (what one protobuf would have to hold)."""
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)


def _weights_as_inputs(ir_model) -> dict:
    """Turn every initializer of :data:`EXTERNAL_MIN_BYTES` or more into a graph input (in place),
    so that the graph can be cleaned and checked without its weights.

    onnxslim reads the values of constants it may remove (an all-zero bias, a ``* 1``), and loads
    external data into memory when it does; as graph inputs, the weights stay out of its reach.

    Returns:
        name -> the ``onnx_ir`` tensor (a view of the PyTorch parameter, not a copy).
    """
    aside = {}
    graph = ir_model.graph
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or tensor.nbytes < EXTERNAL_MIN_BYTES:
            continue
        graph.initializers.pop(name)
        value.const_value = None
        value.type = ir.TensorType(tensor.dtype)
        value.shape = ir.Shape(tensor.shape)
        graph.inputs.append(value)
        aside[name] = tensor
    return aside


def _write_external_weights(model: onnx.ModelProto, aside: dict, data_path: str, location: str) -> None:
    """Write the tensors :func:`_weights_as_inputs` set aside to ``data_path``, one at a time, and
    make each an initializer of ``model`` referring to it (``location`` relative); their graph
    inputs are removed. Tensors the clean-up left unused are dropped."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    inputs = [i for i in model.graph.input if i.name not in aside]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    with open(data_path, "wb") as fh:
        for name, tensor in aside.items():
            if name not in used:
                continue
            offset = fh.tell()
            if offset % _ALIGN:
                fh.write(b"\0" * (_ALIGN - offset % _ALIGN))
                offset = fh.tell()
            data = tensor.tobytes()
            fh.write(data)
            init = model.graph.initializer.add()
            init.name = name
            init.data_type = int(tensor.dtype)
            init.dims.extend(int(d) for d in tensor.shape)
            init.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                init.external_data.add(key=key, value=value)
            del data


def _relative(path: str, output: str) -> str:
    """``path`` relative to ``output``'s folder (portable when both move together), or "" where no
    relative path exists (another drive)."""
    try:
        return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(output)))
    except ValueError:
        return ""


def weights_path(info: ExportInfo, onnx_path: str) -> str:
    """The recorded weights file as a path usable from here: relative paths are taken from
    ``onnx_path``'s folder; "" when none was recorded."""
    if not info.weights:
        return ""
    return os.path.join(os.path.dirname(os.path.abspath(onnx_path)), info.weights)


def _finish(ir_model, info: ExportInfo, schedule: Schedule, depth: int, uneven_windows: bool = False,
            weights_aside: dict | None = None) -> onnx.ModelProto:
    """Fold constants, clean up with onnxslim, name the batch axis, add metadata, check the graph.

    Constant folding with shape propagation is the exporter's own (onnxscript's
    ``fold_constants``); the clean-up (dead nodes, shape ops, duplicate initializers) is onnxslim's.
    onnxscript's pattern rewriter is skipped: it adds nothing here and takes most of the time.
    With ``weights_aside`` (:func:`_weights_as_inputs`, after folding) the weights are graph inputs
    here, and the checks are the caller's, once they are initializers again.
    """
    if weights_aside is None:  # else folded before the weights were set aside
        onnxscript.optimizer.fold_constants(ir_model)
        onnxscript.optimizer.remove_unused_nodes(ir_model)
    # Uneven windows (several window sizes in a local block): onnxslim 0.1.98's EliminationSlice,
    # together with its Concat flattening, erases the prefix tokens' Slice while a Concat still
    # reads it, leaving an invalid graph; the pattern is skipped there (it saves one small Slice).
    skip = ["EliminationSlice"] if uneven_windows else None
    with contextlib.redirect_stdout(io.StringIO()):
        onnx_model = onnxslim.slim(ir.to_proto(ir_model), skip_fusion_patterns=skip)
    gelu_in_fusable_order(onnx_model)
    gathers_as_gathernd(onnx_model)
    _name_batch_axis(onnx_model)
    onnx_model.producer_name = "dsm-export"
    onnx_model.producer_version = info.version
    meta = {
        "model": info.model,
        "schedule": schedule.spec(),
        "schedule_json": json.dumps(schedule.to_dict(depth)),
        "weights": info.weights,
        "weights_sha256": info.weights_sha256,
        "version": info.version,
        "input_size": "x".join(str(v) for v in info.input_size),
        "batch": str(info.batch) if info.batch else "dynamic",
        "tokens": json.dumps(list(info.tokens)),
        "pretrained": "timm" if info.pretrained else "",
        "num_classes": "" if info.num_classes is None else str(info.num_classes),
        "output": info.output,
        "last_block": info.last_block,
    }
    write_props(onnx_model, prefixed(meta))
    if weights_aside is not None:
        return onnx_model
    onnx.checker.check_model(onnx_model, full_check=True)
    problems = graph_problems(onnx_model)
    unknown = unknown_shapes(onnx_model, BATCH_DIM if info.batch is None else None)
    if problems or unknown:
        raise DSMError("exported graph failed its checks (a bug): " + "; ".join((problems + unknown)[:5]))
    return onnx_model


def gelu_in_fusable_order(model: onnx.ModelProto) -> int:
    """Reorder each exact GELU's final products so that ONNX Runtime recognises it (in place).

    The exporter writes ``gelu(x)`` as ``x * (0.5 * (1 + erf(x / sqrt(2))))``; ONNX Runtime's
    ``GeluFusion`` looks for ``(x * (1 + erf(x / sqrt(2)))) * 0.5`` and then folds the preceding
    bias ``Add`` in too (``BiasGelu``). Same ops (Div, Erf, Add, Mul: nothing TensorRT lacks), same
    value up to float rounding (~1e-7 relative), fewer passes over the MLP activations on the CPU.

    Returns:
        The number of GELUs reordered.
    """
    consts = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def only_user(name, op):
        u = users.get(name, [])
        return u[0] if len(u) == 1 and u[0].op_type == op else None

    def scalar(name, value):
        t = consts.get(name)
        if t is None:
            return False
        a = numpy_helper.to_array(t)
        return a.size == 1 and abs(float(a.reshape(-1)[0]) - value) < 1e-6 * max(1.0, abs(value))

    count = 0
    for erf in [n for n in model.graph.node if n.op_type == "Erf"]:
        div = producer.get(erf.input[0])
        add = only_user(erf.output[0], "Add")
        half = only_user(add.output[0], "Mul") if add is not None else None
        last = only_user(half.output[0], "Mul") if half is not None else None
        if div is None or div.op_type != "Div" or last is None or not scalar(div.input[1], 2 ** 0.5):
            continue
        x = div.input[0]
        c = [i for i in half.input if i != add.output[0]]
        if len(c) != 1 or not scalar(c[0], 0.5) or x not in last.input:
            continue
        half.input[:] = [x, add.output[0]]  # x * (1 + erf(x / sqrt 2))
        last.input[:] = [half.output[0], c[0]]  # ... * 0.5
        count += 1
    return count


def gathers_as_gathernd(model: onnx.ModelProto) -> int:
    """Turn the merge's row gathers into row copies (in place): ``GatherND`` for ``GatherElements``.

    ``torch.gather(x, -2, idx.unsqueeze(-1).expand(..., k, C))`` (the merge's token gather)
    exports as ``GatherElements`` over an index expanded to the full ``[..., k, C]``: ONNX Runtime
    then reads one int64 index per float, about 7x slower than copying rows. Where shape
    inference shows such a gather -- axis -2, an ``Unsqueeze``-then-``Expand`` index of shape
    ``[..., k, 1]`` expanded to the data's full width, the same leading dims as the data -- it
    becomes ``GatherND(x, idx.unsqueeze(-1), batch_dims=rank - 2)``: the same values (both pick
    ``x[..., idx[..., j], :]``), an op TensorRT's parser imports natively. Expand nodes left
    unused are removed.

    Returns:
        The number of gathers rewritten.
    """
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                              for d in t.shape.dim]
    producer = {o: n for n in model.graph.node for o in n.output}
    count = 0
    for node in model.graph.node:
        if node.op_type != "GatherElements":
            continue
        expand = producer.get(node.input[1])
        unsq = producer.get(expand.input[0]) if expand is not None and expand.op_type == "Expand" else None
        if unsq is None or unsq.op_type != "Unsqueeze":
            continue
        data, idx, out = (shapes.get(n) for n in (node.input[0], unsq.output[0], node.output[0]))
        if not data or not idx or not out or None in data + idx + out:
            continue
        rank = len(data)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (rank < 2 or len(idx) != rank or len(out) != rank or axis % rank != rank - 2 or idx[-1] != 1
                or out[-1] != data[-1] or out[:-1] != idx[:-1] or data[:-2] != idx[:-2]):
            continue
        node.op_type = "GatherND"
        node.input[1] = unsq.output[0]
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("batch_dims", rank - 2))
        count += 1
    if count:
        _remove_dead_nodes(model)
    return count


def _remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes none of whose outputs is used (by a node or as a graph output), then unused
    initializers."""
    while True:
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        keep = [n for n in model.graph.node if any(o in used for o in n.output)]
        if len(keep) == len(model.graph.node):
            break
        del model.graph.node[:]
        model.graph.node.extend(keep)
    inits = [i for i in model.graph.initializer if i.name in used]
    if len(inits) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)


def _name_batch_axis(onnx_model: onnx.ModelProto) -> None:
    """Give the graph input's and output's first axis the name ``batch`` if it is symbolic."""
    for v in list(onnx_model.graph.input) + list(onnx_model.graph.output):
        dim = v.type.tensor_type.shape.dim[0]
        if not dim.HasField("dim_value"):
            dim.dim_param = BATCH_DIM


def load_onnx(path: str, weights: bool = True) -> onnx.ModelProto:
    """Load and check an ONNX file, and its external data files if it has any.

    Args:
        path: the ``.onnx`` file.
        weights: load the external data too; False leaves the weights of a model with external
            data on disk (graph, metadata and small tensors only: fast and small, for readers of
            the graph; a single-file model is loaded whole either way).

    Raises:
        DSMError: if the file is missing or is not a valid ONNX model, or a data file it refers
            to is missing or truncated.
    """
    model = read_graph(path)
    external = has_external_data(model)
    try:
        # a model with external data is checked from its path (its data files found beside it)
        onnx.checker.check_model(path if external else model)
    except Exception as exc:  # noqa: BLE001 - any parse/check failure is a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DSMError(f"{path!r} is not a valid ONNX model: {first}") from None
    if external and weights:
        load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    return model


def read_metadata(model: onnx.ModelProto, path: str = "model") -> ExportInfo:
    """Read what :func:`export_onnx` stored in ``metadata_props``.

    Raises:
        DSMError: if the file was not written by dsm-export (metadata missing).
    """
    meta = dsm_props(model)
    need = ("model", "schedule_json", "input_size")
    if not all(k in meta for k in need):
        raise DSMError(f"{path!r} has no dsm-export metadata (was it exported by dsm-export?)")
    try:
        return ExportInfo(
            model=meta["model"],
            schedule=_stored_schedule(meta),
            weights=meta.get("weights", ""),
            weights_sha256=meta.get("weights_sha256", ""),
            version=meta.get("version", ""),
            input_size=tuple(int(v) for v in meta["input_size"].split("x")),
            batch=None if meta.get("batch", "dynamic") == "dynamic" else int(meta["batch"]),
            tokens=tuple(json.loads(meta.get("tokens", "[]"))),
            pretrained=meta.get("pretrained", "") == "timm",
            num_classes=int(meta["num_classes"]) if meta.get("num_classes") else None,
            output=meta.get("output") or _output_name(model),
            last_block=meta.get("last_block", "full"),
        )
    except (ValueError, KeyError) as exc:
        raise DSMError(f"{path!r}: malformed dsm-export metadata ({exc})") from None


def _output_name(model: onnx.ModelProto) -> str:
    outs = [o.name for o in model.graph.output]
    return outs[0] if outs else OUTPUT_NAME


def _stored_schedule(meta: dict) -> Schedule:
    """The stored schedule: the compact spec if it expands to the stored per-block list."""
    explicit = Schedule.from_dict(json.loads(meta["schedule_json"]))
    depth = len(explicit.blocks)
    try:
        compact = Schedule.parse(meta.get("schedule", ""))
        if compact.same_as(explicit, depth):
            return compact
    except DSMError:
        pass
    return explicit
