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

from ..errors import DSMError
from ..core.schedule import Schedule, stride_blocks
from .candidates import Budget, Candidate, choose, confirmation_contenders, confirmation_round, pareto_front
from .runtimes import PRECISIONS, SMOOTH_ALPHA, ort_logits, precision_options  # noqa: F401  (the search's names)



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


def between_rung(rows: list[dict], chosen: dict | None, done: list[float], target: float,
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
    if chosen is None or chosen["speedup"] < target * (1 + overshoot):
        return None
    short = [r["rung"] for r in rows if r["precision"] == chosen["precision"] and 1.0 < r["rung"] < chosen["rung"]
             and r["speedup"] < target]
    if not short:
        return None
    mid = round(float(np.sqrt(max(short) * chosen["rung"])), 3)
    return None if any(abs(mid / d - 1) <= 0.03 for d in done) else mid


def wanted_rungs(rows: list[dict], precisions, done: list[float], target: float,
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
    aims = sorted(aim_rung([(r["flops_ratio"], r["speedup"]) for r in rows if r["precision"] == p], target)
                  for p in precisions if any(r["precision"] == p for r in rows))
    reached = [r["rung"] for r in rows if r["speedup"] >= target and (budget is None or budget.admits(r))]
    if reached:
        aims = [a for a in aims if a < min(reached)]
    return [a for a in aims if all(abs(a / d - 1) > 0.03 for d in done)]


@dataclass
class EngineSearchResult:
    """Outcome of :func:`search_engines`.

    Attributes:
        best: the chosen candidate (a dict: ``spec``, ``precision``, ``flops_ratio``, ``speedup``,
            ``kl``, ``top1_agreement``, ``path``), or None when no candidate reached the target.
        candidates: every measured candidate.
        pareto: candidates not dominated in (higher ``speedup``, lower ``kl``), by speed-up.
        machine: CPU, ONNX Runtime version and threads of the measurement.
    """

    best: dict | None
    candidates: list[dict] = field(default_factory=list)
    pareto: list[dict] = field(default_factory=list)
    machine: dict = field(default_factory=dict)


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


def search_engines(model: nn.Module, model_name: str, weights: str | None, pixels: torch.Tensor, target: float,
                   workdir: str, precisions=PRECISIONS, rungs: int = 4, max_grid: int = 16,
                   refine_steps: int = 8, quant_count: int = 64, pretrained: bool = False, num_classes: int | None = None,
                   progress: bool = True, confirm_margin: float = 0.08, strides=(1,),
                   budget: Budget | None = None, mirror: bool = True, runtime=None,
                   aim: bool = True) -> EngineSearchResult:
    """Measure schedule x precision candidates and pick the least-KL engine at a speed-up target.

    Args:
        model: unmerged timm ViT (eval mode), its weights loaded.
        model_name: timm name (recorded in the exports).
        weights: weights path recorded in the exports (None for random init).
        pixels: ``[N, 3, H, W]`` calibration images (preprocessed); the first ``quant_count`` also
            calibrate INT8.
        target: measured speed-up over the runtime's unmerged baseline to reach (e.g. 2.5): ONNX
            Runtime's fp32 unmerged export, or OpenVINO's default compile of it.
        workdir: folder for the candidate files (``<precision>_<rung>.onnx``, ``ov_<precision>_<rung>.xml``).
        precisions: precisions of ``runtime`` (ONNX Runtime: :data:`PRECISIONS`, static QDQ or
            dynamic quantization with the first block fp32 or every layer quantized, every INT8
            form smoothed with SmoothQuant on the first ``quant_count`` images,
            :func:`precision_options`; OpenVINO: fp32, bf16, int8).
        rungs: merged FLOP-ratio rungs measured at most (each is one export, about a minute for
            DeiT-Tiny on 2 cores). With ``aim`` each rung after the first is placed where a
            precision is predicted to reach the target (:func:`aim_rung`, from what was measured so
            far; never past the lowest rung where an engine already reaches the target), and the
            search stops early once every precision has a rung within 3 % of its aim -- unless no engine reaches the target after the confirmation round, when the
            rungs left are aimed again from the pooled timings (or placed :data:`STEP_PAST`
            beyond the highest measured), and a choice :data:`OVERSHOOT` or more past the target,
            the rung below it short, gets a rung between the two (:func:`between_rung`); a precision dominated at every rung measured
            (:func:`dominated_precisions`; after the unmerged rung alone, only by a
            :data:`CLEAR_MARGIN` in speed) is no longer built or aimed for. Without ``aim``, the
            rungs of :func:`ladder`.
        max_grid, refine_steps: budget of the schedule search (:func:`dsm_export.search.schedule_search.search_schedules`) at the
            first merged rung of at least :data:`VARIANT_MIN_RUNG` fewer FLOPs, which also runs the
            merge-variant stage (below it every variant scores about the same); the later rungs
            search a third of ``max_grid`` and half of ``refine_steps`` with the variant keys found
            there, nearest first from its grid schedule; the rungs before it, the full budget with
            the plain keys.
        pretrained, num_classes: recorded in the exports, as for :func:`dsm_export.graph.export.export_model`.
        confirm_margin: engines within this fraction below the target that could be chosen
            (:func:`~.candidates.confirmation_contenders`) are timed a second time, together, before the choice;
            0 confirms only those at or above the target.
        strides: merge strides tried at every rung (:func:`with_stride`): 2 also tries the rung's
            schedule merging in every second merging block, r raised back to the rung's FLOP ratio
            (fewer matchings at the same FLOPs), timed in the same run; each stride adds a rung's
            worth of engines. Default ``(1,)``: on DeiT-Tiny stride 2 measured within noise of the
            every-block speed and less accurate on held-apart photos (docs, frontier).
        budget: an accuracy :class:`~.candidates.Budget` the chosen engine must keep within on the calibration
            images (None: any accuracy). Rows outside it are still measured and on the front.
        mirror: each rung's schedule search also scores the horizontal mirror images
            (:func:`dsm_export.search.schedule_search.with_mirrors`); the engines are then measured on ``pixels``.
        runtime: a runtime of :mod:`dsm_export.search.runtimes` (default: ONNX Runtime with
            its defaults: CPU, every core, batch 32, median of 5, static QDQ INT8 smoothed at
            :data:`SMOOTH_ALPHA`). The runtime holds the timing settings and the INT8 options.
        aim: place the rungs by prediction (above); False: the fixed :func:`ladder`.

    The unmerged model (rung 1.0) is measured first, in every precision. The first merged rung is
    aimed from it with speed taken proportional to FLOPs, at the lowest of the precisions' aims:
    the fastest unmerged precision's, which needs the least merging to reach the target and so
    usually gives the least KL there (on a CPU where a precision runs slower than fp32 -- OpenVINO's
    int8 without VNNI -- a higher aim would spend the variant stage on a rung no choice uses).

    Rows carry ``divergence`` and ``agreement`` (KL and top-1 agreement for classifiers, also under
    ``kl`` and ``top1_agreement``; 1 - cosine and retrieval overlap@k for embedding models), and
    with OpenVINO ``speedup_onnxruntime``, the speed-up over ONNX Runtime's fp32 unmerged model.

    Returns:
        An :class:`EngineSearchResult`; ``best`` is None if nothing reached ``target`` within ``budget``.

    Raises:
        DSMError: an unknown precision, a target of 1 or less, or fewer than one rung.
    """
    from tqdm import tqdm

    from .runtimes import OnnxRuntimeEngines
    from ..check.evaluate import flops_ratio, model_logits, schedule_metrics
    from ..graph.export import export_model
    from ..core.models import is_embedding_model
    from ..core.patch import prefix_only_last_block
    from .schedule_search import N_VARIANT_STAGE, reach_target, search_schedules, with_mirrors
    from ..metrics import output_metrics, per_image_divergence

    if runtime is None:
        runtime = OnnxRuntimeEngines()
    precisions = tuple(precisions)
    if not precisions or any(p not in runtime.precisions for p in precisions):
        raise DSMError(f"{runtime.label} precisions must be among {runtime.precisions}, got {precisions}")
    if target <= 1.0:
        raise DSMError(f"the speed-up target must be above 1, got {target}")
    if rungs < 1:
        raise DSMError(f"at least one rung, got {rungs}")
    strides = tuple(strides)
    if not strides or any(int(k) != k or k < 1 for k in strides):
        raise DSMError(f"strides must be positive integers, got {strides}")
    embeddings = is_embedding_model(model)
    depth = len(model.blocks)
    seconds: dict[str, float] = {}  # wall time by phase, for the report (where a search's time goes)

    @contextmanager
    def phase(name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start

    views = with_mirrors(pixels) if mirror else pixels
    with phase("reference"):
        view_base = model_logits(model, views)  # the unmerged outputs, computed once for every rung
    base = view_base[:len(pixels)]
    np_pixels = pixels.numpy()
    calib = np_pixels[:quant_count]
    rung_grid, rung_refine = max(2, max_grid // 3), refine_steps // 2
    n_engines = len(precisions) * len(strides)
    first_rung = max_grid + 2 * N_VARIANT_STAGE + max_grid + refine_steps
    bar = tqdm(total=first_rung + (rungs - 1) * (rung_grid + rung_refine) + 3 * n_engines * (rungs + 1) + 1,
               desc=f"tune {runtime.name}", unit="step", disable=not progress,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining} left]{postfix}")

    none_path = os.path.join(workdir, "fp32_none.onnx")
    # The baseline: timm's model (every block on every token). Where the export already computes
    # that for the unmerged schedule, the unmerged fp32 export is the baseline itself.
    separate_baseline = prefix_only_last_block(model)
    base_path = os.path.join(workdir, "baseline.onnx") if separate_baseline else none_path
    if separate_baseline:
        with phase("export"):
            export_model(model, model_name, base_path, "none", weights=weights, pretrained=pretrained,
                         num_classes=num_classes, full_last_block=True)
    rows: list[dict] = []
    per_image: dict[str, np.ndarray] = {}  # path -> [N] divergences, for choose()'s ties
    state: dict = {"keys": None, "anchor": None}  # the first merged rung's variant keys and grid schedule

    def candidates(rung: float) -> list[tuple[int, Schedule, dict]]:
        """``(stride, schedule, calibration metrics)`` searched at ``rung`` (empty: none reaches it)."""
        if rung == 1.0:
            none = Schedule.parse("none")
            return [(1, none, {"divergence": 0.0, "agreement": 1.0, "flops_ratio": flops_ratio(model, none)})]
        fixed = state["keys"] is not None
        # Below VARIANT_MIN_RUNG so few tokens merge that every variant scores about the same: the
        # variant stage waits for a rung where their divergences differ.
        variants = not fixed and rung >= VARIANT_MIN_RUNG
        try:
            with phase("schedule search"):
                found = search_schedules(model, pixels, rung, max_grid=rung_grid if fixed else max_grid,
                                         refine_steps=rung_refine if fixed else refine_steps, progress=False,
                                         variants=variants, mirror=mirror, keys=state["keys"],
                                         anchor=state["anchor"], base=view_base, bar=bar)
        except DSMError:  # no schedule reaches this FLOP ratio on this model
            return []
        if variants:
            state["keys"] = found.best.variant_keys(sum(1 for b in found.best.plan(depth) if b.mode == "prune"))
            state["anchor"] = Schedule.parse(found.variants[0]["spec"]) if found.variants else None
            state["rung"] = rung
        out = []
        for k in strides:
            if k == 1:
                out.append((1, found.best, found.best_metrics))
                continue
            try:
                strided = reach_target(model, with_stride(found.best, k, depth), rung)
            except (DSMError, ValueError):  # cannot merge this rung's tokens in fewer blocks
                continue
            out.append((k, strided, schedule_metrics(model, strided, pixels, base)))
        return out

    def measure(rung: float) -> None:
        """Export, build, time (one alternating run: the strides' engines compared in the same run) and
        score the engines of ``rung``; appends to ``rows``."""
        bar.set_postfix_str(f"rung {rung:.2f}x")
        meta = {}
        for k, schedule, metrics in candidates(rung):
            tag = "none" if rung == 1.0 else f"{rung:.2f}x" + (f"_stride{k}" if k > 1 else "")
            fp32_path = none_path if rung == 1.0 else os.path.join(workdir, f"fp32_{tag}.onnx")
            with phase("export"):
                export_model(model, model_name, fp32_path, schedule, weights=weights, pretrained=pretrained,
                             num_classes=num_classes)
            for precision in [p for p in runtime.precisions if p in live]:
                with phase("build"):
                    meta[f"{precision} {tag}"] = (k, schedule, metrics, precision,
                                                  runtime.build(fp32_path, precision, calib))
                bar.update()
        # The unmerged fp32 engine may be the baseline itself (speed-up 1 by definition): not timed twice.
        timed = {label: m[4] for label, m in meta.items()
                 if not runtime.is_baseline(m[3], m[1].is_none, separate_baseline)}
        with phase("timing"):
            rates = runtime.throughput(timed, base_path)
        bar.update(len(meta))
        for label, (k, schedule, metrics, precision, path) in meta.items():
            rate = rates.get(label, rates["baseline"])
            exact = runtime.exact(precision)
            with phase("scoring"):
                outputs = None if schedule.is_none and exact else runtime.outputs(path, np_pixels)
            bar.update()
            per_image[path] = (np.zeros(len(np_pixels)) if outputs is None
                               else per_image_divergence(outputs, base, embeddings))
            if exact:
                quality = {"divergence": metrics["divergence"], "agreement": metrics["agreement"]}
            else:
                quality = output_metrics(outputs, base, embeddings=embeddings)
            row = Candidate(spec=schedule.spec(), schedule_json=schedule.to_dict(depth), precision=precision,
                            flops_ratio=metrics["flops_ratio"], speedup=rate / rates["baseline"],
                            images_per_s=rate, divergence=quality["divergence"], agreement=quality["agreement"],
                            path=path, rung=rung, stride=k)
            if "onnxruntime" in rates:
                row["speedup_onnxruntime"] = rate / rates["onnxruntime"]
            if not embeddings:
                row.update(kl=quality["divergence"], top1_agreement=quality["agreement"])
            rows.append(row)
        runtime.release()

    live = list(precisions)  # the precisions still built: one dominated at every rung is dropped
    notes: list[str] = []
    measure(1.0)
    done: list[float] = []

    def drop_dominated() -> None:
        """Stop building the precisions another one beats at every rung measured (after the unmerged
        rung alone: only those beaten by :data:`CLEAR_MARGIN` in speed, one timing being noisy)."""
        for p in dominated_precisions(rows, live, 0.0 if done else CLEAR_MARGIN):
            live.remove(p)
            after = f"the {done[-1]:.2f}x rung" if done else "the unmerged rung"
            notes.append(f"{p} dropped after {after}: at every rung measured another precision was as fast or "
                         f"faster{'' if done else f' by {CLEAR_MARGIN:.0%} or more'} at an equal or lower divergence")

    def place(count: int) -> None:
        """Measure up to ``count`` more rungs, each where a live precision is predicted to reach the
        target (:func:`aim_rung`): the lowest aim first; after the first, the aims no measured rung is
        within 3 % of. Stops early when every aim has a rung within 3 %."""
        for _ in range(count):
            drop_dominated()
            wanted = wanted_rungs(rows, live, done, target, budget)
            if not wanted:
                return
            done.append(round(wanted[0], 3))
            measure(done[-1])

    def confirm() -> None:
        """Confirmation round: each rung was timed once (median of `repeats`), and a burst of load on
        a shared machine can move one rung's figures by 10-25 %. The engines that could be chosen at
        the target -- on the Pareto front, within `confirm_margin` below it, KL within one standard
        error of the least there -- are timed again together in one alternating run; each keeps the
        mean of its measurements (``speedup_runs``) and the choice is made again."""
        bar.set_postfix_str("confirming")
        contenders = confirmation_contenders(rows, target, confirm_margin, budget, per_image)
        if not (len(contenders) > 1 or (contenders and choose(rows, target, budget, per_image) is None)):
            return

        def time_again(group: list[dict]) -> list[list[float]]:
            again = runtime.throughput({str(i): r["path"] for i, r in enumerate(group)}, base_path)
            runtime.release()
            for i, r in enumerate(group):
                if "onnxruntime" in again:
                    r["speedup_onnxruntime"] = float(np.mean([r["speedup_onnxruntime"],
                                                              again[str(i)] / again["onnxruntime"]]))
            return [[again[str(i)] / again["baseline"]] for i in range(len(group))]

        with phase("timing"):
            confirmation_round(contenders, time_again, lambda row, runs: {"speedup": float(np.mean(runs))})

    if aim:
        drop_dominated()
        place(rungs)
        confirm()
        # A rung aimed at the target can land just under it once confirmed (its first timing over
        # the target, the second under). While no engine reaches the target's speed and rungs are
        # left, aim again from the pooled measurements -- or, where every aim is a rung measured
        # already, step past the highest rung measured -- and confirm again. (Engines that reach
        # it outside the accuracy budget are not helped by more merging.)
        while len(done) < rungs and not any(r["speedup"] >= target for r in rows):
            before = len(done)
            place(1)
            if len(done) == before:
                done.append(round(max(done) * (1 + STEP_PAST), 3))
                measure(done[-1])
            confirm()
        # A choice well past the target with the rung below it short (that rung timed under the
        # target by noise): one rung between the two, if rungs are left.
        while len(done) < rungs:
            mid = between_rung(rows, choose(rows, target, budget, per_image), done, target)
            if mid is None:
                break
            done.append(mid)
            measure(mid)
            confirm()
    else:
        for rung in ladder(target, rungs):
            done.append(rung)
            measure(rung)
        confirm()
    bar.update(max(0, bar.total - bar.n))
    bar.close()
    machine = {**runtime.machine(), "rungs": done, "variant_rung": state.get("rung"),
               "variant_keys": state["keys"], "notes": list(runtime.notes) + notes,
               "phase_seconds": {k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}}
    return EngineSearchResult(choose(rows, target, budget, per_image), rows, pareto_front(rows), machine)


def dominated_precisions(rows: list[dict], precisions, margin: float = 0.0) -> list[str]:
    """The precisions among ``precisions`` that another one dominates at every rung of ``rows``: at
    each rung, each of their rows has a row of another precision at least ``1 + margin`` times as
    fast (``speedup``) with no higher ``divergence``. A search stops building those (on a CPU without
    VNNI, OpenVINO's int8 can be slower and less accurate than f32 at every rung). Never all of them.
    """
    out = []
    for p in precisions:
        others = [q for q in precisions if q != p and q not in out]
        mine = [r for r in rows if r["precision"] == p]
        if not others or not mine:
            continue
        if all(any(o["speedup"] >= (1 + margin) * m["speedup"] and o["divergence"] <= m["divergence"]
                   for o in rows if o["precision"] in others and o["rung"] == m["rung"]
                   and o.get("stride", 1) == m.get("stride", 1)) for m in mine):
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
