"""The runtimes the engine search builds, times and scores candidates in: ONNX Runtime and OpenVINO.

:func:`dsm_export.search.engine_search.search_engines` is the same search for both. What differs is held
here, behind one small interface:

- ``precisions`` and ``auto``: what can be built, and what ``--precision auto`` searches;
- ``build(fp32_path, precision, calib)``: the engine file of one precision from the fp32 export;
- ``throughput(engines, baseline_onnx)``: images/s of each engine and of ``"baseline"`` in one
  alternating run (:func:`dsm_export.search.timing.ort_throughput` and
  :func:`dsm_export.search.timing.alternating_throughput`);
- ``outputs(path, pixels)``: the engine's logits (or embeddings), to score its KL;
- ``exact(precision)``: whether that precision's outputs are the PyTorch reference's to 1e-4, so
  the search may score it in PyTorch;
- ``machine()``: what a report prints about the measurement.

The baseline is the fastest unmerged engine of the same runtime: ONNX Runtime's fp32 unmerged
model, or OpenVINO's default compile of it (bf16 on a CPU with AVX-512 BF16 or AMX, f32 elsewhere).
OpenVINO's runs also time ONNX Runtime's fp32 unmerged model (``"onnxruntime"``), so a report gives
the speed-up against both.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from ..engines.int8.quantize import QuantizeOptions, quantize_int8
from ..engines.openvino import (OPENVINO_INSTALL_HINT, PRECISIONS as OPENVINO_PRECISIONS, DefaultCompileRunner,
                                OpenVINOOptions, OpenVINORunner, build_openvino, cpu_has_bf16, import_openvino,
                                stream_count)
from ..engines.registry import open_runner
from ..errors import DSMError
from .timing import alternating_throughput, cpu_name, make_session, ort_throughput

# int8: static QDQ (TensorRT-compatible); int8-dynamic: ONNX Runtime dynamic quantization, the first
# block kept fp32 (the dynamic default); int8-dynamic-all: dynamic, every weight MatMul quantized.
PRECISIONS = ("fp32", "int8", "int8-dynamic", "int8-dynamic-all")
# SmoothQuant migration strength of the search's INT8 engines (dsm_export.engines.int8.smoothing), chosen on
# calibration-split photos by research/int8_choices.py (README, INT8 section): 0.7 lowered the KL of
# 5 of the 6 mode x schedule pairs it was tried on, 0.5 raised it on the merged model.
SMOOTH_ALPHA = 0.7
# OpenVINO timings keep the pairs whose baseline ran at this fraction of its full speed or more
# (dsm_export.search.timing.alternating_throughput): on a shared 2-core VM (AVX-512 BF16 and VNNI),
# slow stretches of seconds to a minute ran the unmerged bf16 model 12 % slower (120 against 136
# images/s) and a merged int8 one 40 % slower (143 against 235; an ad-hoc probe alternating the two
# for a minute, 2026-12-04), so a speed-up timed there is biased low, and the search merges more
# than the target needs.
QUIET = 0.94
QUIET_REPEATS = 6  # ... timing on up to this many times `repeats` repetitions for them (slow stretches lasted a minute)


class OnnxRuntimeEngines:
    """ONNX Runtime engines: fp32 and the INT8 forms of :data:`PRECISIONS`.

    Args:
        provider: execution provider (:func:`dsm_export.engines.providers.resolve_providers`).
        threads: intra-op threads (default: all cores).
        batch, repeats: the timing (images per run; repetitions, median taken).
        quant_options: :class:`dsm_export.engines.int8.quantize.QuantizeOptions` of ``int8`` (default:
            :func:`precision_options`).
    """

    name = "onnxruntime"
    label = "ONNX Runtime"
    baseline_label = "the fp32 unmerged model (timm's arithmetic)"
    # what `tune` accepts and assumes (dsm_export.search.tuning reads these, never the name)
    tune_precisions = PRECISIONS + ("auto",)  # --precision choices; auto: the search tries every one
    default_precision = "fp32"  # --precision left out
    needs_target_speedup = False  # True: only a measured --target-speedup search runs in it
    takes_provider = True  # --provider (an ONNX Runtime execution provider) applies
    bf16 = False  # whether a bf16 engine runs bf16 on this CPU (ONNX Runtime builds none)

    def __init__(self, provider: str | None = "cpu", threads: int | None = None, batch: int = 32,
                 repeats: int = 5, quant_options=None):

        self.precisions = PRECISIONS
        self.auto = PRECISIONS
        self.provider, self.threads, self.batch, self.repeats = provider, threads, batch, repeats
        self.quant_options = quant_options
        self.notes: list[str] = []

    def build(self, fp32_path: str, precision: str, calib: np.ndarray) -> str:
        """The ``precision`` engine of ``fp32_path``: the file itself for fp32, else quantized
        (:func:`dsm_export.engines.int8.quantize.quantize_int8`) beside it."""
        if precision == "fp32":
            return fp32_path
        folder, stem = os.path.split(fp32_path)
        path = os.path.join(folder, precision.replace("-", "_") + stem[len("fp32"):])
        quantize_int8(fp32_path, path, calib, precision_options(precision, self.quant_options))
        return path

    def is_baseline(self, precision: str, schedule_is_none: bool, separate_baseline: bool) -> bool:
        """Whether this engine is the baseline itself (its speed-up is 1 by definition)."""
        return precision == "fp32" and schedule_is_none and not separate_baseline

    def throughput(self, engines: dict[str, str], baseline_onnx: str) -> dict[str, float]:
        """images/s of ``engines`` and ``"baseline"`` (``baseline_onnx``, timed before each engine)."""
        return ort_throughput({"baseline": baseline_onnx, **engines}, batch=self.batch, repeats=self.repeats,
                              threads=self.threads, provider=self.provider, reference="baseline")

    def outputs(self, path: str, pixels: np.ndarray) -> np.ndarray:
        """``[N, classes]`` outputs of an ONNX file over ``pixels`` ``[N, 3, H, W]``."""

        return ort_logits(path, pixels)

    def release(self) -> None:
        """Nothing held between rungs."""

    @staticmethod
    def exact(precision: str) -> bool:
        return precision == "fp32"

    def machine(self) -> dict:
        return {"cpu": cpu_name(), "runtime": self.name, "onnxruntime": ort.__version__,
                "threads": self.threads or os.cpu_count(), "batch": self.batch, "repeats": self.repeats}


class OpenVINOEngines:
    """OpenVINO engines (IR ``.xml`` + ``.bin``, :func:`dsm_export.engines.openvino.build_openvino`):
    ``fp32`` (f32 forced), ``bf16`` (OpenVINO's default on a CPU with BF16; f32 elsewhere) and
    ``int8`` (NNCF, the matching path and the attention MatMuls kept out).

    The first int8 engine chooses its SmoothQuant strength by KL on held calibration images (as
    ``build`` does); every later one reuses that strength, so a search pays the choice once.

    Speed-ups count the pairs timed while the machine ran at full speed (:data:`QUIET`; the
    baseline's full speed is remembered across a search's runs, so a run timed wholly in a slow
    stretch times on until it has quiet pairs, up to :data:`QUIET_REPEATS` times ``repeats``).

    Args:
        threads: ``INFERENCE_NUM_THREADS`` (and ONNX Runtime's threads for its baseline).
        batch, repeats: the timing.

    Raises:
        DSMError: OpenVINO or NNCF not installed.
    """

    name = "openvino"
    label = "OpenVINO"
    baseline_label = "OpenVINO's default compile of the unmerged model"
    # as OnnxRuntimeEngines' (an instance sets bf16 from the CPU)
    tune_precisions = ("fp32", "bf16", "int8", "auto")
    default_precision = "auto"
    needs_target_speedup = True  # it measures OpenVINO engines: no FLOP-target export
    takes_provider = False

    def __init__(self, threads: int | None = None, batch: int = 32, repeats: int = 5):
        self.ov = import_openvino()
        try:
            import nncf  # noqa: F401
        except ImportError as exc:
            raise DSMError(OPENVINO_INSTALL_HINT) from exc
        self.core = self.ov.Core()
        self.precisions = OPENVINO_PRECISIONS
        self.threads, self.batch, self.repeats = threads, batch, repeats
        self.bf16 = cpu_has_bf16(self.core)
        # without BF16 in the CPU, a bf16 engine compiles to f32: searching both would time one engine twice
        self.auto = ("bf16", "int8") if self.bf16 else ("fp32", "int8")
        self.smooth_alpha: float | None = None
        self.notes: list[str] = []
        self._runners: dict[str, object] = {}
        self._baselines: dict[str, object] = {}  # baseline ONNX file -> its DefaultCompileRunner
        self._full_speed: dict[str, float] = {}  # baseline file -> its full speed (images/s), for QUIET
        self.timings: list[dict] = []  # each throughput run's quiet-pair statistics

    def build(self, fp32_path: str, precision: str, calib: np.ndarray) -> str:
        """The ``precision`` IR of ``fp32_path``, beside it (``<precision>_<tag>.xml``)."""
        folder, stem = os.path.split(fp32_path)
        path = os.path.join(folder, f"ov_{precision}{stem[len('fp32'):-len('.onnx')]}.xml")
        lines: list[str] = []
        rec = build_openvino(fp32_path, path, OpenVINOOptions(precision, smooth_alpha=self.smooth_alpha),
                             pixels=calib if precision == "int8" else None, log=lines.append)
        if precision == "int8" and self.smooth_alpha is None:
            self.smooth_alpha = float(rec["smooth_alpha"])
            trials = ", ".join(f"{a:g}: {kl:.4f}" for a, kl in rec["smooth_trials"])
            self.notes.append(f"SmoothQuant alpha {self.smooth_alpha:g} for every int8 engine, chosen on "
                              f"{os.path.basename(fp32_path)} by KL to fp32 on held calibration images ({trials})")
        return path

    def is_baseline(self, precision: str, schedule_is_none: bool, separate_baseline: bool) -> bool:
        return False  # the baseline is OpenVINO's default compile of timm's model: every engine is timed

    def _runner(self, path: str):
        if path not in self._runners:
            self._runners[path] = OpenVINORunner(path, self.threads)
        return self._runners[path]

    def _baseline(self, onnx_path: str):
        if onnx_path not in self._baselines:
            self._baselines[onnx_path] = DefaultCompileRunner(onnx_path, self.threads)
        return self._baselines[onnx_path]

    def throughput(self, engines: dict[str, str], baseline_onnx: str) -> dict[str, float]:
        """images/s of ``engines`` (IR files), of ``"baseline"`` (OpenVINO's default compile of
        ``baseline_onnx``, timed before each engine) and of ``"onnxruntime"`` (ONNX Runtime fp32 on
        ``baseline_onnx``), in one alternating run."""
        base = self._baseline(baseline_onnx)  # each call splits the batch over streams, as a runner does
        # ONNX Runtime's threads spin after a run by default: on 2 cores the OpenVINO baseline timed
        # right after it ran 10 % slower (121 against 135 images/s), and every pair it began was dropped
        session = make_session(baseline_onnx, self.threads, spinning=False)
        shape = [self.batch] + list(session.get_inputs()[0].shape[1:])
        x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
        feed = {session.get_inputs()[0].name: x}
        runs = {"baseline": lambda: base(x), "onnxruntime": lambda: session.run(None, feed)}
        for label, path in engines.items():
            runs[label] = lambda r=self._runner(path): r(x)
        stats: dict = {}
        rates = alternating_throughput(runs, self.batch, self.repeats, reference="baseline", quiet=QUIET,
                                       full_speed=self._full_speed.get(baseline_onnx),
                                       max_repeats=QUIET_REPEATS * self.repeats, stats=stats)
        if stats.get("full_speed"):
            self._full_speed[baseline_onnx] = max(self._full_speed.get(baseline_onnx, 0.0), stats["full_speed"])
        self.timings.append(stats)
        return rates

    def outputs(self, path: str, pixels: np.ndarray) -> np.ndarray:
        """``[N, classes]`` outputs of an IR over ``pixels`` ``[N, 3, H, W]``, at its recorded precision."""
        run = self._runner(path)
        return np.concatenate([run(pixels[i:i + self.batch]) for i in range(0, len(pixels), self.batch)])

    def release(self) -> None:
        """Drop the compiled engines (memory) once a rung is scored."""
        self._runners.clear()

    @staticmethod
    def exact(precision: str) -> bool:
        return precision == "fp32"

    def machine(self) -> dict:
        pairs = sum(n for t in self.timings for n in t.get("kept", {}).values())
        return {"cpu": cpu_name(), "runtime": self.name, "openvino": self.ov.__version__.split("-")[0],
                "onnxruntime": ort.__version__, "cpu_bf16": self.bf16,
                "baseline_precision": "bf16" if self.bf16 else "f32",
                "threads": self.threads or os.cpu_count(), "batch": self.batch, "repeats": self.repeats,
                "openvino_streams": stream_count(None, self.threads, self.batch), "quiet": QUIET,
                "timing_runs": len(self.timings), "pairs_kept": pairs,
                "repetitions": sum(t.get("repetitions", 0) for t in self.timings),
                "fallbacks": sum(bool(t.get("fallback")) for t in self.timings)}


# The search runtimes by name (``--backend`` of ``tune``): the keys are the classes' ``name``.
RUNTIMES = {cls.name: cls for cls in (OnnxRuntimeEngines, OpenVINOEngines)}
# Every precision `tune --precision` takes in some runtime, ``auto`` last (the flag's choices).
TUNE_PRECISIONS = tuple(sorted(dict.fromkeys(p for cls in RUNTIMES.values() for p in cls.tune_precisions),
                               key=lambda p: p == "auto"))


def make_runtime(backend: str, provider: str | None = "cpu", threads: int | None = None, batch: int = 32,
                 repeats: int = 5, quant_options=None):
    """The search runtime of ``backend`` (a key of :data:`RUNTIMES`: ``onnxruntime`` or ``openvino``).

    Raises:
        DSMError: another backend, or its runtime not installed.
    """
    cls = RUNTIMES.get(backend)
    if cls is None:
        raise DSMError(f"--backend {backend}: the search measures {' or '.join(RUNTIMES)}")
    kwargs = {"threads": threads, "batch": batch, "repeats": repeats}
    if cls.takes_provider:
        kwargs.update(provider=provider, quant_options=quant_options)
    return cls(**kwargs)


def precision_options(precision: str, static_options=None):
    """The :class:`dsm_export.engines.int8.quantize.QuantizeOptions` of an INT8 ``precision`` of :data:`PRECISIONS`
    (``static_options`` for ``int8``, None meaning the static defaults with SmoothQuant at
    :data:`SMOOTH_ALPHA`). Every precision smooths with :data:`SMOOTH_ALPHA`, so every one needs
    calibration images.

    ``int8-dynamic`` keeps the first block fp32 (ONNX Runtime's dynamic mode with dsm-export's
    default, more accurate); ``int8-dynamic-all`` quantizes it too (faster: the first block's four
    fp32 MatMuls run on every token, before any merge, so they weigh more in a merged engine; the
    README's frontier times both). Which one pays at a speed target is for the search to measure.

    Raises:
        DSMError: ``precision`` is not an INT8 precision of :data:`PRECISIONS`.
    """
    if precision == "int8":
        return static_options or QuantizeOptions(smooth_alpha=SMOOTH_ALPHA)
    if precision == "int8-dynamic":
        return QuantizeOptions(mode="dynamic", smooth_alpha=SMOOTH_ALPHA)
    if precision == "int8-dynamic-all":
        return QuantizeOptions(mode="dynamic", keep_fp32=(), smooth_alpha=SMOOTH_ALPHA)
    raise DSMError(f"{precision!r} is not an INT8 precision (one of {PRECISIONS[1:]})")


def ort_logits(path: str, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    """Outputs ``[N, classes]`` (or ``[N, dim]``) of an engine file over ``pixels`` ``[N, 3, H, W]``
    (an ONNX file: ONNX Runtime CPU), ``batch`` images per run."""
    runner = open_runner(path)
    try:
        return np.concatenate([runner(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    finally:
        runner.close()
