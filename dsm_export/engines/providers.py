"""ONNX Runtime execution providers: one place that turns a user's ``--provider`` into the provider
list of an ``InferenceSession`` and creates sessions with it.

Short names: ``cpu``, ``cuda``, ``tensorrt`` (ONNX Runtime's TensorRT provider, with CUDA and CPU as
fallbacks for the nodes it does not take), ``openvino``; any full provider name
(``onnxruntime.get_all_providers()``) is accepted as well. CUDA and TensorRT need the
``onnxruntime-gpu`` wheel (``pip install 'dsm-export[gpu]'``, see the README), OpenVINO needs
``onnxruntime-openvino``.
"""

from __future__ import annotations

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
    import onnxruntime as ort

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


def create_session(path: str, provider: str | None = "cpu", threads: int | None = None,
                   optimization: str = "all"):
    """An ``onnxruntime.InferenceSession`` for ``path`` on the provider ``provider``.

    Args:
        path: ONNX file.
        provider: as for :func:`resolve_providers`.
        threads: intra-op threads (default: ONNX Runtime's, all cores).
        optimization: graph optimization level: ``all`` (``ORT_ENABLE_ALL``) or ``default``
            (ONNX Runtime's default).

    Raises:
        DSMError: an unusable provider (see :func:`resolve_providers`), a provider that ONNX Runtime
            could not start (it fell back to another: e.g. CUDA libraries or the GPU missing), or a
            file ONNX Runtime cannot load.
    """
    import onnxruntime as ort

    providers = resolve_providers(provider)
    opts = ort.SessionOptions()
    if optimization == "all":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(path, opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises several types for bad files and providers
        text = str(exc).strip().splitlines()
        raise DSMError(f"ONNX Runtime cannot load {path!r} on {providers[0]}: "
                       f"{text[0] if text else type(exc).__name__}") from None
    used = session.get_providers()
    if providers[0] not in used:
        raise DSMError(f"ONNX Runtime could not start {providers[0]} for {path!r} (it fell back to "
                       f"{', '.join(used)}): check the GPU, driver and CUDA/cuDNN libraries")
    return session
