"""The search's candidates and the rules that choose among them, in one place.

Every search of :mod:`dsm_export.search` (the FLOP-target schedule search, the speed check, the
schedule x precision engine search) scores candidates by the same two numbers against the
unmerged model on the calibration images:

- ``divergence``: mean KL in nats (classifiers) or mean 1 - cosine (embedding models);
- ``agreement``: top-1 agreement as a fraction (classifiers) or retrieval overlap@k.

A :class:`Candidate` is a row that carries both, under those names alone; its JSON form
(:meth:`Candidate.to_json`) also writes a classifier's under ``kl`` and ``top1_agreement``, as
reports always have. Here are the one ranking key (:func:`quality_key`:
lower divergence, ties higher agreement), the one Pareto front (:func:`pareto_front`, over FLOP
ratio or measured speed-up), the accuracy :class:`Budget`, the choice at a speed target
(:func:`choose`, with the one-standard-error rule :func:`within_one_se`) and the one confirmation
round (:func:`confirmation_round`): timing the candidates that a second measurement could make
the choice again, together, and pooling both measurements. Pure Python and numpy: no model, no
runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import numpy as np

from ..core.schedule import Schedule
from ..errors import DSMError

CLASSIFIER_NAMES = ("kl", "top1_agreement")  # a classifier's names of divergence and agreement
EMBEDDING_NAMES = ("cosine_distance", "knn_overlap")  # an embedding model's, from embedding_metrics


@dataclass(kw_only=True, slots=True)
class Candidate:
    """One scored candidate of a search (a schedule, and for measured searches an engine of it).

    Every candidate has ``divergence`` (mean KL in nats, or mean 1 - cosine for embedding models)
    and ``agreement`` (top-1 agreement as a fraction, or retrieval overlap@k); the other fields are
    None where a search does not fill them.

    Attributes:
        divergence, agreement: the two scores against the unmerged model on the calibration images.
        spec: the schedule's compact form, or its JSON block list for a per-block schedule.
        schedule_json: the schedule's block list (:meth:`~dsm_export.core.schedule.Schedule.to_dict`).
        flops_ratio: unmerged FLOPs / merged FLOPs.
        variant: the variant label of the schedule search's variant stage (``plain``, ``protect=16``).
        precision: the engine's precision (engine search).
        speedup: measured speed-up over the runtime's unmerged baseline (the mean of
            ``speedup_runs`` once an engine search's confirmation round timed it twice; the
            median of the paired speed-ups in a speed check).
        images_per_s: the engine's measured throughput, images per second.
        speedup_onnxruntime: OpenVINO only: the speed-up over ONNX Runtime's fp32 unmerged model.
        path: the engine's file (or a speed check's fp32 export).
        rung: the FLOP-ratio rung the engine search measured it at.
        stride: the merge stride at that rung (1: every merging block).
        speedup_runs: every measured speed-up kept (both timings of a row timed twice).
        speed_per_flop, speed_per_flop_low: a speed check's median and lower-quartile speed-up
            over ``flops_ratio``.
        timed_twice: a confirmation round timed it a second time.
        metric_names: the names ``divergence`` and ``agreement`` are also written under in JSON:
            :data:`CLASSIFIER_NAMES` (``kl``, ``top1_agreement``) for a classifier's rows,
            :data:`EMBEDDING_NAMES` for an embedding model's rows scored by
            :func:`dsm_export.metrics.embedding_metrics`; None: the generic names alone.
        extra: keys of the scores no search reads (:func:`dsm_export.check.evaluate.schedule_metrics`'
            ``schedule``, an embedding model's ``min_cosine``, ``mean_cosine``, ``knn_k``, a report's
            own keys), written back to JSON as they came.
    """

    divergence: float
    agreement: float
    spec: str | None = None
    schedule_json: dict | None = None
    flops_ratio: float | None = None
    variant: str | None = None
    precision: str | None = None
    speedup: float | None = None
    images_per_s: float | None = None
    speedup_onnxruntime: float | None = None
    path: str | None = None
    rung: float | None = None
    stride: int | None = None
    speedup_runs: list[float] | None = None
    speed_per_flop: float | None = None
    speed_per_flop_low: float | None = None
    timed_twice: bool = False
    metric_names: tuple[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def schedule(self) -> Schedule:
        """The candidate's schedule: its compact ``spec``, or its per-block ``schedule_json``."""
        return schedule_of(self)

    def to_json(self) -> dict:
        """The row as written to JSON reports, with the keys rows have always had: every field set
        (not None; ``timed_twice`` only when true), ``extra``'s keys, and ``divergence`` and
        ``agreement`` also under ``metric_names`` (``kl`` and ``top1_agreement`` for a classifier)."""
        data = asdict(self)
        extra, names = data.pop("extra"), data.pop("metric_names")
        out = {**extra, **{k: v for k, v in data.items() if v is not None and v is not False}}
        if names:
            out[names[0]], out[names[1]] = self.divergence, self.agreement
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> Candidate:
        """A candidate from a JSON row (:meth:`to_json`, a report written before, or a metrics dict
        of :func:`dsm_export.check.evaluate.schedule_metrics` with ``spec`` added). A classifier's
        ``kl`` / ``top1_agreement`` (an embedding model's ``cosine_distance`` / ``knn_overlap``) give
        a missing ``divergence`` / ``agreement`` and set ``metric_names``; where both names are
        given the generic one wins. Keys that are not fields go to ``extra``.

        Raises:
            KeyError: neither name of the divergence or of the agreement is given.
        """
        data = dict(data)
        names = next((n for n in (CLASSIFIER_NAMES, EMBEDDING_NAMES) if n[0] in data or n[1] in data), None)
        known = {f.name for f in fields(cls)} - {"metric_names", "extra"}
        values: dict[str, Any] = {"metric_names": names}
        for i, generic in enumerate(("divergence", "agreement")):
            alias = data.pop(names[i], None) if names else None
            value = data.pop(generic, alias)
            if value is None:
                aliases = [names[i]] if names else [CLASSIFIER_NAMES[i], EMBEDDING_NAMES[i]]
                raise KeyError(f"a candidate needs {generic!r} (or {' or '.join(map(repr, aliases))}), "
                               f"got {sorted(data)}")
            values[generic] = value
        values.update({k: data.pop(k) for k in list(data) if k in known})
        values["extra"] = data
        return cls(**values)


def schedule_of(row: Candidate) -> Schedule:
    """The schedule of a candidate: its compact ``spec`` where it has one, else its per-block
    ``schedule_json``."""
    return Schedule.from_dict(row.schedule_json) if row.spec.startswith("{") else Schedule.parse(row.spec)


def _score(row, name: str) -> float:
    """``row``'s ``divergence`` or ``agreement``: a :class:`Candidate`'s field, or the key of a metrics
    dict (a report's JSON row, :func:`dsm_export.metrics.output_metrics`' held-apart scores)."""
    return row[name] if isinstance(row, Mapping) else getattr(row, name)


def quality_key(row: Candidate | Mapping) -> tuple[float, float]:
    """The ranking key of every search: lower ``divergence`` first, ties broken by higher ``agreement``.
    ``row``: a :class:`Candidate`, or a JSON row or metrics dict with those two keys (a report's rows)."""
    return (_score(row, "divergence"), -_score(row, "agreement"))


def least(rows):
    """The best-ranked row (:func:`quality_key`: :class:`Candidate` objects, or a report's JSON rows);
    None for no rows."""
    rows = list(rows)
    return min(rows, key=quality_key) if rows else None


def better(a: Candidate, b: Candidate | None) -> bool:
    """Whether ``a`` ranks strictly before ``b`` (:func:`quality_key`); any row beats None."""
    return b is None or quality_key(a) < quality_key(b)


def pareto_front(rows: list[Candidate], speed: str = "speedup") -> list[Candidate]:
    """Rows not dominated in (higher ``speed``, lower ``divergence``), sorted by ``speed``.

    Args:
        rows: candidates.
        speed: the field to maximise: ``speedup`` (measured) or ``flops_ratio``.
    """
    def fast(r: Candidate) -> float:
        return getattr(r, speed)

    front = [r for r in rows if not any(
        fast(o) >= fast(r) and o.divergence <= r.divergence
        and (fast(o) > fast(r) or o.divergence < r.divergence) for o in rows)]
    return sorted(front, key=fast)


@dataclass(frozen=True)
class Budget:
    """An accuracy budget on the calibration images: the least top-1 ``agreement`` (a fraction, 0-1;
    retrieval overlap for embedding models) and the most ``divergence`` (KL; 1 - cosine for
    embedding models) an engine may have to be chosen. None leaves a side open. ``guard``: the
    bound is tune's default for a measured target (:data:`~dsm_export.search.tuning.SPEEDUP_MAX_KL`),
    which reports name as such.

    Raises:
        DSMError: a bound outside its range (agreement 0-1, divergence >= 0).
    """

    min_agreement: float | None = None
    max_divergence: float | None = None
    guard: bool = False  # the default guard of a --target-speedup run, not bounds the user gave

    def __post_init__(self):
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise DSMError(f"the least agreement must be between 0 and 100 %, got {100 * self.min_agreement:g} %")
        if self.max_divergence is not None and not self.max_divergence >= 0.0:
            raise DSMError(f"the most KL must be 0 or more, got {self.max_divergence:g}")

    def admits(self, row: Candidate | Mapping) -> bool:
        """Whether ``row`` keeps within the budget: a :class:`Candidate`, or a JSON row or metrics
        dict with ``agreement`` and ``divergence`` (a report's rows, held-apart scores)."""
        return ((self.min_agreement is None or _score(row, "agreement") >= self.min_agreement)
                and (self.max_divergence is None or _score(row, "divergence") <= self.max_divergence))

    def describe(self, divergence: str = "KL", agreement: str = "agreement") -> str:
        """The budget in words, e.g. ``agreement >= 93.0 %, KL <= 0.03``; empty without bounds."""
        parts = []
        if self.min_agreement is not None:
            parts.append(f"{agreement} >= {100 * self.min_agreement:.1f} %")
        if self.max_divergence is not None:
            parts.append(f"{divergence} <= {self.max_divergence:g}")
        guard = " (the default guard of a measured target; --max-kl inf lifts it)" if self.guard else ""
        return ", ".join(parts) + (guard if parts else "")


def admitted(rows, budget: Budget | None) -> list[Candidate]:
    """The rows within ``budget`` (all of them for None)."""
    return [r for r in rows if budget is None or budget.admits(r)]


def within_one_se(least: np.ndarray, other: np.ndarray) -> bool:
    """Whether ``other``'s per-image divergences exceed ``least``'s by at most one standard error of
    their paired difference: a KL difference the calibration images cannot resolve. This is the
    one-standard-error rule of model selection (Hastie, Tibshirani, Friedman, *The Elements of
    Statistical Learning*, 2nd ed., section 7.10), applied to engines instead of model sizes.

    Args:
        least, other: ``[N]`` per-image divergences of two engines on the same N images
            (:func:`dsm_export.metrics.per_image_divergence`).

    Raises:
        ValueError: the two arrays differ in length.
    """
    least, other = np.asarray(least, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if least.shape != other.shape:
        raise ValueError(f"per-image divergences of {least.shape} and {other.shape} images")
    diff = other - least
    if diff.size < 2:
        return bool(diff.sum() <= 0)
    return bool(diff.mean() <= diff.std(ddof=1) / np.sqrt(diff.size))


def reaching(rows: list[Candidate], target: float, budget: Budget | None = None) -> list[Candidate]:
    """The rows whose measured ``speedup`` reaches ``target`` and that keep within ``budget``."""
    return [r for r in admitted(rows, budget) if r.speedup >= target]


def tied(row: Candidate, best: Candidate, per_image: dict | None) -> bool:
    """``row``'s divergence is ``best``'s or lower, or within one standard error above it
    (:func:`within_one_se`, where ``per_image`` maps both rows' ``path`` to ``[N]`` divergences)."""
    if row.divergence <= best.divergence:
        return True
    a, b = (per_image or {}).get(best.path), (per_image or {}).get(row.path)
    return a is not None and b is not None and within_one_se(a, b)


def choose(rows: list[Candidate], target: float, budget: Budget | None = None,
           per_image: dict | None = None) -> Candidate | None:
    """The engine chosen at a measured speed-up ``target``: among the rows whose ``speedup`` reaches
    it and that keep within ``budget``, the best-ranked (:func:`quality_key`); None if no row does.

    With ``per_image`` (row ``path`` -> ``[N]`` per-image divergences on the calibration images), the
    fastest of the rows whose divergence is within one standard error of that best one
    (:func:`within_one_se`) is chosen instead: a KL difference the images cannot resolve does not
    outweigh a measured speed margin over the target (docs/tuning.md, "Measured speed-ups").
    """
    ok = reaching(rows, target, budget)
    best = least(ok)
    if best is None or not per_image:
        return best
    return max((r for r in ok if tied(r, best, per_image)),
               key=lambda r: (r.speedup, -r.divergence, r.agreement))


def fastest_within(rows: list[Candidate], budget: Budget | None = None) -> Candidate | None:
    """The row with the highest measured ``speedup`` among those within ``budget`` (ties: lower
    ``divergence``): the most speed the budget allowed in a search. None if no row keeps within it."""
    ok = admitted(rows, budget)
    return max(ok, key=lambda r: (r.speedup, -r.divergence)) if ok else None


def first_fast_enough(rows: list[Candidate], min_quotient: float,
                      key: str = "speed_per_flop_low") -> Candidate | None:
    """The first row (``rows`` in :func:`quality_key` order) whose ``key`` (by default the lower
    quartile of its measured speed-ups over its FLOP ratio) is at least ``min_quotient``; None if
    no row's is. The speed check's choice."""
    return next((r for r in rows if getattr(r, key) >= min_quotient), None)


def confirmation_contenders(rows: list[Candidate], target: float, margin: float = 0.08,
                            budget: Budget | None = None, per_image: dict | None = None) -> list[Candidate]:
    """The engines a second timing could make the choice at a speed-up ``target`` (:func:`choose`):
    within ``budget``, on the speed/divergence Pareto front of the rows within it, measured at least
    ``target * (1 - margin)``, and with ``divergence`` no higher than the best-ranked row at the
    target -- or, with ``per_image``, within one standard error of it (:func:`tied`) -- (all such
    rows when nothing reached the target). The unmerged fp32 baseline is never one."""
    best = least(reaching(rows, target, budget))
    return [r for r in pareto_front(admitted(rows, budget))
            if not (r.precision == "fp32" and r.flops_ratio <= 1.0)
            and r.speedup >= target * (1 - margin)
            and (best is None or tied(r, best, per_image))]


def near_floor(rows: list[Candidate], min_quotient: float, margin: float,
               key: str = "speed_per_flop_low") -> list[Candidate]:
    """The schedules a second timing could make the speed check's choice (:func:`first_fast_enough`):
    in ``rows``' order (:func:`quality_key`), those whose ``key`` lies within ``margin`` below
    ``min_quotient``, up to the first at or above it (no row after that one can be chosen)."""
    out = []
    for r in rows:
        if getattr(r, key) >= min_quotient:
            break
        if getattr(r, key) >= min_quotient - margin:
            out.append(r)
    return out


def confirmation_round(contenders: list[Candidate], time_again: Callable[[list[Candidate]], list[list[float]]],
                       pool: Callable[[Candidate, list[float]], dict]) -> None:
    """Time ``contenders`` again, together in one alternating run, and pool both measurements: a
    burst of load on a shared machine moves one run's figures by 5-25 %, and the choice should not
    rest on one run. Both searches use it: the engine search on its
    :func:`confirmation_contenders`, the speed check on its :func:`near_floor` rows.

    Args:
        contenders: rows with ``speedup`` (and ``speedup_runs`` where the first timing kept every
            paired speed-up); updated in place.
        time_again: times the rows given and returns each one's new speed-ups, in order.
        pool: ``pool(row, runs)`` -> the fields to update from ``runs`` (a dict of field names) (the first timing's speed-ups,
            or its ``speedup`` alone, then the new ones), e.g. the mean or the median and quartile.

    Each contender's ``speedup_runs`` becomes the pooled runs and ``timed_twice`` is set.
    """
    if not contenders:
        return
    for row, runs in zip(contenders, time_again(contenders)):
        pooled = [float(x) for x in row.speedup_runs or [row.speedup]] + [float(x) for x in runs]
        for name, value in pool(row, pooled).items():
            setattr(row, name, value)
        row.speedup_runs = pooled
        row.timed_twice = True
