"""Speed check of a FLOP-target search: the least-KL schedule whose *measured* ONNX Runtime speed-up
keeps up with its FLOP ratio.

A FLOP ratio counts multiply-adds. A merging block also runs many small memory-bound ops that
count next to nothing (the matching's TopK and ArgMax, gathers, the one-hot assignment, the window
permutation; ``metric=heads`` and ``merge=mlerp`` add per-head normalisation and token norms;
``protect`` adds the class-attention TopK), and a per-block refinement can leave late blocks that
merge 3 tokens yet pay a whole matching. So two schedules at the same FLOP ratio can differ by
~10 % in measured speed, and the least-KL one is often the slower. ``tune --target-flops-ratio
--export`` therefore measures the least-KL candidates of its search and keeps the least-KL one
whose speed-up is at least ``min_quotient`` (default :data:`SPEED_PER_FLOP`) times its FLOP ratio
in about three timings in four:

1. the candidates: the evaluated schedules that reach the target (and keep within an optional
   :class:`~dsm_export.search.candidates.Budget`), least divergence first, at most
   :data:`PER_VARIANT` per variant label (so that one slow variant's per-block refinements cannot
   fill every place), ``count`` in all (:func:`speed_candidates`);
2. each exported to fp32 ONNX and timed in one alternating run against timm's unmerged model (the
   baseline FLOP ratios are counted against: every block on every token), timed again right
   before every candidate: ``repeats`` paired speed-ups per candidate
   (:func:`dsm_export.search.timing.ort_speedups`, batch 32), summed up by :func:`speed_stats`: the
   median (``speedup``, ``speed_per_flop``) and the lower quartile (``speed_per_flop_low``);
3. a confirmation round: candidates whose lower-quartile quotient lies within ``confirm_margin``
   below the floor, up to the first that clears it, are timed again together and their pairs
   pooled (a burst of load on a shared machine moves one run's figures by 5-10 %);
4. the choice (:func:`~.candidates.first_fast_enough`): the least-KL candidate whose *lower quartile* reaches
   the floor, i.e. at least about three pairs in four do. A median at the floor would be one
   coin-flip from missing it in the next measurement; the file a user deploys should keep up
   again when they time it. None if no candidate does: the caller keeps the least-KL schedule and
   says so.

The quotient is measured in fp32 whatever precision the engine is exported in: the merge overhead
is a property of the graph, and the FLOP ratio does not change with precision.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from torch import nn

from ..core.schedule import Schedule
from ..graph.export import export_model
from .candidates import Budget, Candidate, admitted, confirmation_round, first_fast_enough, near_floor, quality_key
from .schedule_search import variant_label
from .timing import cpu_name, ort_speedups

SPEED_PER_FLOP = 0.9  # the least measured speed-up per unit of FLOP ratio tune --export accepts
PER_VARIANT = 2  # candidates timed per variant label at most
WARMUP = 3  # untimed runs of every graph before the timed pairs (see SpeedCheckSettings.warmup)


def speed_candidates(rows: list[Candidate], target: float, count: int = 6, budget=None) -> list[Candidate]:
    """The rows worth timing: distinct ``spec``, ``flops_ratio`` at least ``target``, within
    ``budget`` (:class:`~dsm_export.search.candidates.Budget`, None for any), least ``divergence`` first
    (ties: higher ``agreement``), at most :data:`PER_VARIANT` per variant label
    (:func:`dsm_export.search.schedule_search.variant_label`), ``count`` rows at most."""
    out, seen, per_label = [], set(), {}
    for row in sorted(admitted(rows, budget), key=quality_key):
        if row.spec in seen or row.flops_ratio < target:
            continue
        label = variant_label(Schedule.parse(row.spec))
        if per_label.get(label, 0) >= PER_VARIANT:
            continue
        seen.add(row.spec)
        per_label[label] = per_label.get(label, 0) + 1
        out.append(row)
        if len(out) == count:
            break
    return out


def speed_stats(ratios: list[float], flops_ratio: float) -> dict:
    """Sum up paired speed-ups (:func:`dsm_export.search.timing.ort_speedups`) of one schedule.

    Args:
        ratios: the per-repetition speed-ups (unmerged time / merged time), at least one.
        flops_ratio: the schedule's FLOP ratio (unmerged FLOPs / merged FLOPs).

    Returns:
        ``speedup_runs`` (the ratios), ``speedup`` (their median), ``speed_per_flop`` (median /
        FLOP ratio) and ``speed_per_flop_low`` (lower quartile / FLOP ratio; ``numpy.quantile``,
        linear interpolation): a dict keyed by :class:`~.candidates.Candidate` field names.

    Raises:
        ValueError: no ratios.
    """
    if not ratios:
        raise ValueError("no speed-ups to sum up")
    runs = [float(x) for x in ratios]
    med = float(np.median(runs))
    return {"speedup_runs": runs, "speedup": med, "speed_per_flop": med / flops_ratio,
            "speed_per_flop_low": float(np.quantile(runs, 0.25)) / flops_ratio}


@dataclass
class SpeedCheck:
    """Outcome of :func:`speed_check`.

    Attributes:
        chosen: the candidate chosen (``spec``, ``divergence``, ``agreement``, ``flops_ratio``,
            ``speedup``, ``speed_per_flop``, ``path`` of its fp32 export), or None if no candidate
            reached the floor.
        rows: the timed candidates (copies of the search's), least divergence first, each with
            :func:`speed_stats`'s fields (``speedup_runs``: every paired speed-up, both rounds'
            for those timed twice).
        machine: CPU, ONNX Runtime version, threads, batch, repeats.
    """

    chosen: Candidate | None
    rows: list[Candidate] = field(default_factory=list)
    machine: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SpeedCheckSettings:
    """What a speed check (:func:`speed_check`) times and how it chooses.

    Attributes:
        target: the FLOP ratio the candidates must reach.
        model_name: timm name, recorded in the exports.
        weights, pretrained, num_classes: recorded in the exports
            (:func:`dsm_export.graph.export.export_model`).
        min_quotient: the least measured speed-up per unit of FLOP ratio.
        count: candidates timed at most (:func:`speed_candidates`).
        batch, repeats, threads, provider: the timing (:func:`dsm_export.search.timing.ort_speedups`).
        budget: optional accuracy :class:`~dsm_export.search.candidates.Budget` the candidates keep within.
        confirm_margin: lower-quartile quotients within this below the floor are timed a second
            time (:func:`~.candidates.near_floor`, :func:`~.candidates.confirmation_round`).
        warmup: untimed runs of every graph before the pairs. With one, a candidate's first pair
            was often its lowest (the ``speed_check`` timings in ``docs/merge_variants.json``).
    """

    target: float
    model_name: str
    weights: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    min_quotient: float = SPEED_PER_FLOP
    count: int = 6
    batch: int = 32
    repeats: int = 5
    threads: int | None = None
    provider: str | None = "cpu"
    budget: Budget | None = None
    confirm_margin: float = 0.05
    warmup: int = WARMUP


def speed_check(model: nn.Module, rows: list[Candidate], workdir: str, settings: SpeedCheckSettings) -> SpeedCheck:
    """Time the least-KL candidates of a FLOP-target search and choose by ``settings.min_quotient``
    (see module doc).

    Args:
        model: unmerged timm ViT (eval mode), its weights loaded.
        rows: the search's evaluated candidates (``spec``, ``flops_ratio``, ``divergence``, ``agreement``;
            :attr:`dsm_export.search.schedule_search.ScheduleSearchResult.evaluated`).
        workdir: folder for the fp32 exports (``speed_<i>.onnx``, ``speed_baseline.onnx``).
        settings: a :class:`SpeedCheckSettings`.

    Returns:
        A :class:`SpeedCheck`.

    Raises:
        DSMError: an unavailable execution provider.
    """
    s = settings
    cands = [dataclasses.replace(r) for r in speed_candidates(rows, s.target, s.count, s.budget)]
    machine = {"cpu": cpu_name(), "onnxruntime": ort.__version__, "threads": s.threads or os.cpu_count(),
               "batch": s.batch, "repeats": s.repeats, "provider": s.provider}
    if not cands:
        return SpeedCheck(None, [], machine)
    kw = dict(weights=s.weights, pretrained=s.pretrained, num_classes=s.num_classes)
    base_path = os.path.join(workdir, "speed_baseline.onnx")
    # The baseline FLOP ratios are counted against: timm's model, every block on every token.
    export_model(model, s.model_name, base_path, Schedule(), full_last_block=True, **kw)
    for i, row in enumerate(cands):
        row.path = os.path.join(workdir, f"speed_{i}.onnx")
        export_model(model, s.model_name, row.path, Schedule.parse(row.spec), **kw)

    def measure(group: list[Candidate]) -> list[list[float]]:
        pairs = ort_speedups({"baseline": base_path, **{str(i): r.path for i, r in enumerate(group)}},
                             "baseline", batch=s.batch, repeats=s.repeats, threads=s.threads, provider=s.provider,
                             warmup=s.warmup)
        return [pairs[str(i)] for i in range(len(group))]

    for row, runs in zip(cands, measure(cands)):
        for name, value in speed_stats(runs, row.flops_ratio).items():
            setattr(row, name, value)
    confirmation_round(near_floor(cands, s.min_quotient, s.confirm_margin), measure,
                       lambda row, runs: speed_stats(runs, row.flops_ratio))
    return SpeedCheck(first_fast_enough(cands, s.min_quotient), cands, machine)
