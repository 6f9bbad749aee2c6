"""The engine registry: every backend dsm-export builds, runs and serves, declared in one place.

A backend is a :class:`Backend` record: its name, the file suffixes of its engines, the precisions it
builds, the extra that installs it, and the functions that build an engine, read what an engine file
says about itself (:class:`EngineFile`), open a :class:`Runner` on it, and list the files that travel
with it. Every command (``validate``, ``bench``, ``serve``, ``triton-repo``, ``inspect``, ``tune``, the
Python API) finds a backend here by name (:func:`get_backend`) or by file (:func:`backend_for`); no
module outside :mod:`dsm_export.engines` compares suffixes or backend names.

Modelled on Polygraphy's ``backend/<name>/{loader,runner}`` split and timm's ``register_model``: each
backend module calls :func:`register` at import; :data:`BACKEND_MODULES` lists the modules, and
:func:`backends` imports them on first use. A backend's own heavy dependency (openvino, tensorrt,
executorch) is imported only when one of its functions runs, through :func:`import_optional`, so a
missing extra is one line naming it.

Adding a backend: a module ``dsm_export/engines/<name>.py`` with a build function, a runner class and a
``register(Backend(...))`` call, its name in :data:`BACKEND_MODULES`, and its extra in
``pyproject.toml`` (docs/architecture.md, "Adding a backend").
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from ..errors import DSMError
from ..graph.export import ExportInfo

# The modules that register a backend, in the order commands list them. The first is the default of
# a file whose suffix no other backend claims.
BACKEND_MODULES = ("onnxruntime", "openvino", "tensorrt", "executorch")
# The precisions an engine can run at, across backends (a backend declares its own subset).
PRECISIONS = ("fp32", "fp16", "bf16", "int8")

_REGISTRY: dict[str, "Backend"] = {}
_LOADED = False


def import_optional(module: str, extra: str, what: str | None = None):
    """Import an optional dependency, or raise one line naming the extra that installs it.

    Args:
        module: the module to import (``openvino``, ``nncf``, ``tensorrt_rtx``, ``executorch.exir``).
        extra: the dsm-export extra that brings it (``openvino``, ``executorch``).
        what: how the message names the feature (default: the module).

    Returns:
        The imported module.

    Raises:
        DSMError: ``<what> is not installed: pip install 'dsm-export[<extra>]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DSMError(f"{what or module} is not installed: pip install 'dsm-export[{extra}]' "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else module})") from None


@dataclass(frozen=True)
class RunnerOptions:
    """How a runner runs; each backend reads the fields that apply to it and ignores the rest.

    Attributes:
        threads: intra-op (inference) threads; None: the runtime's default (all cores).
        provider: ONNX Runtime execution provider (``cpu``, ``cuda``, ``tensorrt``, ``openvino`` or a
            full name); backends other than ONNX Runtime refuse anything but ``cpu``.
        flavour: TensorRT flavour (``auto``: the one the engine's sidecar names).
        runtime_cache: TensorRT-RTX runtime-cache file (read, then updated).
        spinning: ONNX Runtime: False makes the intra-op threads block after a run (timing against
            another runtime on the same cores); None: the runtime's default.
        streams: OpenVINO: the parallel streams (infer requests, each on its share of the threads)
            a call's batch is split over; None: one per thread, at most one per image
            (:func:`dsm_export.engines.openvino.stream_count`); 1: the whole batch in one request.
    """

    threads: int | None = None
    provider: str | None = "cpu"
    flavour: str = "auto"
    runtime_cache: str | None = None
    spinning: bool | None = None
    streams: int | None = None


@dataclass(frozen=True)
class EngineFile:
    """What an engine file says about itself, read without running it.

    Attributes:
        path: the engine file.
        backend: the registered backend's name.
        info: the export's metadata (model, schedule, weights, input size, output kind).
        precision: what it was built as: ``fp32``, ``fp16``, ``bf16`` or ``int8``.
        input_name, output_name: tensor names (``pixel_values`` -> ``logits`` / ``embeddings``).
        output_dims: the output's dimensions after the batch axis (``(1000,)``).
        static_batch: the batch the engine is fixed at, or None (any batch).
        files: every file of the engine, the engine file first (an IR's ``.bin``, external data, a
            plan's sidecar).
        source_path: where a relative weights path in the metadata is resolved from.
        meta: the backend's own metadata, as strings (quantization record, inference precision, ...).
    """

    path: str
    backend: str
    info: ExportInfo
    precision: str
    input_name: str
    output_name: str
    output_dims: tuple[int, ...]
    static_batch: int | None
    files: tuple[str, ...]
    source_path: str
    meta: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Runner(Protocol):
    """A loaded engine: ``runner(x)`` maps ``[B, 3, H, W]`` float32 to its output ``[B, D]`` float32
    for any ``B`` (a static-batch engine runs padded chunks, :func:`pad_batches`); ``close()`` frees it.

    Attributes:
        engine_file: the :class:`EngineFile` it runs.
        judged_as: the precision ``validate`` judges its outputs by: what it runs at (an OpenVINO bf16
            IR on a CPU without BF16 runs f32 and is judged as fp32).
        label: one line naming the runtime and how it runs (for reports).
    """

    engine_file: EngineFile
    judged_as: str
    label: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BuildRequest:
    """What ``build`` asks a backend for.

    Attributes:
        source: the fp32 ONNX file written by ``export`` (TensorRT INT8: the INT8 ONNX file).
        output: the engine path (a suffix of the backend's).
        precision: one of the backend's precisions.
        calibration: an image folder for INT8 (its first ``calibration_count`` images), or None.
        calibration_count: calibration images.
        options: the backend's own options, by field name (``smooth_alpha``, ``quantization``, ...);
            None values are dropped (an option not given).
    """

    source: str
    output: str
    precision: str = "fp32"
    calibration: str | None = None
    calibration_count: int = 64
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "options", {k: v for k, v in self.options.items() if v is not None})


@dataclass
class BuildRecord:
    """What a build wrote.

    Attributes:
        backend, precision, output: as asked.
        files: every file written, the engine first.
        summary: the lines ``dsm-export build`` prints (what was written, how it runs).
        details: the backend's own record, as stored in the engine's metadata and written to JSON
            (its keys as before this type: ``fp32_matching_nodes``, ``inference_precision``, ...).
    """

    backend: str
    precision: str
    output: str
    files: list[str]
    summary: list[str]
    details: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str):
        """``record[key]``: a field, else a key of :attr:`details` (the dict this type replaced)."""
        if key in ("backend", "precision", "output", "files"):
            return getattr(self, key)
        return self.details[key]

    def get(self, key: str, default=None):
        """As ``dict.get`` over :meth:`__getitem__`."""
        try:
            return self[key]
        except KeyError:
            return default


# Op types that only move data between layouts or precisions (OpenVINO's Reorder and Convert,
# ONNX Runtime's Transpose): a profile counts them apart from the model's work and the merge path.
LAYOUT_OPS = frozenset({"Reorder", "Convert", "Transpose"})


@dataclass(frozen=True)
class OpTime:
    """One op of a profiled engine: its time per run and which part of the work it is.

    Attributes:
        name: the op's name in the runtime (ONNX Runtime node, OpenVINO executed node).
        op_type: its type as the runtime runs it (``MatMul``, ``FullyConnected``, ``Subgraph``, ...).
        ms: milliseconds per run (mean over the timed runs).
        part: ``merge`` (an op of the matching and size path: the nodes every INT8 and fp16 build keeps
            in fp32, :func:`dsm_export.engines.fp16.fp32_island_nodes`), ``layout`` (a conversion between
            layouts or precisions, :data:`LAYOUT_OPS`) or ``model`` (the rest).
    """

    name: str
    op_type: str
    ms: float
    part: str


@dataclass
class Profile:
    """Time per op of one engine (``dsm-export profile``).

    Attributes:
        path, backend: the engine file and its backend.
        runtime: the runtime and how it ran (the runner's label).
        batch, threads, runs: the batch, the intra-op threads (None: the runtime's default) and the
            timed runs (after the warm-up runs).
        wall_ms: wall time per run (median), milliseconds.
        ops: every op that ran, with its time per run.
    """

    path: str
    backend: str
    runtime: str
    batch: int
    threads: int | None
    runs: int
    wall_ms: float
    ops: list[OpTime]


def op_part(name: str, op_type: str, merge_names: set[str] | frozenset) -> str:
    """``merge``, ``layout`` or ``model`` for an op (see :class:`OpTime`): merge where ``name`` is one of
    the matching path's node names (or a fused node named after one: ``<name>_...``)."""
    if name in merge_names or name.split("_kernel_time")[0] in merge_names:
        return "merge"
    if op_type in LAYOUT_OPS:
        return "layout"
    return "model"


@dataclass(frozen=True)
class TritonPlacement:
    """How Triton Inference Server serves an engine of a backend (``triton-repo``).

    Attributes:
        platform: ``ModelConfig.platform`` (``onnxruntime_onnx``, ``tensorrt_plan``), or empty.
        backend: ``ModelConfig.backend`` (``openvino``), or empty.
        instance_kind: the instance kind it runs on by default (``cpu`` or ``gpu``).
        only_kind: True when it runs on that kind alone (another is refused).
        files: ``(source path, name in the version folder)`` per file, the engine file last (the
            one that makes the model readable is copied last).
        parameters: ``ModelConfig.parameters`` to set (string values).
        notes: one-line notes on what the config cannot express (``{name}`` stands for the model name).
        max_batch: the largest batch it takes (a TensorRT profile's maximum), or None.
        min_batch: the smallest batch it takes (dynamic batching needs 1).
        accelerator: whether ONNX Runtime's TensorRT execution accelerator applies.
    """

    platform: str = ""
    backend: str = ""
    instance_kind: str = "cpu"
    only_kind: bool = False
    files: tuple[tuple[str, str], ...] = ()
    parameters: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    max_batch: int | None = None
    min_batch: int = 1
    accelerator: bool = False


@dataclass(frozen=True)
class Backend:
    """One registered backend.

    Attributes:
        name: ``onnxruntime``, ``openvino``, ``tensorrt``, ``executorch``.
        label: how messages name it (``ONNX Runtime``).
        suffixes: the engine file suffixes it claims, lower case, the one ``build`` writes first.
        precisions: what ``build`` makes.
        extra: the dsm-export extra that installs it (None: always installed).
        build: ``build(request: BuildRequest, log) -> BuildRecord``.
        read: ``read(path) -> EngineFile``; raises DSMError on a file it cannot read or that
            dsm-export did not write.
        open: ``open(path, options: RunnerOptions) -> Runner``.
        check_build: ``check_build(request)``: refuse a request before any work (one line), or None.
        options: the names of the build options it takes (:attr:`BuildRequest.options` keys; the
            command line's ``--smooth-alpha`` is ``smooth_alpha``); others are refused up front.
        triton: ``triton(engine: EngineFile) -> TritonPlacement``; None: Triton cannot serve it.
        preflight: ``preflight(path)``: check the engine's files are all there (one line), before
            any work; None: the file alone.
        file_hint: how a refusal of a wrong ``--output`` suffix explains the engine's file.
        foreign_note: added to the refusal of another backend's build options.
        providers: True when runners take ONNX Runtime execution providers (``--provider``).
        baseline: ``baseline(unmerged_onnx, options, folder) -> Runner``: the backend's fastest unmerged
            engine made from an unmerged fp32 export (``bench``'s default baseline; files it needs go in
            ``folder``); None: the user gives one.
        profile: ``profile(path, options, batch, runs, warmup) -> Profile``: the runtime's own time per
            op; None: the backend has no profiler hook (``dsm-export profile`` says so in one line).
        needs_gpu: True when a runner needs an NVIDIA GPU (commands say so before any work).
        timed_against_runtime: True when ``bench`` also times ONNX Runtime's unmerged fp32 model
            beside the engine's own unmerged baseline.
        streams: ``streams(asked, threads, batch) -> int``: how many parallel streams a runner splits a
            call of ``batch`` images over (:attr:`RunnerOptions.streams`); None: the backend has none.
    """

    name: str
    label: str
    suffixes: tuple[str, ...]
    precisions: tuple[str, ...]
    extra: str | None
    build: Callable[..., BuildRecord]
    read: Callable[[str], EngineFile]
    open: Callable[[str, RunnerOptions], Runner]
    check_build: Callable[[BuildRequest], None] | None = None
    options: tuple[str, ...] = ()
    triton: Callable[[EngineFile], TritonPlacement] | None = None
    preflight: Callable[[str], None] | None = None
    file_hint: str = ""
    foreign_note: str = ""
    providers: bool = False
    baseline: Callable[[str, RunnerOptions, str], Runner] | None = None
    profile: Callable[..., Profile] | None = None
    needs_gpu: bool = False
    timed_against_runtime: bool = False
    streams: Callable[[int | None, int | None, int], int] | None = None

    def claims(self, path: str) -> bool:
        """Whether ``path``'s suffix is one of this backend's."""
        return path.lower().endswith(self.suffixes)


def register(backend: Backend) -> Backend:
    """Add ``backend`` to the registry (a backend module calls it at import).

    Raises:
        ValueError: another backend has that name or claims one of its suffixes (a programming
            mistake, not a user's).
    """
    for other in _REGISTRY.values():
        if other.name != backend.name and set(other.suffixes) & set(backend.suffixes):
            raise ValueError(f"{backend.name} claims {other.name}'s suffixes {sorted(set(other.suffixes) & set(backend.suffixes))}")
    if backend.name in _REGISTRY and _REGISTRY[backend.name] is not backend:
        raise ValueError(f"backend {backend.name!r} is registered twice")
    _REGISTRY[backend.name] = backend
    return backend


def backends() -> list[Backend]:
    """Every registered backend, in :data:`BACKEND_MODULES` order (importing the modules once)."""
    global _LOADED
    if not _LOADED:
        for module in BACKEND_MODULES:
            importlib.import_module(f"{__package__}.{module}")
        _LOADED = True
    return [_REGISTRY[m] for m in BACKEND_MODULES if m in _REGISTRY]


def names() -> tuple[str, ...]:
    """The registered backends' names (``--backend`` choices)."""
    return tuple(b.name for b in backends())


def get_backend(name: str) -> Backend:
    """The backend called ``name``.

    Raises:
        DSMError: no such backend (the message lists them).
    """
    for backend in backends():
        if backend.name == name:
            return backend
    raise DSMError(f"backend {name!r}: choose one of {', '.join(names())}")


def find_backend(path: str) -> Backend | None:
    """The backend whose suffix ``path`` has, or None (a model name, say)."""
    return next((b for b in backends() if b.claims(path)), None)


def backend_for(path: str) -> Backend:
    """The backend whose engine ``path`` is, by its suffix.

    Raises:
        DSMError: no backend claims the suffix (the message lists the suffixes).
    """
    backend = find_backend(path)
    if backend is not None:
        return backend
    known = ", ".join(s for b in backends() for s in b.suffixes)
    raise DSMError(f"{path!r}: not an engine dsm-export knows (suffixes {known})")


def read_engine(path: str) -> EngineFile:
    """What the engine file ``path`` says about itself (:class:`EngineFile`).

    Raises:
        DSMError: a missing file, an unknown suffix, a file dsm-export did not write, or the backend's
            extra missing.
    """
    if not os.path.isfile(path):
        raise DSMError(f"engine {path!r} does not exist")
    return backend_for(path).read(path)


def open_runner(path: str, options: RunnerOptions | None = None) -> Runner:
    """A :class:`Runner` on the engine ``path``, from the backend that claims its suffix.

    Raises:
        DSMError: as :func:`read_engine`, and what the backend's runner raises (an unavailable
            provider, no GPU, a runtime that cannot load the file).
    """
    return backend_for(path).open(path, options or RunnerOptions())


def build_engine(request: BuildRequest, backend: str, log: Callable[[str], None] = print) -> BuildRecord:
    """Build an engine of ``backend`` (``dsm-export build``).

    Raises:
        DSMError: an unknown backend, a precision it does not build, an output whose suffix is not
            the backend's, and what the backend's checks and build raise.
    """
    b = get_backend(backend)
    check_request(b, request)
    return b.build(request, log)


def check_request(backend: Backend, request: BuildRequest) -> None:
    """Refuse a build request before any work: precision, output suffix, then the backend's own checks.

    Raises:
        DSMError: one line naming the flag.
    """
    if request.precision not in backend.precisions:
        others = [b.name for b in backends() if request.precision in b.precisions]
        raise DSMError(f"precision {request.precision!r}: --backend {backend.name} runs "
                       f"{_listing(backend.precisions)} (--precision {request.precision} is for --backend "
                       f"{' or '.join(others) or 'none'})")
    if not backend.claims(request.output):
        hint = backend.file_hint or f"{backend.label} engines are {' or '.join(backend.suffixes)} files"
        raise DSMError(f"--output {request.output!r}: {hint}")
    foreign = [k for k, v in request.options.items() if v is not None and k not in backend.options]
    if foreign:
        owners = sorted({b.name for b in backends() for k in foreign if k in b.options})
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        note = f" ({backend.foreign_note})" if backend.foreign_note else ""
        raise DSMError(f"{flags} apply to --backend {' or '.join(owners) or 'none'} only{note}")
    if backend.check_build is not None:
        backend.check_build(request)


def _listing(items) -> str:
    """``a, b or c``."""
    items = list(items)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def engine_files(path: str) -> tuple[str, ...]:
    """Every file of the engine ``path``, the engine first (what a copy of it must take along)."""
    return read_engine(path).files


def pad_batches(x: np.ndarray, static_batch: int | None, run: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Run ``run`` over ``x`` (``[N, ...]``) in chunks of ``static_batch``, the last one padded by
    repeating its last image, and return the first ``N`` outputs; with no static batch, one run.

    The one padding helper of every runner (ONNX Runtime, OpenVINO, TensorRT, ExecuTorch).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if static_batch is None:
        return run(x)
    outs = []
    for start in range(0, len(x), static_batch):
        chunk = x[start:start + static_batch]
        n = len(chunk)
        if n < static_batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], static_batch - n, axis=0)])
        outs.append(np.asarray(run(np.ascontiguousarray(chunk)))[:n])
    return np.concatenate(outs)
