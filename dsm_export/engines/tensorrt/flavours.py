"""The two TensorRT flavours, their version rules, builder settings and compute-capability targets.

Pure functions of a version, a precision and the names a TensorRT module exposes, so that every
rule is tested without TensorRT; only :func:`import_tensorrt` imports anything.

* **Full TensorRT** ("enterprise", module ``tensorrt``, 10.x/11.x): builds on and for the GPU it
  runs on (autotuning on the device), for data-centre GPUs (A100, H100/H200, ...). Weak typing is
  deprecated from 10.12 and gone in 11; a timing cache speeds up rebuilds.
* **TensorRT-RTX** ("rtx", module ``tensorrt_rtx``, or ``tensorrt_rtx_bindings`` from the PyPI wheels
  ``tensorrt-rtx-cu12-libs`` + ``tensorrt-rtx-cu12-bindings``, 1.x): builds ahead of time on any
  machine, **no GPU needed** ("CPU-only AOT", TensorRT-RTX docs, *CPU-Only AOT and TensorRT-RTX
  Engines*), for the compute capabilities the builder config names; kernels are compiled just in
  time on the RTX GPU that runs the engine. Networks are strongly typed only (``BuilderFlag.FP16``
  and ``INT8`` do not exist); the timing cache has no effect and forces a GPU query, which breaks a
  CPU-only build (*Timing Cache Migration*), so it is never used: a runtime cache takes its place
  when running. There is no Hopper (9.0) target: on H100/H200 TensorRT-RTX is off-label.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ...errors import DSMError

FLAVOURS = ("auto", "enterprise", "rtx")
# Modules tried per flavour, in order (auto: full TensorRT first).
MODULES = {"enterprise": ("tensorrt",), "rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings")}
MIN_VERSION = {"enterprise": (10, 0), "rtx": (1, 0)}
STRONGLY_TYPED_FP32_FROM = (10, 12)  # full TensorRT: weak typing is deprecated from 10.12 and gone in 11

INSTALL_HINT = {
    "enterprise": ("full TensorRT is not installed: it needs an NVIDIA GPU with its driver, and "
                   "'pip install tensorrt' (NVIDIA's wheels, TensorRT 10.0 or newer, matching the CUDA of the driver)"),
    "rtx": ("TensorRT-RTX is not installed: pip install -e '.[tensorrt-rtx]' (the PyPI wheels "
            "tensorrt-rtx-cu12-libs and tensorrt-rtx-cu12-bindings; building needs no GPU)"),
}
TENSORRT_INSTALL_HINT = ("TensorRT is not installed: 'pip install -e .[tensorrt-rtx]' builds engines for RTX GPUs "
                         "on any machine (no GPU needed); full TensorRT for data-centre GPUs is 'pip install "
                         "tensorrt' (NVIDIA's wheels, 10.0 or newer) on a machine with an NVIDIA GPU and driver")

# "major.minor" -> ComputeCapability member of TensorRT-RTX (IBuilderConfig.set_compute_capability).
COMPUTE_CAPABILITIES = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120",
                        "12.1": "SM121"}
ARCHITECTURES = {"7.5": "Turing", "8.0": "Ampere data-centre, A100", "8.6": "Ampere RTX", "8.9": "Ada",
                 "9.0": "Hopper, H100/H200", "12.0": "Blackwell RTX", "12.1": "Blackwell, GB10"}


@dataclass(frozen=True)
class TensorRT:
    """An imported TensorRT flavour.

    Attributes:
        module: the imported Python module (``tensorrt``, ``tensorrt_rtx`` or ``tensorrt_rtx_bindings``).
        flavour: ``enterprise`` (full TensorRT) or ``rtx`` (TensorRT-RTX).
        version: the module's ``__version__`` (e.g. ``10.13.0.35``, ``1.7.1.116``).
    """

    module: object
    flavour: str
    version: str

    @property
    def name(self) -> str:
        """``TensorRT 10.13.0.35`` or ``TensorRT-RTX 1.7.1.116``."""
        return f"{'TensorRT-RTX' if self.flavour == 'rtx' else 'TensorRT'} {self.version}"


def flavour_of(module) -> str:
    """``rtx`` for a TensorRT-RTX module (whatever name it was imported under: it has
    ``ComputeCapability`` targets), else ``enterprise``."""
    return "rtx" if hasattr(module, "ComputeCapability") else "enterprise"


def import_tensorrt(flavour: str = "auto") -> TensorRT:
    """Import TensorRT of ``flavour`` (``auto``: full TensorRT if installed, else TensorRT-RTX).

    Raises:
        DSMError: an unknown flavour; the flavour is not installed (with install instructions); or
            its version is below :data:`MIN_VERSION`.
    """
    if flavour not in FLAVOURS:
        raise DSMError(f"--tensorrt must be one of {', '.join(FLAVOURS)}, got {flavour!r}")
    wanted = ("enterprise", "rtx") if flavour == "auto" else (flavour,)
    for kind in wanted:
        for name in MODULES[kind]:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            got = flavour_of(module)
            if got != kind and flavour != "auto":
                raise DSMError(f"the installed {name!r} module is {'TensorRT-RTX' if got == 'rtx' else 'full TensorRT'}, "
                               f"not the --tensorrt {flavour} asked for")
            trt = TensorRT(module, got, str(getattr(module, "__version__", "0")))
            check_version(trt.flavour, version_tuple(trt.version))
            return trt
    raise DSMError(TENSORRT_INSTALL_HINT if flavour == "auto" else INSTALL_HINT[flavour])


def tensorrt_available(flavour: str = "auto") -> bool:
    """Whether :func:`import_tensorrt` would succeed (importing it)."""
    try:
        import_tensorrt(flavour)
    except DSMError:
        return False
    return True


def version_tuple(v: str) -> tuple[int, int]:
    """``"10.12.0.36"`` -> ``(10, 12)``."""
    parts = [int(p) for p in v.split(".")[:2] if p.isdigit()]
    return tuple((parts + [0, 0])[:2])


def check_version(flavour: str, version: tuple[int, int]) -> None:
    """Refuse a TensorRT release older than this flavour's :data:`MIN_VERSION`.

    Raises:
        DSMError: naming the flavour, the version and the minimum.
    """
    low = MIN_VERSION[flavour]
    if tuple(version) < low:
        name = "TensorRT-RTX" if flavour == "rtx" else "TensorRT"
        raise DSMError(f"{name} {version[0]}.{version[1]} is too old: dsm-export needs {name} "
                       f"{low[0]}.{low[1]} or newer")


@dataclass(frozen=True)
class BuildSettings:
    """How to build for a TensorRT flavour, version and precision (:func:`build_settings`).

    Attributes:
        strongly_typed: create the network with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``.
        fp16_graph: parse the fp16 conversion of the ONNX graph (fp32 islands kept).
        set_flags, clear_flags: ``BuilderFlag`` member names to set / clear on the config.
        timing_cache: whether a timing cache may be used (full TensorRT only).
    """

    strongly_typed: bool
    fp16_graph: bool
    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    timing_cache: bool = True


def build_settings(version: tuple[int, int], precision: str, tf32: bool, builder_flags,
                   flavour: str = "enterprise") -> BuildSettings:
    """Network typing and builder flags for ``precision`` on TensorRT ``version`` of ``flavour``.

    * fp16: the fp16 ONNX graph as a strongly typed network on every version; no ``FP16`` flag
      (with it, weakly typed TensorRT may run the fp32 islands in fp16; TensorRT 11 and
      TensorRT-RTX have no such flag).
    * fp32: full TensorRT: strongly typed from 10.12 (weak typing deprecated there, removed in 11),
      weakly typed before; the same engine either way. TensorRT-RTX: always strongly typed.
    * int8: the QDQ graph as a strongly typed network (explicit quantization: the Q/DQ nodes fix
      the precisions; no ``INT8`` flag).
    * ``TF32`` is cleared unless ``tf32`` (it is on by default), where the flag exists.
    * TensorRT-RTX never uses a timing cache (no effect; it would need a GPU at build time).

    Args:
        version: ``(major, minor)`` of the flavour's release.
        precision: ``fp32``, ``fp16`` or ``int8``.
        tf32: allow TF32.
        builder_flags: names of the ``BuilderFlag`` members of this TensorRT.
        flavour: ``enterprise`` or ``rtx``.

    Raises:
        DSMError: an unknown precision or flavour, a release older than :data:`MIN_VERSION`, or
            ``tf32`` where this TensorRT has no such flag.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise DSMError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    if flavour not in MIN_VERSION:
        raise DSMError(f"TensorRT flavour must be enterprise or rtx, got {flavour!r}")
    check_version(flavour, version)
    flags = set(builder_flags)
    rtx = flavour == "rtx"
    strongly_typed = rtx or precision in ("fp16", "int8") or tuple(version) >= STRONGLY_TYPED_FP32_FROM
    set_flags, clear_flags = [], []
    if "TF32" in flags:
        (set_flags if tf32 else clear_flags).append("TF32")
    elif tf32:
        raise DSMError(f"TensorRT {version[0]}.{version[1]} has no TF32 builder flag")
    return BuildSettings(strongly_typed, precision == "fp16", tuple(set_flags), tuple(clear_flags),
                         timing_cache=not rtx)


def parse_compute_capabilities(text: str | None) -> tuple[str, ...]:
    """``"8.6,8.9,12.0"`` -> ``("8.6", "8.9", "12.0")``: the TensorRT-RTX targets of ``--compute-capability``.

    Empty or None: ``()``, the release's default targets. Order is kept, duplicates dropped.

    Raises:
        DSMError: a value TensorRT-RTX has no target for (Hopper 9.0 among them), naming the ones it has.
    """
    out: list[str] = []
    for part in (text or "").split(","):
        cc = part.strip().lower().removeprefix("sm")
        if not cc:
            continue
        if cc.isdigit() and len(cc) >= 2:  # sm86 / 86 -> 8.6, sm120 -> 12.0
            cc = f"{cc[:-1]}.{cc[-1]}"
        if cc not in COMPUTE_CAPABILITIES:
            extra = " (Hopper: TensorRT-RTX has no target for H100/H200; use full TensorRT there)" if cc == "9.0" else ""
            raise DSMError(f"TensorRT-RTX has no compute capability {part.strip()!r}{extra}: choose from "
                           f"{', '.join(COMPUTE_CAPABILITIES)}")
        if cc not in out:
            out.append(cc)
    return tuple(out)


def where_it_runs(flavour: str, targets: tuple[str, ...] | None, gpu: str | None = None,
                  gpu_cc: str | None = None) -> str:
    """One sentence: on which GPUs an engine runs, and on which it does not.

    Args:
        flavour: ``enterprise`` or ``rtx``.
        targets: the compute capabilities of an RTX engine (``None`` or empty: unknown).
        gpu, gpu_cc: the GPU a full-TensorRT engine was built on, and its compute capability.
    """
    if flavour == "enterprise":
        where = f"{gpu} (compute capability {gpu_cc})" if gpu else "the GPU it was built on"
        return (f"runs on {where} with the same TensorRT release only (full TensorRT tunes for the "
                "building GPU); rebuild for any other GPU or release")
    if not targets:
        return ("runs on the RTX GPUs of this TensorRT-RTX release's default targets, with the same "
                "release only")
    names = ", ".join(f"{cc} ({ARCHITECTURES.get(cc, 'unknown')})" for cc in targets)
    missing = [cc for cc in ("7.5", "9.0") if cc not in targets]
    return (f"runs on GPUs of compute capability {names}, with TensorRT-RTX of the same release only; "
            f"not on {' or '.join(f'{cc} ({ARCHITECTURES[cc]})' for cc in missing) or 'any other'} "
            "nor any compute capability not listed")


# --------------------------------------------------------------------------------------- engine header
# TensorRT-RTX engines start with a fixed-size header (``Runtime.engine_header_size``, 64 bytes in
# 1.7) that ``Runtime.get_engine_validity`` reads. Its layout is not documented; what dsm-export reads
# of it was established by building the same network for each target on TensorRT-RTX 1.7.1 and
# comparing the headers: the magic b"vtrt" at byte 0 (and again at 28), the release as four bytes
# (major, minor, patch, build) at 24, and the targets as a bit mask at byte 32. A default build
# (no target set) sets bits 0x02-0x40. Only releases with that layout are decoded.
HEADER_MAGIC = b"vtrt"
_HEADER_LAYOUT_RELEASES = ((1, 7),)
_TARGET_BITS = {0x02: "8.0", 0x04: "8.6", 0x08: "8.9", 0x10: "12.0", 0x20: "12.1"}


def read_rtx_header(data: bytes) -> dict:
    """What the header of a TensorRT-RTX engine says, as far as dsm-export can read it.

    Args:
        data: the first bytes of the ``.plan`` (at least 40).

    Returns:
        ``{"magic": bool, "release": "1.7.1.116" | None, "targets": [cc, ...] | None,
        "unnamed_target_bits": int}``; ``targets`` is None where the layout of the header's
        release is not known (see the comment above), and ``unnamed_target_bits`` counts the set
        target bits with no compute capability this module can name.
    """
    out = {"magic": data[:4] == HEADER_MAGIC, "release": None, "targets": None, "unnamed_target_bits": 0}
    if not out["magic"] or len(data) < 40 or data[28:32] != HEADER_MAGIC:
        return out
    release = tuple(data[24:28])
    out["release"] = ".".join(str(v) for v in release)
    if release[:2] in _HEADER_LAYOUT_RELEASES:
        mask = data[32]
        out["targets"] = [cc for bit, cc in _TARGET_BITS.items() if mask & bit]
        out["unnamed_target_bits"] = bin(mask & ~sum(_TARGET_BITS)).count("1")
    return out
