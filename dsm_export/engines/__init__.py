"""Engines from a validated DSM ONNX file: one module per backend, every backend in one registry.

* :mod:`.registry`: :class:`Backend`, the :class:`Runner` protocol, :func:`get_backend`,
  :func:`backend_for`, :func:`open_runner`, :func:`build_engine` (the only place commands look a
  backend up).
* :mod:`.onnxruntime`, :mod:`.openvino`, :mod:`.tensorrt`, :mod:`.executorch`: the backends, each
  registering itself on import.
* :mod:`.fp16`, :mod:`.int8`, :mod:`.providers`: shared by several backends.
"""

from .registry import (
    Backend,
    BuildRecord,
    BuildRequest,
    EngineFile,
    Runner,
    RunnerOptions,
    TritonPlacement,
    backend_for,
    backends,
    build_engine,
    engine_files,
    get_backend,
    import_optional,
    names,
    open_runner,
    read_engine,
)

__all__ = [
    "Backend", "BuildRecord", "BuildRequest", "EngineFile", "Runner", "RunnerOptions", "TritonPlacement",
    "backend_for", "backends", "build_engine", "engine_files", "get_backend", "import_optional", "names",
    "open_runner", "read_engine",
]
