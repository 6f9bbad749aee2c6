"""Checks of a built TensorRT engine, shared by the TensorRT build tests and the parity tests that
build an engine from the file they just checked (one export, two uses)."""

import os

import torch

from dsm_export.cli import main
from dsm_export.engines.tensorrt import engine_validity, import_tensorrt, read_rtx_header, read_sidecar
from dsm_export.errors import DSMError


def installed_tensorrt():
    """The installed TensorRT, or None; missing in CI (which installs the tensorrt-rtx extra) it raises."""
    try:
        return import_tensorrt("auto")
    except DSMError:
        if os.environ.get("CI"):
            raise
        return None


def assert_engine(plan, tensorrt, precision, targets=()):
    """The plan and its sidecar exist, the build logged no error, and the engine header carries the
    release that built it and the targets asked (the release's defaults when none were)."""
    assert os.path.getsize(plan) > 0
    sidecar = read_sidecar(str(plan))
    assert sidecar["flavour"] == tensorrt.flavour and sidecar["tensorrt_version"] == tensorrt.version
    assert sidecar["precision"] == precision and (sidecar["strongly_typed"] or tensorrt.flavour == "enterprise")
    assert sidecar["log"]["error_count"] == 0, sidecar["log"]["errors"]
    assert sidecar["build_seconds"] > 0 and sidecar["plan_bytes"] == os.path.getsize(plan)
    assert sidecar["compute_capabilities"] == list(targets)
    if tensorrt.flavour != "rtx":
        return sidecar
    with open(plan, "rb") as fh:
        data = fh.read()
    header = read_rtx_header(data[:64])
    assert header["magic"] and header["release"] == tensorrt.version
    if targets:
        assert header["targets"] == list(targets) and header["unnamed_target_bits"] == 0
    else:  # TensorRT-RTX docs: by default Ampere RTX (8.6), Ada (8.9) and Blackwell (12.0), among others
        assert {"8.6", "8.9", "12.0"} <= set(header["targets"])
    assert sidecar["engine_targets"] == header["targets"]
    # TensorRT-RTX's own header check: never malformed or from another release; without a GPU it
    # can say no more than that (it cannot read the GPU's compute capability)
    validity, why = engine_validity(tensorrt, data)
    assert not {"MALFORMED_ENGINE", "VERSION_MISMATCH"} & set(why)
    if not torch.cuda.is_available():
        assert validity == "INVALID"
    return sidecar


def build_and_check(onnx_path, tmp_path, precision="fp32"):
    """``dsm-export build ONNX --backend tensorrt`` and :func:`assert_engine` on the plan; nothing
    where TensorRT is not installed outside CI (the caller's own checks still run)."""
    tensorrt = installed_tensorrt()
    if tensorrt is None:
        return None
    plan = os.path.join(str(tmp_path), os.path.basename(str(onnx_path))[:-5] + ".plan")
    assert main(["build", str(onnx_path), "--backend", "tensorrt", "--precision", precision, "--output", plan]) == 0
    return assert_engine(plan, tensorrt, precision)
