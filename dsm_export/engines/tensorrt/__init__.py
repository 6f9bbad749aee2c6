"""TensorRT engines, full TensorRT or TensorRT-RTX (imported lazily: neither installs everywhere).

* :mod:`.flavours`: which TensorRT, its version rules, builder settings, compute-capability targets
  and what a TensorRT-RTX engine header says (pure functions).
* :mod:`.build`: input checks, then ``.plan`` + JSON sidecar (:func:`build_tensorrt`); TensorRT-RTX
  builds on a machine with no GPU.
* :mod:`.runner`: running and timing an engine on a GPU (:class:`TensorRTRunner`).
* :mod:`.common`: the process's TensorRT logger and the GPU, shared by both.
* :mod:`.backend`: the registry entry (``--backend tensorrt``).
"""

from .backend import BACKEND, read_plan
from .build import (
    TensorRTOptions,
    build_tensorrt,
    check_tensorrt_input,
    check_tensorrt_int8_input,
    contrib_ops,
    load_timing_cache,
    save_timing_cache,
)
from .common import GPU_NEEDED, build_log, gpu_info, require_gpu
from .flavours import (
    FLAVOURS,
    TENSORRT_INSTALL_HINT,
    BuildSettings,
    TensorRT,
    build_settings,
    import_tensorrt,
    parse_compute_capabilities,
    read_rtx_header,
    tensorrt_available,
    version_tuple,
    where_it_runs,
)
from .runner import (
    TensorRTRunner,
    batch_chunks,
    copy_file,
    engine_info,
    engine_validity,
    read_sidecar,
    tensorrt_for_engine,
)

__all__ = [
    "BACKEND", "read_plan", "FLAVOURS", "GPU_NEEDED", "TENSORRT_INSTALL_HINT", "BuildSettings", "TensorRT", "TensorRTOptions",
    "TensorRTRunner", "batch_chunks", "build_log", "build_settings", "build_tensorrt", "check_tensorrt_input",
    "check_tensorrt_int8_input", "contrib_ops", "copy_file", "engine_info", "engine_validity", "gpu_info",
    "import_tensorrt", "load_timing_cache", "parse_compute_capabilities", "read_rtx_header", "read_sidecar",
    "require_gpu", "save_timing_cache", "tensorrt_available", "tensorrt_for_engine", "version_tuple",
    "where_it_runs",
]
