"""ONNX Runtime sessions and execution providers: one place that turns a user's ``--provider`` into
the provider list of an ``InferenceSession``, and :func:`create_session`, the package's only
constructor of ``onnxruntime.SessionOptions`` and ``InferenceSession``.

Short names: ``cpu``, ``cuda``, ``tensorrt`` (ONNX Runtime's TensorRT provider, with CUDA and CPU as
fallbacks for the nodes it does not take), ``openvino``; any full provider name
(``onnxruntime.get_all_providers()``) is accepted as well. CUDA and TensorRT need the
``onnxruntime-gpu`` wheel (``pip install 'dsm-export[gpu]'``, see the README), OpenVINO needs
``onnxruntime-openvino``.
"""

from __future__ import annotations

import onnxruntime as ort

from ..errors import DSMError

CPU = "CPUExecutionProvider"
PROVIDER_ALIASES = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
# Providers tried after the chosen one, in order (when installed); CPU always comes last.
_FALLBACKS = {"TensorrtExecutionProvider": ("CUDAExecutionProvider",)}
_PACKAGES = {
    "CUDAExecutionProvider": "onnxruntime-gpu (pip install 'dsm-export[gpu]', see the README)",
    "TensorrtExecutionProvider": "onnxruntime-gpu and TensorRT (see the README)",
    "OpenVINOExecutionProvider": "onnxruntime-openvino",
}


def resolve_providers(name: str | None = "cpu") -> list[str]:
    """The ``providers`` list for ``onnxruntime.InferenceSession`` from a ``--provider`` value.

    Args:
        name: ``cpu``, ``cuda``, ``tensorrt``, ``openvino`` (any case) or a full ONNX Runtime
            provider name such as ``CUDAExecutionProvider``; None means ``cpu``.

    Returns:
        The chosen provider first, then its installed fallbacks (CUDA after TensorRT), then
        ``CPUExecutionProvider``, e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]``.

    Raises:
        DSMError: an unknown name, or a provider this onnxruntime build does not have (the message
            names the installed ones, from ``onnxruntime.get_available_providers()``).
    """
    text = (name or "cpu").strip()
    full = PROVIDER_ALIASES.get(text.lower(), text)
    if full not in ort.get_all_providers():
        raise DSMError(f"unknown execution provider {text!r}: use {', '.join(PROVIDER_ALIASES)} "
                       "or a full ONNX Runtime provider name")
    available = ort.get_available_providers()
    if full not in available:
        need = _PACKAGES.get(full, "an onnxruntime build with it")
        raise DSMError(f"execution provider {full} is not in this onnxruntime {ort.__version__} "
                       f"(installed: {', '.join(available)}); it needs {need}")
    chain = [full] + [p for p in _FALLBACKS.get(full, ()) if p in available]
    if CPU not in chain:
        chain.append(CPU)
    return chain


# ``optimization`` of :func:`create_session` -> the ``onnxruntime.GraphOptimizationLevel`` set (None:
# leave ONNX Runtime's default, which is ``ORT_ENABLE_ALL`` in the Python API).
OPTIMIZATION_LEVELS = {
    "default": None,
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


def create_session(model: str | bytes, provider: str | None = "cpu", threads: int | None = None,
                   optimization: str = "all", *, optimized_path: str | None = None,
                   optimized_data: str | None = None, log_severity: int | None = None,
                   label: str | None = None, spinning: bool | None = None, profile_prefix: str | None = None):
    """An ``onnxruntime.InferenceSession`` for ``model`` on the provider ``provider``.

    The package's only place that builds ``onnxruntime.SessionOptions`` or an ``InferenceSession``
    (validation, timing, the ONNX Runtime engine build and the SmoothQuant probe all come here).
    Every option left at its default is ONNX Runtime's own (execution mode, inter-op threads, ...).

    Args:
        model: ONNX file path, or a serialized ``ModelProto`` (``bytes``).
        provider: as for :func:`resolve_providers` (``cpu``, ``cuda``, ``tensorrt``, ``openvino`` or
            a full provider name; None means ``cpu``); its fallbacks and CPU follow it.
        threads: intra-op threads (``SessionOptions.intra_op_num_threads``); None or 0: ONNX
            Runtime's default (one per physical core).
        optimization: graph optimization level, a key of :data:`OPTIMIZATION_LEVELS`: ``all``
            (``ORT_ENABLE_ALL``), ``extended``, ``basic``, ``disabled``, or ``default`` (leave
            ``SessionOptions``' own level).
        optimized_path: where ONNX Runtime writes the optimized graph
            (``SessionOptions.optimized_model_filepath``) while creating the session; None: nowhere.
        optimized_data: with ``optimized_path``, write its initializers of 1 KiB or more to this
            data file (a name relative to ``optimized_path``'s folder; ONNX Runtime's
            ``session.optimized_model_external_initializers_file_name``), as a model over
            protobuf's 2 GiB limit needs; None: one file.
        log_severity: ``SessionOptions.log_severity_level`` (0 verbose ... 4 fatal); None: ONNX
            Runtime's default (2, warnings).
        label: how error messages name the model (default: the path, or "an in-memory ONNX model").
        profile_prefix: turn ONNX Runtime's profiler on, its JSON trace written under this prefix
            (``SessionOptions.enable_profiling``, ``profile_file_prefix``; ``session.end_profiling()``
            returns the file); None: off.
        spinning: False: the intra-op threads block as soon as a run ends instead of spinning
            (``session.intra_op.allow_spinning`` 0), so that they leave the cores to another
            runtime timed right after (OpenVINO's engines, on 2 cores); None: ONNX Runtime's default.

    Returns:
        The session, its providers checked: the chosen provider is the first one it runs on.

    Raises:
        DSMError: an unknown or uninstalled provider (see :func:`resolve_providers`); a file or
            model ONNX Runtime cannot load (missing path, not ONNX, unsupported operator: the
            message has ONNX Runtime's first line); a provider that ONNX Runtime could not start
            (it fell back to another: e.g. CUDA libraries or the GPU missing).
        ValueError: an ``optimization`` not in :data:`OPTIMIZATION_LEVELS` (a caller's mistake).
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization {optimization!r}: use one of {', '.join(OPTIMIZATION_LEVELS)}")
    name = label or (repr(model) if isinstance(model, str) else "an in-memory ONNX model")
    providers = resolve_providers(provider)
    opts = ort.SessionOptions()
    level = OPTIMIZATION_LEVELS[optimization]
    if level is not None:
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if threads:
        opts.intra_op_num_threads = threads
    if optimized_path is not None:
        opts.optimized_model_filepath = optimized_path
        if optimized_data is not None:
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", optimized_data)
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    if log_severity is not None:
        opts.log_severity_level = log_severity
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    try:
        session = ort.InferenceSession(model, opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises several types for bad files and providers
        text = str(exc).strip().splitlines()
        raise DSMError(f"ONNX Runtime cannot load {name} on {providers[0]}: "
                       f"{text[0] if text else type(exc).__name__}") from None
    used = session.get_providers()
    if providers[0] not in used:
        raise DSMError(f"ONNX Runtime could not start {providers[0]} for {name} (it fell back to "
                       f"{', '.join(used)}): check the GPU, driver and CUDA/cuDNN libraries")
    return session
