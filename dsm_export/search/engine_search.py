"""Search schedule x precision by *measured* speed-up: the engine with the least KL at a speed target.

A FLOP ratio says little about INT8: quantization speeds the same schedule up by a factor that
depends on the CPU, the kernels and the token counts. So this search measures every candidate
engine on this machine -- in ONNX Runtime against the fp32 unmerged export, or in OpenVINO against
its default compile of it (:mod:`dsm_export.search.runtimes`) -- in one alternating run.
That baseline runs every block on every token, as timm's model does; every candidate, the unmerged
one too, runs its last block for the prefix tokens alone where only they reach the head
(:meth:`dsm_export.core.patch.MergedViT._last_block_prefix`), so the unmerged candidate measures above 1.

1. FLOP-ratio rungs: the unmerged model (1.0) first, in every precision; then each rung placed
   where a precision is predicted to reach the target from what was measured so far
   (:func:`aim_rung`), until every precision has a rung within 3 % of its aim or ``rungs`` are
   spent (each merged rung is one ONNX export, about a minute for DeiT-Tiny on 2 cores, so the
   rungs are where a search's time goes); or, with ``aim=False``, a fixed geometric
   :func:`ladder`;
2. at each rung the least-KL schedule of :func:`dsm_export.search.schedule_search.search_schedules` (PyTorch, calibration
   images; the merge-variant stage at the first merged rung of at least :data:`VARIANT_MIN_RUNG` only, its keys reused at the later ones) -- with ``strides`` also that schedule merging in fewer blocks (:func:`with_stride`, r
   raised back to the rung's FLOPs) -- exported to ONNX, and with INT8 also quantized (:func:`dsm_export.engines.int8.quantize.quantize_int8`);
3. each rung's engines timed against the unmerged fp32 export (batch 32, graphs alternating,
   median of ``repeats``, the baseline timed again before each engine), and scored by KL to the
   unmerged model on the calibration images (INT8 through ONNX Runtime, since quantization moves
   the logits; fp32 by the PyTorch reference, which the export matches to 1e-4);
4. the Pareto front (higher measured speed-up, lower KL) and the choice at the target: among the
   engines whose measured speed-up reaches it (and that keep within an optional :class:`~.candidates.Budget`:
   a least top-1 agreement, a most KL), the fastest whose KL is within one standard error of the
   least (paired per-image differences on the calibration images, :func:`~.candidates.within_one_se`; exact
   ties: top-1 agreement) -- after a confirmation round: the engines that could be chosen (on the
   front, up to 8 % below the target, KL within one standard error of the least there) are timed
   again together, and each keeps the mean of its two measurements.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..check.evaluate import flops_ratio, model_logits
from ..core.models import is_embedding_model
from ..core.patch import prefix_only_last_block
from ..core.schedule import Schedule, stride_blocks
from ..errors import DSMError
from ..graph.export import export_model
from ..metrics import output_metrics, per_image_divergence
from .candidates import (CLASSIFIER_NAMES, Budget, Candidate, choose, confirmation_contenders, confirmation_round,
                         pareto_front)
from .runtimes import PRECISIONS, SMOOTH_ALPHA, OnnxRuntimeEngines, ort_logits, precision_options  # noqa: F401  (the search's names)
from .schedule_search import N_VARIANT_STAGE, ScheduleSearchSettings, reach_target, scored, search_schedules, with_mirrors


CLEAR_MARGIN = 0.10  # after the unmerged rung alone, a precision is dropped only if another is this much faster
STEP_PAST = 0.05  # a further rung when every aim was measured: this far past the highest FLOP ratio measured
OVERSHOOT = 0.08  # a choice this far past the target, the rung below it short: one rung between them
VARIANT_MIN_RUNG = 1.2  # the merge-variant stage runs at the first merged rung at least this far (FLOP ratio)


def ladder(target: float, rungs: int) -> list[float]:
    """FLOP-ratio rungs for a speed-up target: ``rungs`` geometric steps from ``max(1.1, target/1.6)``
    to ``1.1 * target`` (INT8 alone runs up to about 1.5x faster, so a merge of ``target/1.6``
    stacked on it can still reach the target)."""
    lo, hi = max(1.1, target / 1.6), max(1.15, 1.1 * target)
    if rungs <= 1:
        return [round(hi, 3)]
    return [round(float(v), 3) for v in np.geomspace(lo, hi, rungs)]


def between_rung(rows: list[Candidate], chosen: Candidate | None, done: list[float], target: float,
                 overshoot: float = OVERSHOOT) -> float | None:
    """A rung between the chosen engine's and the highest one below it, when the choice overshoots.

    Timing noise (3-5 % a measurement on a shared CPU) can put a rung aimed at the target just
    under it; the next rung measured then lands well past it and is chosen, at more merging, and
    so a higher divergence, than the target needs. When ``chosen`` is at least ``1 + overshoot``
    times ``target`` and a merged rung below ``chosen``'s (same precision) fell short of the target,
    the geometric mean of the two FLOP-ratio rungs is returned -- unless a rung within 3 % of it was
    measured already (``done``).

    Args:
        rows: the measured candidates (``rung``, ``precision``, ``speedup``).
        chosen: the current choice (:func:`~.candidates.choose`), or None.
        done: the merged rungs measured.
        target: the speed-up target.

    Returns:
        The FLOP-ratio rung to measure, or None.
    """
    if chosen is None or chosen.speedup < target * (1 + overshoot):
        return None
    short = [r.rung for r in rows if r.precision == chosen.precision and 1.0 < r.rung < chosen.rung
             and r.speedup < target]
    if not short:
        return None
    mid = round(float(np.sqrt(max(short) * chosen.rung)), 3)
    return None if any(abs(mid / d - 1) <= 0.03 for d in done) else mid


def wanted_rungs(rows: list[Candidate], precisions, done: list[float], target: float,
                 budget: Budget | None = None) -> list[float]:
    """The FLOP-ratio rungs still worth measuring, lowest first: each precision's :func:`aim_rung`
    from its measured rows, less the aims within 3 % of a rung measured already (``done``) and the
    aims at or past the lowest rung where an engine within ``budget`` already reaches ``target``
    (more merging there only raises the divergence; :func:`between_rung` refines below it).

    Args:
        rows: the measured candidates (``rung``, ``precision``, ``flops_ratio``, ``speedup``,
            ``divergence``, ``agreement``).
        precisions: the precisions still built.
        done: the merged rungs measured.
        target: the speed-up target.
        budget: the accuracy budget a reaching engine must keep within (None: any).
    """
    aims = sorted(aim_rung([(r.flops_ratio, r.speedup) for r in rows if r.precision == p], target)
                  for p in precisions if any(r.precision == p for r in rows))
    reached = [r.rung for r in rows if r.speedup >= target and (budget is None or budget.admits(r))]
    if reached:
        aims = [a for a in aims if a < min(reached)]
    return [a for a in aims if all(abs(a / d - 1) > 0.03 for d in done)]


@dataclass(frozen=True)
class EngineSearchSettings:
    """What an engine search measures and how far it goes (:class:`EngineSearch`).

    Attributes:
        target: measured speed-up over the runtime's unmerged baseline to reach (e.g. 2.5): ONNX
            Runtime's fp32 unmerged export, or OpenVINO's default compile of it.
        model_name: timm name, recorded in the exports.
        weights: weights path recorded in the exports (None for random init).
        pretrained, num_classes: recorded in the exports, as for
            :func:`dsm_export.graph.export.export_model`.
        precisions: precisions of the runtime (ONNX Runtime: :data:`PRECISIONS`, static QDQ or
            dynamic quantization with the first block fp32 or every layer quantized, every INT8
            form smoothed with SmoothQuant on the first ``quant_count`` images,
            :func:`precision_options`; OpenVINO: fp32, bf16, int8).
        rungs: merged FLOP-ratio rungs measured at most (each is one export, about a minute for
            DeiT-Tiny on 2 cores). With ``aim`` each rung after the first is placed where a
            precision is predicted to reach the target (:func:`aim_rung`, from what was measured so
            far; never past the lowest rung where an engine already reaches the target), and the
            search stops early once every precision has a rung within 3 % of its aim -- unless no
            engine reaches the target after the confirmation round, when the rungs left are aimed
            again from the pooled timings (or placed :data:`STEP_PAST` beyond the highest
            measured), and a choice :data:`OVERSHOOT` or more past the target, the rung below it
            short, gets a rung between the two (:func:`between_rung`); a precision dominated at
            every rung measured (:func:`dominated_precisions`; after the unmerged rung alone, only
            by a :data:`CLEAR_MARGIN` in speed) is no longer built or aimed for. Without ``aim``,
            the rungs of :func:`ladder`.
        max_grid, refine_steps: budget of the schedule search
            (:func:`dsm_export.search.schedule_search.search_schedules`) at the first merged rung of
            at least :data:`VARIANT_MIN_RUNG` fewer FLOPs, which also runs the merge-variant stage
            (below it every variant scores about the same); the later rungs search a third of
            ``max_grid`` and half of ``refine_steps`` with the variant keys found there, nearest
            first from its grid schedule; the rungs before it, the full budget with the plain keys.
        quant_count: the first this many calibration images also calibrate INT8.
        progress: show a progress bar.
        confirm_margin: engines within this fraction below the target that could be chosen
            (:func:`~.candidates.confirmation_contenders`) are timed a second time, together, before
            the choice; 0 confirms only those at or above the target.
        strides: merge strides tried at every rung (:func:`with_stride`): 2 also tries the rung's
            schedule merging in every second merging block, r raised back to the rung's FLOP ratio
            (fewer matchings at the same FLOPs), timed in the same run; each stride adds a rung's
            worth of engines. Default ``(1,)``: on DeiT-Tiny stride 2 measured within noise of the
            every-block speed and less accurate on held-apart photos (docs, frontier).
        budget: an accuracy :class:`~.candidates.Budget` the chosen engine must keep within on the
            calibration images (None: any accuracy). Rows outside it are still measured and on the
            front.
        mirror: each rung's schedule search also scores the horizontal mirror images
            (:func:`dsm_export.search.schedule_search.with_mirrors`); the engines are then measured
            on the calibration images alone.
        aim: place the rungs by prediction (above); False: the fixed :func:`ladder`.

    Raises:
        DSMError: a target of 1 or less, fewer than one rung, or a stride that is not a positive
            integer. (The precisions are checked against the runtime by :class:`EngineSearch`.)
    """

    target: float
    model_name: str
    weights: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    precisions: tuple[str, ...] = PRECISIONS
    rungs: int = 4
    max_grid: int = 16
    refine_steps: int = 8
    quant_count: int = 64
    progress: bool = True
    confirm_margin: float = 0.08
    strides: tuple[int, ...] = (1,)
    budget: Budget | None = None
    mirror: bool = True
    aim: bool = True

    def __post_init__(self):
        object.__setattr__(self, "precisions", tuple(self.precisions))
        object.__setattr__(self, "strides", tuple(self.strides))
        if self.target <= 1.0:
            raise DSMError(f"the speed-up target must be above 1, got {self.target}")
        if self.rungs < 1:
            raise DSMError(f"at least one rung, got {self.rungs}")
        if not self.strides or any(int(k) != k or k < 1 for k in self.strides):
            raise DSMError(f"strides must be positive integers, got {self.strides}")

    @property
    def rung_grid(self) -> int:
        """Grid schedules searched at a rung after the variant stage's: a third of ``max_grid``, at least 2."""
        return max(2, self.max_grid // 3)

    @property
    def rung_refine(self) -> int:
        """Per-block moves tried at a rung after the variant stage's: half of ``refine_steps``."""
        return self.refine_steps // 2


@dataclass
class EngineSearchResult:
    """Outcome of an :class:`EngineSearch`.

    Attributes:
        best: the chosen candidate (``spec``, ``precision``, ``flops_ratio``, ``speedup``,
            ``divergence``, ``agreement``, ``path``), or None when no candidate reached the target
            within the budget.
        candidates: every measured candidate, in measurement order.
        pareto: candidates not dominated in (higher ``speedup``, lower ``divergence``), by speed-up.
        machine: the runtime's description of the measurement (``runtime.machine()``: CPU, runtime
            version, threads, batch, repeats, ...).
        rungs: the merged FLOP-ratio rungs measured, in order.
        variant_rung: the rung whose schedule search ran the merge-variant stage (None: none did).
        variant_keys: the merge-variant keys found there, used at every later rung (None: none).
        notes: the runtime's notes, then the search's (precisions dropped, and why).
        phase_seconds: wall time in seconds by phase (``reference``, ``export``, ``schedule search``,
            ``build``, ``timing``, ``scoring``), longest first, to 0.1 s.
    """

    best: Candidate | None
    candidates: list[Candidate] = field(default_factory=list)
    pareto: list[Candidate] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    rungs: list[float] = field(default_factory=list)
    variant_rung: float | None = None
    variant_keys: dict | None = None
    notes: list[str] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)

    def machine_report(self) -> dict:
        """The ``machine`` block of tune's report: :attr:`machine` with ``rungs``, ``variant_rung``,
        ``variant_keys``, ``notes`` and ``phase_seconds`` (the keys the report has always had)."""
        return {**self.machine, "rungs": self.rungs, "variant_rung": self.variant_rung,
                "variant_keys": self.variant_keys, "notes": self.notes, "phase_seconds": self.phase_seconds}


@dataclass(frozen=True)
class BuiltEngine:
    """One engine :meth:`EngineSearch.build` made: the FLOP-ratio ``rung`` and merge ``stride`` it was
    searched at, its ``schedule`` and that schedule's calibration ``scores`` (PyTorch reference:
    ``divergence``, ``agreement``, ``flops_ratio``), its ``precision`` and its file ``path``."""

    rung: float
    stride: int
    schedule: Schedule
    scores: Candidate
    precision: str
    path: str


class EngineSearch:
    """A schedule x precision search by measured speed-up (see the module doc): :meth:`run` does it
    all; each step is a method of its own, sharing the state below.

    The unmerged model (rung 1.0) is measured first, in every precision. The first merged rung is
    aimed from it with speed taken proportional to FLOPs, at the lowest of the precisions' aims:
    the fastest unmerged precision's, which needs the least merging to reach the target and so
    usually gives the least KL there (on a CPU where a precision runs slower than fp32 -- OpenVINO's
    int8 without VNNI -- a higher aim would spend the variant stage on a rung no choice uses).

    Rows (:class:`~.candidates.Candidate`) carry ``divergence`` and ``agreement`` (KL and top-1
    agreement for classifiers, written to JSON also under ``kl`` and ``top1_agreement``; 1 - cosine
    and retrieval overlap@k for embedding models), and with OpenVINO ``speedup_onnxruntime``, the
    speed-up over ONNX Runtime's fp32 unmerged model.

    Args:
        model: unmerged timm ViT (eval mode), its weights loaded.
        pixels: ``[N, 3, H, W]`` calibration images (preprocessed); the first
            ``settings.quant_count`` also calibrate INT8.
        workdir: folder for the candidate files (``<precision>_<rung>.onnx``, ``ov_<precision>_<rung>.xml``).
        settings: an :class:`EngineSearchSettings`.
        runtime: a runtime of :mod:`dsm_export.search.runtimes` (default: ONNX Runtime with its
            defaults: CPU, every core, batch 32, median of 5, static QDQ INT8 smoothed at
            :data:`SMOOTH_ALPHA`). The runtime holds the timing settings and the INT8 options.

    Attributes:
        rows: every measured candidate, in measurement order.
        per_image: engine path -> ``[N]`` per-image divergences on the calibration images (for
            :func:`~.candidates.choose`'s ties).
        live: the precisions still built (one dominated at every rung measured is dropped).
        done: the merged FLOP-ratio rungs measured, in order.
        notes: the search's notes (precisions dropped, and why).
        variant_keys, anchor, variant_rung: the merge-variant keys found at the first merged rung of
            at least :data:`VARIANT_MIN_RUNG`, its grid schedule and that rung (None before).
        seconds: wall time in seconds by phase.
        view_base, base: the unmerged outputs on the scored views (with the mirror images) and on
            ``pixels`` (set by :meth:`prepare`).
        bar: the progress bar (set by :meth:`prepare`).

    Raises:
        DSMError: a precision the runtime does not build (or none).
    """

    def __init__(self, model: nn.Module, pixels: torch.Tensor, workdir: str, settings: EngineSearchSettings,
                 runtime=None):
        self.runtime = runtime if runtime is not None else OnnxRuntimeEngines()
        if not settings.precisions or any(p not in self.runtime.precisions for p in settings.precisions):
            raise DSMError(f"{self.runtime.label} precisions must be among {self.runtime.precisions}, "
                           f"got {settings.precisions}")
        self.model, self.pixels, self.workdir, self.settings = model, pixels, workdir, settings
        self.embeddings = is_embedding_model(model)
        self.depth = len(model.blocks)
        self.np_pixels = pixels.numpy()
        self.calib = self.np_pixels[:settings.quant_count]
        self.none_path = os.path.join(workdir, "fp32_none.onnx")
        # The baseline: timm's model (every block on every token). Where the export already computes
        # that for the unmerged schedule, the unmerged fp32 export is the baseline itself.
        self.separate_baseline = prefix_only_last_block(model)
        self.base_path = os.path.join(workdir, "baseline.onnx") if self.separate_baseline else self.none_path
        self.seconds: dict[str, float] = {}
        self.rows: list[Candidate] = []
        self.per_image: dict[str, np.ndarray] = {}
        self.live = list(settings.precisions)
        self.done: list[float] = []
        self.notes: list[str] = []
        self.variant_keys: dict | None = None
        self.anchor: Schedule | None = None
        self.variant_rung: float | None = None
        self.view_base: np.ndarray | None = None
        self.base: np.ndarray | None = None
        self.bar = None

    @contextmanager
    def phase(self, name: str):
        """Add the wall time of the ``with`` block to :attr:`seconds` under ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def run(self) -> EngineSearchResult:
        """The whole search: :meth:`prepare`, the unmerged rung, the merged rungs (:meth:`aimed_rungs`,
        or :meth:`ladder_rungs` without ``settings.aim``), then :meth:`result`.

        Returns:
            An :class:`EngineSearchResult`; ``best`` is None if nothing reached the target within
            the budget.
        """
        self.prepare()
        self.measure(1.0)
        if self.settings.aim:
            self.aimed_rungs()
        else:
            self.ladder_rungs()
        self.bar.update(max(0, self.bar.total - self.bar.n))
        self.bar.close()
        return self.result()

    def prepare(self) -> None:
        """The unmerged model's outputs on the scored views (computed once for every rung), the
        progress bar, and the baseline's export where it is not the unmerged export itself."""
        s = self.settings
        views = with_mirrors(self.pixels) if s.mirror else self.pixels
        with self.phase("reference"):
            self.view_base = model_logits(self.model, views)
        self.base = self.view_base[:len(self.pixels)]
        n_engines = len(s.precisions) * len(s.strides)
        first_rung = s.max_grid + 2 * N_VARIANT_STAGE + s.max_grid + s.refine_steps
        self.bar = tqdm(total=first_rung + (s.rungs - 1) * (s.rung_grid + s.rung_refine)
                        + 3 * n_engines * (s.rungs + 1) + 1,
                        desc=f"tune {self.runtime.name}", unit="step", disable=not s.progress,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining} left]{postfix}")
        if self.separate_baseline:
            with self.phase("export"):
                export_model(self.model, s.model_name, self.base_path, "none", weights=s.weights,
                             pretrained=s.pretrained, num_classes=s.num_classes, full_last_block=True)

    def search_rung(self, rung: float) -> list[tuple[int, Schedule, Candidate]]:
        """``(stride, schedule, calibration scores)`` searched at FLOP-ratio ``rung`` (PyTorch
        reference; empty: no schedule reaches it). The first merged rung of at least
        :data:`VARIANT_MIN_RUNG` runs the variant stage and sets :attr:`variant_keys`,
        :attr:`anchor` and :attr:`variant_rung`; later rungs search fewer schedules with those keys."""
        if rung == 1.0:
            none = Schedule.parse("none")
            return [(1, none, Candidate(divergence=0.0, agreement=1.0, flops_ratio=flops_ratio(self.model, none)))]
        s = self.settings
        fixed = self.variant_keys is not None
        # Below VARIANT_MIN_RUNG so few tokens merge that every variant scores about the same: the
        # variant stage waits for a rung where their divergences differ.
        variants = not fixed and rung >= VARIANT_MIN_RUNG
        try:
            with self.phase("schedule search"):
                found = search_schedules(self.model, self.pixels, ScheduleSearchSettings(
                    rung, max_grid=s.rung_grid if fixed else s.max_grid,
                    refine_steps=s.rung_refine if fixed else s.refine_steps, progress=False, variants=variants,
                    mirror=s.mirror, keys=self.variant_keys, anchor=self.anchor), base=self.view_base, bar=self.bar)
        except DSMError:  # no schedule reaches this FLOP ratio on this model
            return []
        if variants:
            self.variant_keys = found.best.variant_keys(sum(1 for b in found.best.plan(self.depth) if b.mode == "prune"))
            self.anchor = Schedule.parse(found.variants[0].spec) if found.variants else None
            self.variant_rung = rung
        out = []
        for k in s.strides:
            if k == 1:
                out.append((1, found.best, found.best_metrics))
                continue
            try:
                strided = reach_target(self.model, with_stride(found.best, k, self.depth), rung)
            except (DSMError, ValueError):  # cannot merge this rung's tokens in fewer blocks
                continue
            out.append((k, strided, scored(self.model, strided, self.pixels, self.base)))
        return out

    def build(self, rung: float) -> dict[str, BuiltEngine]:
        """Export each schedule of :meth:`search_rung` at ``rung`` and build it in every live
        precision: ``{"<precision> <tag>": engine}``."""
        s = self.settings
        engines = {}
        for k, schedule, scores in self.search_rung(rung):
            tag = "none" if rung == 1.0 else f"{rung:.2f}x" + (f"_stride{k}" if k > 1 else "")
            fp32_path = self.none_path if rung == 1.0 else os.path.join(self.workdir, f"fp32_{tag}.onnx")
            with self.phase("export"):
                export_model(self.model, s.model_name, fp32_path, schedule, weights=s.weights, pretrained=s.pretrained,
                             num_classes=s.num_classes)
            for precision in [p for p in self.runtime.precisions if p in self.live]:
                with self.phase("build"):
                    engines[f"{precision} {tag}"] = BuiltEngine(rung, k, schedule, scores, precision,
                                                            self.runtime.build(fp32_path, precision, self.calib))
                self.bar.update()
        return engines

    def measure(self, rung: float) -> None:
        """Build (:meth:`build`), time in one alternating run (the strides' engines compared in the
        same run) and score (:meth:`score`) the engines of ``rung``; appends to :attr:`rows`."""
        self.bar.set_postfix_str(f"rung {rung:.2f}x")
        engines = self.build(rung)
        # The unmerged fp32 engine may be the baseline itself (speed-up 1 by definition): not timed twice.
        timed = {label: e.path for label, e in engines.items()
                 if not self.runtime.is_baseline(e.precision, e.schedule.is_none, self.separate_baseline)}
        with self.phase("timing"):
            rates = self.runtime.throughput(timed, self.base_path)
        self.bar.update(len(engines))
        for label, engine in engines.items():
            self.rows.append(self.score(engine, rates.get(label, rates["baseline"]), rates))
        self.runtime.release()

    def score(self, engine: BuiltEngine, rate: float, rates: dict[str, float]) -> Candidate:
        """The candidate row of a timed ``engine``: ``rate`` (its images per second) over the
        baseline's in ``rates``, its divergence and agreement (the PyTorch reference's where the
        runtime's precision is exact, else its own outputs'); records its per-image divergences."""
        exact = self.runtime.exact(engine.precision)
        with self.phase("scoring"):
            outputs = None if engine.schedule.is_none and exact else self.runtime.outputs(engine.path, self.np_pixels)
        self.bar.update()
        self.per_image[engine.path] = (np.zeros(len(self.np_pixels)) if outputs is None
                                       else per_image_divergence(outputs, self.base, self.embeddings))
        if exact:
            divergence, agreement = engine.scores.divergence, engine.scores.agreement
        else:
            quality = output_metrics(outputs, self.base, embeddings=self.embeddings)
            divergence, agreement = quality["divergence"], quality["agreement"]
        return Candidate(spec=engine.schedule.spec(), schedule_json=engine.schedule.to_dict(self.depth),
                         precision=engine.precision, flops_ratio=engine.scores.flops_ratio,
                         speedup=rate / rates["baseline"], images_per_s=rate, divergence=divergence,
                         agreement=agreement, path=engine.path, rung=engine.rung, stride=engine.stride,
                         speedup_onnxruntime=rate / rates["onnxruntime"] if "onnxruntime" in rates else None,
                         metric_names=None if self.embeddings else CLASSIFIER_NAMES)

    def choice(self) -> Candidate | None:
        """The engine chosen from the rows so far (:func:`~.candidates.choose`)."""
        s = self.settings
        return choose(self.rows, s.target, s.budget, self.per_image)

    def drop_dominated(self) -> None:
        """Stop building the precisions another one beats at every rung measured (after the unmerged
        rung alone: only those beaten by :data:`CLEAR_MARGIN` in speed, one timing being noisy)."""
        for p in dominated_precisions(self.rows, self.live, 0.0 if self.done else CLEAR_MARGIN):
            self.live.remove(p)
            after = f"the {self.done[-1]:.2f}x rung" if self.done else "the unmerged rung"
            self.notes.append(f"{p} dropped after {after}: at every rung measured another precision was as fast "
                              f"or faster{'' if self.done else f' by {CLEAR_MARGIN:.0%} or more'} at an equal or "
                              "lower divergence")

    def place(self, count: int) -> None:
        """Measure up to ``count`` more rungs, each where a live precision is predicted to reach the
        target (:func:`aim_rung`): the lowest aim first; after the first, the aims no measured rung is
        within 3 % of. Stops early when every aim has a rung within 3 %."""
        for _ in range(count):
            self.drop_dominated()
            wanted = wanted_rungs(self.rows, self.live, self.done, self.settings.target, self.settings.budget)
            if not wanted:
                return
            self.done.append(round(wanted[0], 3))
            self.measure(self.done[-1])

    def confirm(self) -> None:
        """Confirmation round: each rung was timed once (median of `repeats`), and a burst of load on
        a shared machine can move one rung's figures by 10-25 %. The engines that could be chosen at
        the target -- on the Pareto front, within ``confirm_margin`` below it, KL within one standard
        error of the least there -- are timed again together in one alternating run
        (:meth:`time_again`); each keeps the mean of its measurements (``speedup_runs``)."""
        s = self.settings
        self.bar.set_postfix_str("confirming")
        contenders = confirmation_contenders(self.rows, s.target, s.confirm_margin, s.budget, self.per_image)
        if not (len(contenders) > 1 or (contenders and self.choice() is None)):
            return
        with self.phase("timing"):
            confirmation_round(contenders, self.time_again, lambda row, runs: {"speedup": float(np.mean(runs))})

    def time_again(self, group: list[Candidate]) -> list[list[float]]:
        """Time ``group``'s engines again in one alternating run: each one's new speed-up, in order
        (and with OpenVINO, ``speedup_onnxruntime`` becomes the mean of both runs')."""
        again = self.runtime.throughput({str(i): r.path for i, r in enumerate(group)}, self.base_path)
        self.runtime.release()
        for i, r in enumerate(group):
            if "onnxruntime" in again:
                r.speedup_onnxruntime = float(np.mean([r.speedup_onnxruntime, again[str(i)] / again["onnxruntime"]]))
        return [[again[str(i)] / again["baseline"]] for i in range(len(group))]

    def aimed_rungs(self) -> None:
        """The merged rungs placed by prediction (``settings.aim``), each set confirmed."""
        s = self.settings
        self.drop_dominated()
        self.place(s.rungs)
        self.confirm()
        # A rung aimed at the target can land just under it once confirmed (its first timing over
        # the target, the second under). While no engine reaches the target's speed and rungs are
        # left, aim again from the pooled measurements -- or, where every aim is a rung measured
        # already, step past the highest rung measured -- and confirm again. (Engines that reach
        # it outside the accuracy budget are not helped by more merging.)
        while len(self.done) < s.rungs and not any(r.speedup >= s.target for r in self.rows):
            before = len(self.done)
            self.place(1)
            if len(self.done) == before:
                self.done.append(round(max(self.done) * (1 + STEP_PAST), 3))
                self.measure(self.done[-1])
            self.confirm()
        # A choice well past the target with the rung below it short (that rung timed under the
        # target by noise): one rung between the two, if rungs are left.
        while len(self.done) < s.rungs:
            mid = between_rung(self.rows, self.choice(), self.done, s.target)
            if mid is None:
                break
            self.done.append(mid)
            self.measure(mid)
            self.confirm()

    def ladder_rungs(self) -> None:
        """The merged rungs of the fixed :func:`ladder` (without ``settings.aim``), then one
        confirmation round."""
        for rung in ladder(self.settings.target, self.settings.rungs):
            self.done.append(rung)
            self.measure(rung)
        self.confirm()

    def result(self) -> EngineSearchResult:
        """What the search found so far: the choice, every row, the front and how it was measured."""
        machine = self.runtime.machine()
        return EngineSearchResult(
            best=self.choice(), candidates=self.rows, pareto=pareto_front(self.rows), machine=machine,
            rungs=self.done, variant_rung=self.variant_rung, variant_keys=self.variant_keys,
            notes=list(self.runtime.notes) + self.notes,
            phase_seconds={k: round(v, 1) for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])})


def search_engines(model: nn.Module, pixels: torch.Tensor, workdir: str, settings: EngineSearchSettings,
                   runtime=None) -> EngineSearchResult:
    """Measure schedule x precision candidates and pick the least-KL engine at a speed-up target:
    ``EngineSearch(model, pixels, workdir, settings, runtime).run()`` (:class:`EngineSearch`).

    Raises:
        DSMError: a precision the runtime does not build.
    """
    return EngineSearch(model, pixels, workdir, settings, runtime).run()


def aim_rung(points: list[tuple[float, float]], target: float, lo: float = 1.05, hi: float = 4.0) -> float:
    """The FLOP ratio at which one precision's engines are predicted to reach a speed-up ``target``,
    from its measured ``(flops_ratio, speedup)`` points: a straight line in log-log through the two
    points that bracket the target, its slope held to 0.5-1.2. Where every point is short of the
    target, the line starts from the most-merged point (the two most-merged give the slope), so the
    aim always lies past every rung measured; where every point reaches it, from the least-merged
    point, so the aim lies below them. A slope that is not positive there (merging a few tokens
    can cost more than it saves: an INT8 engine of OpenVINO on a CPU with VNNI ran slower at 1.08x
    fewer FLOPs than unmerged) is taken as 1, speed proportional to FLOPs, as from one point.
    Clipped to ``[lo, hi]``.

    Args:
        points: measured ``(flops_ratio, speedup)`` of one precision, at least one.
        target: the speed-up to reach.

    Raises:
        ValueError: no points.
    """
    if not points:
        raise ValueError("no measured points to aim from")
    pts = sorted(set((float(f), float(v)) for f, v in points if v > 0))
    below = [p for p in pts if p[1] < target]
    above = [p for p in pts if p[1] >= target]
    if below and above:
        pair = [max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])]
    elif below:  # all short: from the most-merged point, onwards
        pair = sorted(pts, key=lambda p: -p[0])[:2]
    else:  # all reach it: from the least-merged point, back
        pair = pts[:2]
    (f0, s0) = pair[0]
    slope = 1.0
    if len(pair) == 2 and abs(np.log(pair[1][0] / f0)) > 1e-3:
        (f1, s1) = pair[1]
        raw = np.log(s1 / s0) / np.log(f1 / f0)
        slope = float(np.clip(raw, 0.5, 1.2)) if raw > 0 else 1.0
    return float(np.clip(f0 * (target / s0) ** (1.0 / slope), lo, hi))


def dominated_precisions(rows: list[Candidate], precisions, margin: float = 0.0) -> list[str]:
    """The precisions among ``precisions`` that another one dominates at every rung of ``rows``: at
    each rung, each of their rows has a row of another precision at least ``1 + margin`` times as
    fast (``speedup``) with no higher ``divergence``. A search stops building those (on a CPU without
    VNNI, OpenVINO's int8 can be slower and less accurate than f32 at every rung). Never all of them.
    """
    out = []
    for p in precisions:
        others = [q for q in precisions if q != p and q not in out]
        mine = [r for r in rows if r.precision == p]
        if not others or not mine:
            continue
        if all(any(o.speedup >= (1 + margin) * m.speedup and o.divergence <= m.divergence
                   for o in rows if o.precision in others and o.rung == m.rung
                   and (o.stride or 1) == (m.stride or 1)) for m in mine):
            out.append(p)
    return out


def with_stride(schedule: Schedule, stride: int, depth: int) -> Schedule:
    """``schedule`` merging in every ``stride``-th merging block (:func:`dsm_export.core.schedule.stride_blocks`):
    the ``stride`` key of a parameter-form schedule, the strided block list of an explicit one.

    Raises:
        ValueError: for ``mode=tome``, which reproduces ToMe's own schedule.
    """
    if schedule.mode == "tome":
        raise ValueError("mode=tome reproduces ToMe's schedule: no stride")
    if schedule.blocks is None:
        return replace(schedule, stride=stride)
    return replace(schedule, blocks=stride_blocks(schedule.plan(depth), stride), prune=0)
