"""The TensorRT backend's registry entry: TensorRT plans (``.plan``, ``.engine``) with their JSON sidecar,
built by full TensorRT or TensorRT-RTX (:mod:`.build`), run on an NVIDIA GPU (:mod:`.runner`)."""

from __future__ import annotations


from ... import checks
from ...errors import DSMError
from ..registry import Backend, BuildRecord, BuildRequest, EngineFile, RunnerOptions, TritonPlacement, register
from .build import TensorRTOptions, build_tensorrt
from .flavours import parse_compute_capabilities
from .runner import TensorRTRunner, read_plan, read_sidecar

OPTIONS = ("flavour", "compute_capability", "compute_capabilities", "workspace_mib", "timing_cache", "min_batch",
           "opt_batch", "max_batch", "tf32")


def _open(path: str, options: RunnerOptions) -> TensorRTRunner:
    if options.provider not in (None, "cpu"):
        raise DSMError("--provider is for ONNX files: a TensorRT engine runs in TensorRT")
    return TensorRTRunner(path, options.flavour, options.runtime_cache)


def tensorrt_options(request: BuildRequest) -> TensorRTOptions:
    """The :class:`TensorRTOptions` of a build request (``compute_capability``: a comma-separated string)."""
    opts = dict(request.options)
    text = opts.pop("compute_capability", None)
    if text:
        opts["compute_capabilities"] = parse_compute_capabilities(text)
    opts.setdefault("flavour", "auto")
    return TensorRTOptions(precision=request.precision, **{k: v for k, v in opts.items() if v is not None})


def _check_build(request: BuildRequest) -> None:
    """Every check (options, the sidecar and timing cache writable) before TensorRT builds."""
    checks.output_file(request.output + ".json", "--output sidecar")
    checks.output_file(request.options.get("timing_cache"), "--timing-cache")
    if request.calibration or request.options.get("smooth_alpha") is not None:
        raise DSMError("--backend tensorrt takes a built file: quantize with --backend onnxruntime "
                       "--precision int8 first (--calibration and --smooth-alpha belong there)")
    tensorrt_options(request)


def _build(request: BuildRequest, log=print) -> BuildRecord:
    """``build --backend tensorrt``: :func:`build_tensorrt`, the plan and its sidecar."""
    rec = build_tensorrt(request.source, request.output, tensorrt_options(request))
    name = "TensorRT-RTX" if rec["flavour"] == "rtx" else "TensorRT"
    on = "no GPU (CPU-only ahead-of-time build)" if rec["gpu"] is None else rec["gpu"]
    targets = rec["compute_capabilities"] or rec["engine_targets"]
    where = (f"; targets {', '.join(targets)}{'' if rec['compute_capabilities'] else ' (the release default)'}"
             if targets else "")
    lines = [f"wrote {request.output} and {request.output}.json: {name} {rec['tensorrt_version']}, "
             f"{rec['precision']}, {rec['layers']} layers, built in {rec['build_seconds']:.1f} s on {on}{where}",
             f"  the engine {rec['where']}"]
    return BuildRecord("tensorrt", request.precision, request.output, [request.output, request.output + ".json"],
                       lines, rec)


def _triton(engine: EngineFile) -> TritonPlacement:
    """Triton's TensorRT backend (``tensorrt_plan``, GPU instances); TensorRT-RTX plans are refused."""
    sidecar = read_sidecar(engine.path)
    if sidecar.get("flavour") == "rtx":
        raise DSMError(f"{engine.path!r} is a TensorRT-RTX engine: Triton's TensorRT backend (tensorrt_plan) loads "
                       "full-TensorRT plans only; give triton-repo the .onnx (ONNX Runtime backend) or build "
                       "the plan with --tensorrt enterprise on the serving GPU")
    profile = sidecar.get("profile") or {}
    return TritonPlacement(platform="tensorrt_plan", instance_kind="gpu", only_kind=True,
                           files=((engine.path, "model.plan"),),
                           max_batch=int(profile["max"][0]) if profile else None,
                           min_batch=int(profile["min"][0]) if profile else 1)


def _preflight(path: str) -> None:
    checks.input_file(path, "engine")
    read_sidecar(path)


BACKEND = register(Backend(
    name="tensorrt", label="TensorRT", suffixes=(".plan", ".engine"), precisions=("fp32", "fp16", "int8"),
    extra="tensorrt-rtx", build=_build, read=read_plan, open=_open, check_build=_check_build, options=OPTIONS,
    triton=_triton, preflight=_preflight, file_hint="a TensorRT engine is a .plan file (its sidecar .plan.json beside it)",
    needs_gpu=True))
