"""dsm-export: Delayed Spatial Merging (DSM) for timm Vision Transformers, exported to ONNX.

Heo, Azizi, Fayyazi, Pedram, "Training-Free Acceleration of ViTs with Delayed Spatial Merging",
arXiv 2303.02331; token merging after Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023.

Main entry points:

* :func:`dsm_export.apply` -- run a timm ViT under a merge schedule (PyTorch).
* :class:`dsm_export.Schedule` -- parse and resolve merge schedules.
* :func:`dsm_export.export.export_onnx` -- static-shape ONNX export.
* :func:`dsm_export.validate.validate` -- ONNX Runtime parity and accuracy report.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from .errors import DSMError, ScheduleError, UnsupportedModelError
from .patch import MergedViT, apply
from .schedule import BlockPlan, Schedule, resolve

try:
    __version__ = _version("dsm-export")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"

__all__ = [
    "BlockPlan", "DSMError", "MergedViT", "Schedule", "ScheduleError", "UnsupportedModelError",
    "__version__", "apply", "resolve",
]
