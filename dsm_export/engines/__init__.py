"""Engines from a validated DSM ONNX file, one module per backend.

* :mod:`.onnxruntime`: ONNX Runtime optimized and fp16 graphs.
* :mod:`.tensorrt`: TensorRT plans, full TensorRT or TensorRT-RTX (imported lazily).
"""

from .onnxruntime import build_onnxruntime, convert_fp16, fp32_island_nodes
from .tensorrt import (
    TENSORRT_INSTALL_HINT,
    TensorRTOptions,
    TensorRTRunner,
    build_tensorrt,
    copy_file,
    engine_info,
    gpu_info,
    import_tensorrt,
    require_gpu,
)

__all__ = [
    "TENSORRT_INSTALL_HINT", "TensorRTOptions", "TensorRTRunner", "build_onnxruntime", "build_tensorrt",
    "convert_fp16", "copy_file", "engine_info", "fp32_island_nodes", "gpu_info", "import_tensorrt",
    "require_gpu",
]
