"""dsm-export: Delayed Spatial Merging (DSM) for timm Vision Transformers, exported to ONNX.

Heo, Azizi, Fayyazi, Pedram, "Training-Free Acceleration of ViTs with Delayed Spatial Merging",
arXiv 2303.02331; token merging after Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023.

The Python API, one call per step of the main job (:mod:`dsm_export.api`):

* :func:`dsm_export.export` -- a static-shape ONNX file of a timm ViT under a merge schedule.
* :func:`dsm_export.validate` -- an engine against PyTorch: parity, KL and agreement.
* :func:`dsm_export.quantize` -- INT8 with the matching path kept in fp32.
* :func:`dsm_export.build` -- an engine: ONNX Runtime, OpenVINO or TensorRT.
* :func:`dsm_export.predict` -- an engine over a data set of images, rows to Parquet (resumable;
  ``ray=RayOptions()`` on a Ray cluster).
* :func:`dsm_export.tune` -- the schedule (and precision) with the least KL at a target; a
  :class:`TuneReport`.
* :class:`dsm_export.Schedule`, :func:`dsm_export.apply` -- schedules, and a timm ViT running one
  in PyTorch (the reference form).

Layers, lowest first (``tests/test_layers.py`` keeps them): ``core`` (schedule, merge maths, patch,
FLOPs), ``graph`` (ONNX export, graph facts) and ``metrics``, ``engines``, ``check``, ``search``,
``serving``, then ``cli`` and this API.
"""

from ._version import __version__
from .core.patch import MergedViT, apply
from .core.schedule import BlockPlan, Schedule, resolve
from .errors import DSMError, ScheduleError, UnsupportedModelError

_API = ("build", "export", "predict", "quantize", "tune", "validate", "PredictOptions", "RayOptions", "TuneOptions",
        "TuneReport", "QuantizeOptions")

__all__ = [
    "BlockPlan", "DSMError", "MergedViT", "PredictOptions", "QuantizeOptions", "RayOptions", "Schedule",
    "ScheduleError", "TuneOptions", "TuneReport", "UnsupportedModelError", "__version__", "apply", "build", "export",
    "predict", "quantize", "resolve", "tune", "validate",
]


def __getattr__(name: str):
    """The API calls, imported on first use (``import dsm_export`` stays light: no ONNX, no runtime)."""
    if name in _API:
        from . import api  # noqa: PLC0415 - lazy (PEP 562): `import dsm_export` loads no ONNX, no runtime

        return getattr(api, name)
    raise AttributeError(f"module 'dsm_export' has no attribute {name!r}")
