"""The search's candidates and the rules that choose among them, in one place.

Every search of :mod:`dsm_export.search` (the FLOP-target schedule search, the speed check, the
schedule x precision engine search) scores candidates by the same two numbers against the
unmerged model on the calibration images:

- ``divergence``: mean KL in nats (classifiers; also under ``kl``) or mean 1 - cosine (embedding
  models);
- ``agreement``: top-1 agreement as a fraction (classifiers; also under ``top1_agreement``) or
  retrieval overlap@k.

A :class:`Candidate` is a row that carries both. Here are the one ranking key (:func:`quality_key`:
lower divergence, ties higher agreement), the one Pareto front (:func:`pareto_front`, over FLOP
ratio or measured speed-up), the accuracy :class:`Budget`, the choice at a speed target
(:func:`choose`, with the one-standard-error rule :func:`within_one_se`) and the one confirmation
round (:func:`confirmation_round`): timing the candidates that a second measurement could make
the choice again, together, and pooling both measurements. Pure Python and numpy: no model, no
runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..core.schedule import Schedule
from ..errors import DSMError

_ALIASES = (("divergence", "kl"), ("agreement", "top1_agreement"))


class Candidate(dict):
    """One scored candidate of a search: a dict (it is written to JSON reports as it is) whose
    ``divergence`` and ``agreement`` are always present.

    Keys: ``spec`` (the schedule's compact form, or its JSON block list for a per-block schedule,
    with ``schedule_json``), ``flops_ratio`` (unmerged FLOPs / merged FLOPs), ``divergence``,
    ``agreement``; an engine search's rows add ``precision``, ``speedup`` (measured, over the
    runtime's unmerged baseline), ``path``, ``rung``, ``stride``; a speed check's add
    ``speedup_runs``, ``speed_per_flop`` and ``speed_per_flop_low``. Classifier rows also carry
    ``kl`` and ``top1_agreement``.

    Built from any mapping: a classifier's ``kl`` / ``top1_agreement`` fill a missing
    ``divergence`` / ``agreement``.

    Raises:
        KeyError: neither name of the divergence or of the agreement is given.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, alias in _ALIASES:
            if name not in self:
                if alias not in self:
                    raise KeyError(f"a candidate needs {name!r} (or {alias!r}), got {sorted(self)}")
                self[name] = self[alias]

    @property
    def divergence(self) -> float:
        return self["divergence"]

    @property
    def agreement(self) -> float:
        return self["agreement"]

    @property
    def spec(self) -> str:
        return self["spec"]

    @property
    def schedule(self) -> Schedule:
        """The candidate's schedule: its compact ``spec``, or its per-block ``schedule_json``."""
        return schedule_of(self)


def schedule_of(row: dict) -> Schedule:
    """The schedule of a candidate row: its compact ``spec`` where it has one, else its per-block
    ``schedule_json``."""
    return Schedule.from_dict(row["schedule_json"]) if row["spec"].startswith("{") else Schedule.parse(row["spec"])


def quality_key(row: dict) -> tuple[float, float]:
    """The ranking key of every search: lower ``divergence`` first, ties broken by higher ``agreement``."""
    return (row["divergence"], -row["agreement"])


def least(rows) -> dict | None:
    """The best-ranked row (:func:`quality_key`); None for no rows."""
    rows = list(rows)
    return min(rows, key=quality_key) if rows else None


def better(a: dict, b: dict | None) -> bool:
    """Whether ``a`` ranks strictly before ``b`` (:func:`quality_key`); any row beats None."""
    return b is None or quality_key(a) < quality_key(b)


def pareto_front(rows: list[dict], speed: str = "speedup") -> list[dict]:
    """Rows not dominated in (higher ``speed``, lower ``divergence``), sorted by ``speed``.

    Args:
        rows: candidates.
        speed: the key to maximise: ``speedup`` (measured) or ``flops_ratio``.
    """
    front = [r for r in rows if not any(
        o[speed] >= r[speed] and o["divergence"] <= r["divergence"]
        and (o[speed] > r[speed] or o["divergence"] < r["divergence"]) for o in rows)]
    return sorted(front, key=lambda r: r[speed])


@dataclass(frozen=True)
class Budget:
    """An accuracy budget on the calibration images: the least top-1 ``agreement`` (a fraction, 0-1;
    retrieval overlap for embedding models) and the most ``divergence`` (KL; 1 - cosine for
    embedding models) an engine may have to be chosen. None leaves a side open.

    Raises:
        DSMError: a bound outside its range (agreement 0-1, divergence >= 0).
    """

    min_agreement: float | None = None
    max_divergence: float | None = None

    def __post_init__(self):
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise DSMError(f"the least agreement must be between 0 and 100 %, got {100 * self.min_agreement:g} %")
        if self.max_divergence is not None and not self.max_divergence >= 0.0:
            raise DSMError(f"the most KL must be 0 or more, got {self.max_divergence:g}")

    def admits(self, row: dict) -> bool:
        """Whether a candidate row (``agreement``, ``divergence``) keeps within the budget."""
        return ((self.min_agreement is None or row["agreement"] >= self.min_agreement)
                and (self.max_divergence is None or row["divergence"] <= self.max_divergence))

    def describe(self, divergence: str = "KL", agreement: str = "agreement") -> str:
        """The budget in words, e.g. ``agreement >= 93.0 %, KL <= 0.03``; empty without bounds."""
        parts = []
        if self.min_agreement is not None:
            parts.append(f"{agreement} >= {100 * self.min_agreement:.1f} %")
        if self.max_divergence is not None:
            parts.append(f"{divergence} <= {self.max_divergence:g}")
        return ", ".join(parts)


def admitted(rows, budget: Budget | None) -> list[dict]:
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


def reaching(rows: list[dict], target: float, budget: Budget | None = None) -> list[dict]:
    """The rows whose measured ``speedup`` reaches ``target`` and that keep within ``budget``."""
    return [r for r in admitted(rows, budget) if r["speedup"] >= target]


def tied(row: dict, best: dict, per_image: dict | None) -> bool:
    """``row``'s divergence is ``best``'s or lower, or within one standard error above it
    (:func:`within_one_se`, where ``per_image`` maps both rows' ``path`` to ``[N]`` divergences)."""
    if row["divergence"] <= best["divergence"]:
        return True
    a, b = (per_image or {}).get(best.get("path")), (per_image or {}).get(row.get("path"))
    return a is not None and b is not None and within_one_se(a, b)


def choose(rows: list[dict], target: float, budget: Budget | None = None,
           per_image: dict | None = None) -> dict | None:
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
               key=lambda r: (r["speedup"], -r["divergence"], r["agreement"]))


def fastest_within(rows: list[dict], budget: Budget | None = None) -> dict | None:
    """The row with the highest measured ``speedup`` among those within ``budget`` (ties: lower
    ``divergence``): the most speed the budget allowed in a search. None if no row keeps within it."""
    ok = admitted(rows, budget)
    return max(ok, key=lambda r: (r["speedup"], -r["divergence"])) if ok else None


def first_fast_enough(rows: list[dict], min_quotient: float, key: str = "speed_per_flop_low") -> dict | None:
    """The first row (``rows`` in :func:`quality_key` order) whose ``key`` (by default the lower
    quartile of its measured speed-ups over its FLOP ratio) is at least ``min_quotient``; None if
    no row's is. The speed check's choice."""
    return next((r for r in rows if r[key] >= min_quotient), None)


def confirmation_contenders(rows: list[dict], target: float, margin: float = 0.08,
                            budget: Budget | None = None, per_image: dict | None = None) -> list[dict]:
    """The engines a second timing could make the choice at a speed-up ``target`` (:func:`choose`):
    within ``budget``, on the speed/divergence Pareto front of the rows within it, measured at least
    ``target * (1 - margin)``, and with ``divergence`` no higher than the best-ranked row at the
    target -- or, with ``per_image``, within one standard error of it (:func:`tied`) -- (all such
    rows when nothing reached the target). The unmerged fp32 baseline is never one."""
    best = least(reaching(rows, target, budget))
    return [r for r in pareto_front(admitted(rows, budget))
            if not (r["precision"] == "fp32" and r["flops_ratio"] <= 1.0)
            and r["speedup"] >= target * (1 - margin)
            and (best is None or tied(r, best, per_image))]


def near_floor(rows: list[dict], min_quotient: float, margin: float, key: str = "speed_per_flop_low") -> list[dict]:
    """The schedules a second timing could make the speed check's choice (:func:`first_fast_enough`):
    in ``rows``' order (:func:`quality_key`), those whose ``key`` lies within ``margin`` below
    ``min_quotient``, up to the first at or above it (no row after that one can be chosen)."""
    out = []
    for r in rows:
        if r[key] >= min_quotient:
            break
        if r[key] >= min_quotient - margin:
            out.append(r)
    return out


def confirmation_round(contenders: list[dict], time_again: Callable[[list[dict]], list[list[float]]],
                       pool: Callable[[dict, list[float]], dict]) -> None:
    """Time ``contenders`` again, together in one alternating run, and pool both measurements: a
    burst of load on a shared machine moves one run's figures by 5-25 %, and the choice should not
    rest on one run. Both searches use it: the engine search on its
    :func:`confirmation_contenders`, the speed check on its :func:`near_floor` rows.

    Args:
        contenders: rows with ``speedup`` (and ``speedup_runs`` where the first timing kept every
            paired speed-up); updated in place.
        time_again: times the rows given and returns each one's new speed-ups, in order.
        pool: ``pool(row, runs)`` -> the keys to update from ``runs`` (the first timing's speed-ups,
            or its ``speedup`` alone, then the new ones), e.g. the mean or the median and quartile.

    Each contender's ``speedup_runs`` becomes the pooled runs and ``timed_twice`` is set.
    """
    if not contenders:
        return
    for row, runs in zip(contenders, time_again(contenders)):
        pooled = [float(x) for x in row.get("speedup_runs") or [row["speedup"]]] + [float(x) for x in runs]
        row.update(pool(row, pooled))
        row["speedup_runs"] = pooled
        row["timed_twice"] = True
