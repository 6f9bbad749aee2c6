"""What the builder and the runner share: the process's TensorRT logger, and the GPU (through torch)."""

from __future__ import annotations

import torch

from ...errors import DSMError
from .flavours import TensorRT

GPU_NEEDED = ("running a TensorRT engine needs an NVIDIA GPU and none is visible here (torch.cuda.is_available() "
              "is False): build engines on this machine, run validate/bench where the GPU is")


def gpu_info() -> dict:
    """GPU name and compute capability of device 0 (through torch); None for both without a GPU."""
    if not torch.cuda.is_available():
        return {"gpu": None, "compute_capability": None}
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def require_gpu() -> None:
    """Raise the one-line :data:`GPU_NEEDED` error where no CUDA GPU is visible."""
    if not torch.cuda.is_available():
        raise DSMError(GPU_NEEDED)


_LOGGERS: dict[int, object] = {}


def build_log(trt: TensorRT):
    """The process's logger for this TensorRT module: it records every message at WARNING and above.

    TensorRT keeps the first logger a process gives a builder, runtime or refitter and ignores any
    later one (it logs a warning saying so), so one logger per module serves every build; call
    ``reset()`` before a build and read ``errors`` / ``warnings`` after it.
    """
    key = id(trt.module)
    if key not in _LOGGERS:
        module = trt.module
        severity = module.ILogger.Severity

        class _Log(module.ILogger):
            def __init__(self):
                module.ILogger.__init__(self)
                self.reset()

            def reset(self):
                self.errors: list[str] = []
                self.warnings: list[str] = []

            def log(self, level, msg):  # called by TensorRT
                if level in (severity.INTERNAL_ERROR, severity.ERROR):
                    self.errors.append(str(msg))
                elif level == severity.WARNING:
                    self.warnings.append(str(msg))

        _LOGGERS[key] = _Log()
    return _LOGGERS[key]
