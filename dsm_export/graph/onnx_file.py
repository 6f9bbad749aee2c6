"""ONNX files on disk, with or without external data (models over protobuf's 2 GB limit).

A ``ModelProto`` cannot be serialized past 2 GiB, so a larger model keeps its weights in one data
file beside the model: ``vit.onnx`` records ``location: "vit.onnx.data"`` (relative) for every
initializer of 1 KiB or more, and ``vit.onnx.data`` holds their bytes. :func:`save_onnx` writes
that form automatically over :data:`MAX_PROTO` (or on request at any size), atomically: both files
go to a temporary folder beside the target first, then the data file and last the model are
renamed into place. Readers load the graph without the weights (:func:`read_graph`, a few hundred
KB even for ViT-H) wherever only the graph is needed, and give ONNX Runtime, TensorRT and OpenVINO
the path, never the bytes, of a model with external data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import onnx
from onnx.external_data_helper import load_external_data_for_model

from ..errors import DSMError

# protobuf's limit on one serialized message: 2 GiB (the ONNX checker's constant).
MAX_PROTO = onnx.checker.MAXIMUM_PROTOBUF


def data_file_name(path: str) -> str:
    """The data file name :func:`save_onnx` gives the model at ``path``: ``<file name>.data``
    (``out/vit.onnx`` -> ``vit.onnx.data``)."""
    return os.path.basename(path) + ".data"


def _tensors(model: onnx.ModelProto):
    """Every tensor of the model that can hold data: initializers and tensor attributes, subgraphs
    included."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def external_locations(model: onnx.ModelProto) -> list[str]:
    """The data files the model's tensors refer to (their ``location``, relative to the model's
    folder), in first-use order; ``[]`` for a model that holds all its data itself."""
    out: list[str] = []
    for t in _tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = _external_entries(t).get("location", "")
            if loc not in out:
                out.append(loc)
    return out


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether any tensor of ``model`` keeps its data in an external file (not loaded)."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(model))


def check_external_data(model: onnx.ModelProto, path: str) -> None:
    """Check that every external data file ``model`` (read from ``path``) refers to is there and
    long enough, so that a user learns of a missing file before any work, in one line.

    Raises:
        DSMError: a location that leaves the model's folder (absolute or ``..``), a data file that
            is missing ("vit.onnx: its external data file 'vit.onnx.data' is missing (copy it with
            the model)"), or one shorter than a tensor's offset plus length (truncated copy).
    """
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    sizes: dict[str, int] = {}
    for t in _tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = _external_entries(t)
        loc = entry.get("location", "")
        if not loc or os.path.isabs(loc) or os.path.normpath(loc).startswith(".."):
            raise DSMError(f"{name}: tensor {t.name!r} has external data at {loc!r}, outside the model's "
                           "folder (dsm-export reads data files beside the model only)")
        if loc not in sizes:
            full = os.path.join(folder, loc)
            if not os.path.isfile(full):
                raise DSMError(f"{name}: its external data file {loc!r} is missing (copy it with the model)")
            sizes[loc] = os.path.getsize(full)
        try:
            end = int(entry.get("offset", 0)) + int(entry.get("length", 0))
        except ValueError:
            raise DSMError(f"{name}: tensor {t.name!r} has a malformed external data entry") from None
        if end > sizes[loc]:
            raise DSMError(f"{name}: its external data file {loc!r} is truncated ({sizes[loc]} bytes, tensor "
                           f"{t.name!r} ends at byte {end}): copy it again with the model")


def read_graph(path: str) -> onnx.ModelProto:
    """The model at ``path`` without its external data (graph, metadata, small initializers; large
    ones left as references), after :func:`check_external_data`. For a single-file model this is
    the whole model.

    Raises:
        DSMError: a missing file, one protobuf cannot parse, or a missing or truncated data file.
    """
    if not os.path.isfile(path):
        raise DSMError(f"ONNX file {path!r} does not exist")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DSMError(f"{path!r} is not a valid ONNX model: {first}") from None
    check_external_data(model, path)
    return model


def model_files(path: str, model: onnx.ModelProto | None = None) -> list[str]:
    """The files that make up the model at ``path``: the ``.onnx`` file, then its data files (full
    paths). ``model``: the graph already read from ``path`` (else it is read, without the data).

    Raises:
        DSMError: as :func:`read_graph`.
    """
    model = read_graph(path) if model is None else model
    folder = os.path.dirname(os.path.abspath(path))
    return [path] + [os.path.join(folder, loc) for loc in external_locations(model)]


def sha256_model_files(path: str, model: onnx.ModelProto | None = None) -> str:
    """sha256 over the bytes of the model's files, the ``.onnx`` file first, then its data files in
    :func:`external_locations` order (for a single-file model: ``sha256sum model.onnx``). Reads in
    1 MiB chunks: no serialization, any size."""
    h = hashlib.sha256()
    for f in model_files(path, model):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model`` (its data loaded) is too large to serialize as one protobuf (over
    :data:`MAX_PROTO`, 2 GiB)."""
    return model.ByteSize() >= MAX_PROTO


def save_onnx(model: onnx.ModelProto, path: str, external_data: bool | None = None) -> list[str]:
    """Write ``model`` to ``path`` atomically, with its weights in ``<file name>.data`` beside it
    when ``external_data`` (None: when the model is over 2 GiB, :func:`needs_external_data`).

    Both files are written in a temporary folder in ``path``'s folder, then renamed: the data file
    first, the model last, so a failure leaves neither half-written (an existing ``path`` and data
    file stay as they were). Tensors of 1 KiB or more go to the data file, recorded relative
    (``location: "<file name>.data"``); with external data the in-memory ``model`` is left referring
    to that file (its tensors' bytes are moved out, as ``onnx.save`` does).

    Returns:
        The files written: ``[path]`` or ``[path, path + ".data"]``.

    Raises:
        DSMError: the output folder does not exist.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DSMError(f"output folder {folder!r} does not exist")
    if external_data is None:
        external_data = needs_external_data(model)
    name = os.path.basename(path)
    work = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        tmp_model = os.path.join(work, name)
        if external_data:
            location = data_file_name(path)
            onnx.save(model, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=location, size_threshold=1024)
            written = [location, name] if os.path.exists(os.path.join(work, location)) else [name]
        else:
            onnx.save(model, tmp_model)
            written = [name]
        publish(work, path, written)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [os.path.join(os.path.dirname(path), f) for f in reversed(written)]


def publish(work: str, path: str, names: list[str]) -> None:
    """Rename the files ``names`` from the temporary folder ``work`` into ``path``'s folder, in
    that order (the data file first, the model last), with the usual permissions (umask)."""
    folder = os.path.dirname(os.path.abspath(path))
    umask = os.umask(0)
    os.umask(umask)
    for f in names:
        os.chmod(os.path.join(work, f), 0o666 & ~umask)
        os.replace(os.path.join(work, f), os.path.join(folder, f))


def infer_shapes(model: onnx.ModelProto, **kwargs) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes(model, **kwargs)`` for a model of any size: one over
    :data:`MAX_PROTO` is inferred from a copy that keeps every tensor's name, type and shape but
    not the bytes of those of 1 MiB or more (shape inference reads no weight values); the result
    is then that light copy with its ``value_info`` (for reading shapes, not for saving)."""
    if not needs_external_data(model):
        return onnx.shape_inference.infer_shapes(model, **kwargs)
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g, src = light.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for t in src.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or t.ByteSize() < (1 << 20):
            g.initializer.append(t)
            continue
        stub = g.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend(t.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="shape-inference-only.data")
    return onnx.shape_inference.infer_shapes(light, **kwargs)


def session_source(model: onnx.ModelProto, work: str, name: str = "model.onnx") -> str | bytes:
    """What to hand ONNX Runtime (or any parser) for an in-memory ``model``: its bytes if it fits
    one protobuf and holds all its data, else the path of a copy saved with external data in the
    folder ``work`` (which the caller keeps until the session is built). ``model`` is left as it
    was (its data read back from the copy).

    Raises:
        DSMError: ``model`` refers to external data that is not loaded (save it from its file's
            folder instead).
    """
    if has_external_data(model):
        raise DSMError("an in-memory model with unloaded external data cannot be handed on (a bug)")
    if not needs_external_data(model):
        return model.SerializeToString()
    path = os.path.join(work, name)
    save_onnx(model, path, external_data=True)
    load_external_data_for_model(model, work)  # saving moved the bytes out: ``model`` stays whole
    return path
