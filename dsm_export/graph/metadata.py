"""The dsm-export metadata of an ONNX file: ``metadata_props`` entries whose keys start with
:data:`META_PREFIX` (``dsm.model``, ``dsm.schedule_json``, ``dsm.precision``, ...).

The one place that reads and writes ``metadata_props``: the export writes them, INT8 quantization
and the ONNX Runtime build copy them with a few more keys, and the backends that keep them beside
the engine (TensorRT's and ExecuTorch's JSON sidecars, OpenVINO's ``rt_info``) rebuild a bare
``onnx.ModelProto`` from them (:func:`proto_with_props`) for
:func:`dsm_export.graph.export.read_metadata`. Imports ``onnx`` only.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

META_PREFIX = "dsm."


def read_props(model: onnx.ModelProto) -> dict[str, str]:
    """Every ``metadata_props`` entry, keys as stored, in file order (a repeated key: its last value)."""
    return {p.key: p.value for p in model.metadata_props}


def dsm_props(model: onnx.ModelProto) -> dict[str, str]:
    """The dsm-export entries, :data:`META_PREFIX` stripped, in file order (a repeated key: its last
    value)."""
    return {p.key[len(META_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}


def prefixed(props: Mapping[str, object]) -> dict[str, str]:
    """``props`` as dsm-export entries: :data:`META_PREFIX` before each key, each value as ``str``."""
    return {META_PREFIX + key: str(value) for key, value in props.items()}


def write_props(model: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Replace all of ``model``'s ``metadata_props`` with ``props`` (keys as given, in order), through
    ``onnx.helper.set_model_props``.

    Raises:
        TypeError: a key or value that is not a ``str`` (protobuf refuses it).
    """
    onnx.helper.set_model_props(model, dict(props))


def copy_props(src: onnx.ModelProto, dst: onnx.ModelProto, extra: Mapping[str, object] | None = None) -> None:
    """Replace ``dst``'s ``metadata_props`` with ``src``'s, in order, plus ``extra`` as dsm-export
    entries (:func:`prefixed`): a new key goes last, one ``src`` already has takes the new value in
    its place (each key once: ``onnx.checker`` refuses a file with a repeated key).

    Raises:
        TypeError: as :func:`write_props`.
    """
    write_props(dst, {**read_props(src), **prefixed(extra or {})})


def proto_with_props(props: Mapping[str, str], output_name: str | None = None) -> onnx.ModelProto:
    """A bare ``onnx.ModelProto`` holding only ``props`` (keys as given: with :data:`META_PREFIX`) and,
    if given, one graph output named ``output_name``: what
    :func:`dsm_export.graph.export.read_metadata` reads, for engines that keep the ONNX file's
    metadata beside them (``output_name`` None: no output)."""
    proto = onnx.ModelProto()
    write_props(proto, props)
    if output_name is not None:
        proto.graph.output.add(name=output_name)
    return proto
