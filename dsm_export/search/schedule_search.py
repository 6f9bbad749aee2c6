"""Automatic schedule search: the schedule with the least KL to the unmerged model at a FLOP target
(for embedding models, timm ``num_classes=0``: the least mean 1 - cosine similarity).

Search (on calibration images, PyTorch reference implementation):

1. a grid over DSM's parameters -- delay, local blocks, window grid, r at the first merging block
   and r at the last (r falls or rises linearly) -- and ToMe's constant r, keeping every schedule whose analytic
   FLOP reduction is at least the target and at most ``slack`` above it; past ``max_grid`` of them,
   coarse to fine: half the budget spread evenly over the grid (ToMe's constant r always among
   them), the other half on the candidates nearest the best so far (:func:`grid_distance`: its
   own delay, local blocks and windows with another r shape first);
2. merge variants on the best grid schedule (same token counts, so the same FLOPs up to the
   matching's own cost, which :func:`reach_target` makes up by raising r where needed):
   importance-protected matching (``protect=P``), prune-then-merge (``prune=K``), per-head
   similarity, token similarity and norm-preserving merging (``metric=heads``, ``metric=tokens``,
   ``merge=mlerp``), then the best of each group combined, best group first; the best of these
   and the plain schedule goes on (see :mod:`dsm_export.core.schedule`);
3. if a variant won, the grid again with its variant keys and each similarity metric
   (``max_grid`` candidates, nearest first from the winner), since the delay, local blocks, r
   shape and metric that suit a variant differ from the plain schedule's (on DeiT-Tiny at 2x the
   variants favour one more dense block, and there ``metric=tokens``); if another grid schedule
   wins, stage 2 once more on it;
4. per-block refinement: move merges between pairs of blocks (coordinate
   descent) while the FLOP target still holds, keeping a move only if KL falls.

Candidates are ranked by their ``divergence`` from the unmerged model (mean KL, or mean 1 - cosine for
embedding models), ties broken by ``agreement`` (top-1 agreement, or retrieval overlap@k), over the
calibration images and, by default, their horizontal mirror images (:func:`with_mirrors`): a search
that compares a few hundred candidates on 128 photos picks partly by chance (the chosen schedule's
KL is lower on the photos it was chosen on than on new ones, most of all at 2x), and a second view
of every photo averages out part of what is peculiar to one view. Held-apart images (not used for
the search) then judge the result.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import DSMError, ScheduleError
from ..check.evaluate import flops_ratio, model_logits, schedule_metrics
from ..core.schedule import METRICS, BlockPlan, Schedule, resolve
from .candidates import Candidate, better, pareto_front, quality_key


@dataclass
class ScheduleSearchResult:
    """Outcome of :func:`search_schedules` (:class:`ScheduleSearch`).

    Attributes:
        best: the chosen schedule.
        best_metrics: its calibration scores (a :class:`~.candidates.Candidate`: ``spec``,
            ``divergence``, ``agreement``, ``flops_ratio``; its JSON form also ``kl`` and
            ``top1_agreement`` for classifiers, ``cosine_distance`` and ``knn_overlap`` for
            embedding models).
        evaluated: every evaluated candidate (calibration), in evaluation order.
        pareto: the non-dominated candidates (higher FLOP reduction, lower divergence), by FLOP
            reduction.
        variants: the variant stage: one candidate per variant tried on the best grid schedule (its
            ``variant`` a label such as ``plain`` or ``protect=16``), the plain schedule first.
    """

    best: Schedule
    best_metrics: Candidate
    evaluated: list[Candidate] = field(default_factory=list)
    pareto: list[Candidate] = field(default_factory=list)
    variants: list[Candidate] = field(default_factory=list)

    @property
    def variant(self) -> str:
        """The variant label of the chosen schedule (``plain`` if no variant won)."""
        return variant_label(self.best)


PROTECT_OPTIONS = (8, 16, 32)
PRUNE_OPTIONS = (1, 2, 4)


FORM_OPTIONS = (("heads", "mean"), ("tokens", "mean"), ("keys", "mlerp"), ("heads", "mlerp"),
                ("tokens", "mlerp"))  # (metric, merge)


N_VARIANT_STAGE = len(PROTECT_OPTIONS) + len(PRUNE_OPTIONS) + len(FORM_OPTIONS) + 2  # candidates per variant stage


def variant_label(schedule: Schedule) -> str:
    """``plain``, or the variant keys of ``schedule`` (``protect=16,prune=2``,
    ``metric=heads,merge=mlerp``)."""
    keys = schedule.variant_keys(schedule.prune or sum(1 for b in (schedule.blocks or ()) if b.mode == "prune"))
    if schedule.mode != "dsm":
        keys["mode"] = schedule.mode
    return ",".join(f"{k}={v}" for k, v in keys.items()) or "plain"


def variant_candidates(schedule: Schedule) -> list[Schedule]:
    """The merge variants of a parameter-form schedule tried by :func:`tune` (same token counts)."""
    out = []
    for p in PROTECT_OPTIONS:
        out.append(dataclasses.replace(schedule, protect=p))
    for k in PRUNE_OPTIONS:
        out.append(dataclasses.replace(schedule, prune=k))
    for metric, merge in FORM_OPTIONS:
        out.append(dataclasses.replace(schedule, metric=metric, merge=merge))
    return out


_KEY_GROUP = {"protect": "protect", "prune": "prune"}  # other keys: "form"


def variant_group(keys) -> str:
    """The variant group of a set of variant keys (``protect``, ``prune``, ``metric``,
    ``merge``): ``plain`` for none, ``protect``, ``prune`` or ``form`` (metric/merge)
    when they fall in one group, else ``combined``."""
    groups = {_KEY_GROUP.get(k, "form") for k in keys}
    return "plain" if not groups else groups.pop() if len(groups) == 1 else "combined"


def _combine(base: Schedule, parts: list[Schedule]) -> Schedule:
    """``base`` with the variant keys of each schedule in ``parts``."""
    return dataclasses.replace(base, **{k: v for p in parts for k, v in p.variant_keys().items()})


def with_mirrors(pixels: torch.Tensor) -> torch.Tensor:
    """The images followed by their horizontal mirror images. timm's ImageNet models are trained
    with random horizontal flips (timm's train transforms), so each mirror image is a second view
    of the same photo, on which merging groups other tokens. Each view is scored against the
    unmerged model on that view.

    Args:
        pixels: ``[N, 3, H, W]`` preprocessed images.

    Returns:
        ``[2N, 3, H, W]``: ``pixels``, then ``pixels`` mirrored along the width axis, in the same order.
    """
    return torch.cat([pixels, pixels.flip(-1)])


def reach_target(model: nn.Module, schedule: Schedule, target: float) -> Schedule:
    """``schedule`` itself if it reaches ``target``-fold fewer FLOPs, else its explicit block list
    with r raised by one in global blocks (earliest first, round robin: an early merge saves FLOPs
    in every later block) until it does. Variants cost a little matching FLOPs of their own
    (``metric=heads`` about 1 %), which can push a grid schedule just below the target.

    Raises:
        ScheduleError: if no valid raise of r reaches the target.
    """
    if flops_ratio(model, schedule) >= target:
        return schedule
    depth = len(model.blocks)
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    prefix = int(model.num_prefix_tokens)
    plan = list(schedule.plan(depth))
    merging = [i for i, b in enumerate(plan) if b.mode == "global"]
    current = dataclasses.replace(schedule, blocks=tuple(plan), prune=0)
    for _ in range(4 * depth):
        stuck = True
        for i in merging:
            trial = list(current.blocks)
            trial[i] = BlockPlan(trial[i].mode, trial[i].r + 1)
            s = dataclasses.replace(current, blocks=tuple(trial))
            try:
                resolve(s, depth, grid, prefix)
            except ScheduleError:
                continue
            current, stuck = s, False
            if flops_ratio(model, current) >= target:
                return current
        if stuck:
            break
    raise ScheduleError(f"{schedule.spec()} cannot reach {target:.2f}x fewer FLOPs by raising r")


WINDOW_OPTIONS = ((2, 2), (1, 2), (2, 1))


def grid_candidates(model: nn.Module, target: float, slack: float = 0.05,
                    windows_options=WINDOW_OPTIONS) -> list[Schedule]:
    """DSM-parameter and constant-r schedules whose FLOP reduction lies in ``[target, target + slack]``.

    The grid: r, r at the last merging block (``r_end``; both step with the patch grid's size, by
    1 on a 14x14 grid), delay 0-4, local blocks 0-2 and, for
    local blocks, each window grid of ``windows_options`` (uneven where it does not divide the
    patch grid; see :mod:`dsm_export.core.schedule`).
    """
    depth = len(model.blocks)
    # r and r_end step with the token count: DeiT's 14x14 grid steps by 1 (r 1-63, r_end 0-32 by 4);
    # DINOv2's 37x37 at 518 px by 7, so that its 1369 tokens reach the same FLOP ratios
    step = max(1, round(math.prod(model.patch_embed.grid_size) / 196))
    out = []
    seen = set()
    for r in range(step, 64 * step, step):
        specs = [Schedule(r=r)]
        for delay, local in itertools.product(range(0, min(5, depth)), range(0, 3)):
            for r_end, windows in itertools.product(range(0, 33 * step, 4 * step),
                                                    windows_options if local else ((2, 2),)):
                specs.append(Schedule(r=r, r_end=r_end, delay=delay, local=local, windows=windows))
        for s in specs:
            try:
                fr = flops_ratio(model, s)
            except ScheduleError:
                continue
            key = (s.plan(depth), s.windows if s.local else None)
            if target <= fr <= target + slack and key not in seen:
                seen.add(key)
                out.append(s)
    return out


def spread_sample(cands: list[Schedule], n: int) -> tuple[list[Schedule], list[Schedule]]:
    """``n`` grid candidates spread evenly over ``cands`` (which :func:`grid_candidates` orders by
    r), plus every ToMe constant-r candidate, so the search starts no worse than ToMe; and the rest."""
    picked = {int(i) for i in np.linspace(0, len(cands) - 1, n)}
    picked |= {i for i, s in enumerate(cands) if s.r_end is None and not s.delay and not s.local}
    return ([s for i, s in enumerate(cands) if i in picked], [s for i, s in enumerate(cands) if i not in picked])


def grid_distance(a: Schedule, b: Schedule) -> float:
    """How far apart two grid schedules are, for the fine stage of :func:`tune`: a block of delay or
    of local merging counts 2, another window grid 1, every 4 of r at the last merging block 1 and
    every 4 of r at the first 0.5, another similarity metric 1 (so a schedule's own structure with
    another r shape comes first, then its neighbours in delay and local blocks)."""
    def key(s):
        return (s.delay or 0, s.local or 0, tuple(s.windows) if s.local else None,
                s.r if s.r_end is None else s.r_end, s.r)

    (da, la, wa, ea, ra), (db, lb, wb, eb, rb) = key(a), key(b)
    return (2 * abs(da - db) + 2 * abs(la - lb) + (wa != wb) + abs(ea - eb) / 4 + abs(ra - rb) / 8
            + (a.metric != b.metric))


def scored(model: nn.Module, schedule: Schedule, pixels: torch.Tensor, base: np.ndarray) -> Candidate:
    """``schedule`` scored by the PyTorch reference on ``pixels`` against the unmerged outputs
    ``base`` (:func:`dsm_export.check.evaluate.schedule_metrics`), as a candidate with its ``spec``.

    Raises:
        ScheduleError: the schedule does not fit the model.
    """
    return Candidate.from_json({**schedule_metrics(model, schedule, pixels, base), "spec": schedule.spec()})


def _grid_search(model, pixels, base, cands: list[Schedule], budget: int, evaluated: list[Candidate], bar,
                 decorate=None, best: tuple | None = None,
                 anchor: Schedule | None = None) -> tuple[Schedule, Candidate, Schedule]:
    """Coarse to fine over grid candidates ``cands``, ``budget`` of them at most.

    Without ``anchor``: half the budget spread evenly over ``cands`` (:func:`spread_sample`; all
    of them if they fit), then the unevaluated ones nearest the best so far
    (:func:`grid_distance`). With ``anchor`` (a grid schedule): nearest first from it, then from
    the best so far. ``decorate`` maps a candidate to the schedule evaluated (e.g. with variant
    keys, raised to the target); a candidate it refuses (:class:`ScheduleError`) or turns into one
    evaluated before is skipped, and only evaluations count against the budget. Appends to
    ``evaluated``; returns the best ``(schedule, metrics, its grid candidate)``, starting from
    ``best`` (the grid candidate is ``anchor`` while nothing beats ``best``).
    """
    best, best_m = best if best else (None, None)
    if anchor is None and len(cands) > budget:
        first, rest = spread_sample(cands, max(1, budget // 2))
    else:
        first, rest = ([], list(cands)) if anchor is not None else (list(cands), [])
    near = anchor
    seen = {m.spec for m in evaluated}
    done = 0
    while first or (rest and done < budget):
        g = first.pop(0) if first else rest.pop(min(range(len(rest)), key=lambda i: grid_distance(rest[i], near)))
        try:
            s = decorate(g) if decorate else g
        except ScheduleError:
            continue
        if s.spec() in seen:  # e.g. the anchor itself, evaluated already
            continue
        seen.add(s.spec())
        done += 1
        bar.update()
        m = scored(model, s, pixels, base)
        evaluated.append(m)
        if better(m, best_m):
            best, best_m, near = s, m, g
    return best, best_m, near


@dataclass(frozen=True)
class ScheduleSearchSettings:
    """What a schedule search (:class:`ScheduleSearch`) looks for and how much it tries.

    Attributes:
        target: FLOP reduction to reach (e.g. 1.7).
        max_grid: grid candidates evaluated at most (half spread evenly over the grid, half nearest
            the best so far).
        refine_steps: per-block moves tried.
        slack: grid candidates may exceed the target by this much.
        progress: show a progress bar (when the caller passes none).
        variants: try the merge variants on the best grid schedule (stage 2).
        mirror: score every candidate on the calibration images and their horizontal mirror images
            (:func:`with_mirrors`, ``2N`` views; twice the time); the metrics in the result are
            over those ``2N`` views.
        keys: merge-variant keys chosen beforehand (:meth:`dsm_export.core.schedule.Schedule.variant_keys`
            of another search's winner, e.g. ``{"protect": 16, "merge": "mlerp"}``): every grid
            candidate is evaluated with them (raised to the target, :func:`reach_target`) and no
            variant stage runs. The engine search uses this to run the variant stage at one FLOP
            rung only (:class:`dsm_export.search.engine_search.EngineSearch`).
        anchor: with ``keys``: a schedule the grid search starts nearest to (:func:`grid_distance`)
            instead of spreading over the grid, e.g. the winner at a neighbouring FLOP ratio.
    """

    target: float
    max_grid: int = 48
    refine_steps: int = 24
    slack: float = 0.05
    progress: bool = True
    variants: bool = True
    mirror: bool = True
    keys: dict | None = None
    anchor: Schedule | None = None


class ScheduleSearch:
    """The search for the schedule with the least divergence (KL, or 1 - cosine for embedding
    models) at ``settings.target``-fold fewer FLOPs (see the module doc): :meth:`run` does it all;
    each stage is a method of its own, sharing the state below.

    Args:
        model: unmerged timm ViT (eval mode).
        pixels: ``[N, 3, H, W]`` calibration images (preprocessed).
        settings: a :class:`ScheduleSearchSettings`.
        base: the unmerged outputs on the scored views (``[2N, classes]`` with ``mirror``), when the
            caller has them already; computed otherwise.
        bar: a tqdm bar of the caller's to advance by one per candidate, instead of a bar of its own.

    Attributes:
        pixels: the scored views (with the mirror images when ``settings.mirror``).
        base: the unmerged outputs on them.
        cands: the grid candidates (:func:`grid_candidates`).
        evaluated: every evaluated candidate, in evaluation order.
        variant_rows: the variant stage's candidates, the plain schedule first.
        best, best_m: the best schedule so far and its metrics.

    Raises:
        ValueError: ``base`` does not hold one output per scored view.
        DSMError: no grid schedule reaches the target.
    """

    def __init__(self, model: nn.Module, pixels: torch.Tensor, settings: ScheduleSearchSettings,
                 base: np.ndarray | None = None, bar=None):
        self.model, self.settings, self.bar = model, settings, bar
        self.depth = len(model.blocks)
        self.grid = tuple(int(g) for g in model.patch_embed.grid_size)
        self.prefix = int(model.num_prefix_tokens)
        self.pixels = with_mirrors(pixels) if settings.mirror else pixels
        if base is None:
            base = model_logits(model, self.pixels)
        elif len(base) != len(self.pixels):
            raise ValueError(f"base holds {len(base)} outputs for {len(self.pixels)} views")
        self.base = base
        self.cands = grid_candidates(model, settings.target, settings.slack)
        if not self.cands:
            raise DSMError(f"no schedule reaches {settings.target:.2f}x fewer FLOPs on this model")
        self.run_variants = settings.variants and settings.keys is None
        self.evaluated: list[Candidate] = []
        self.variant_rows: list[Candidate] = []
        self.best: Schedule | None = None
        self.best_m: Candidate | None = None

    def run(self) -> ScheduleSearchResult:
        """Grid, merge variants (and the grid again with the winning keys), per-block refinement."""
        s = self.settings
        own_bar = self.bar is None
        if own_bar:
            n_variants = 2 * N_VARIANT_STAGE + s.max_grid if self.run_variants else 0
            self.bar = tqdm(total=min(len(self.cands), s.max_grid) + n_variants + s.refine_steps, desc="tune",
                            unit="schedule", disable=not s.progress, leave=False)
        grid_best = self.grid_stage()
        if self.run_variants:
            self.variant_search(grid_best)
        self.refine()
        if own_bar:
            self.bar.close()
        return ScheduleSearchResult(self.best, self.best_m, self.evaluated,
                                    pareto_front(self.evaluated, "flops_ratio"), self.variant_rows)

    def raised(self, s: Schedule, keys: dict) -> Schedule:
        """``s`` with the variant ``keys``, raised to the target (:func:`reach_target`)."""
        return reach_target(self.model, dataclasses.replace(s, **keys), self.settings.target)

    def grid_search(self, cands: list[Schedule], keys: dict | None = None, best: tuple | None = None,
                    anchor: Schedule | None = None) -> tuple[Schedule, Candidate, Schedule]:
        """:func:`_grid_search` over ``cands`` (with ``keys``: each raised with them, :meth:`raised`)
        within ``settings.max_grid``."""
        decorate = None if keys is None else (lambda g: self.raised(g, keys))
        return _grid_search(self.model, self.pixels, self.base, cands, self.settings.max_grid, self.evaluated,
                            self.bar, decorate=decorate, best=best, anchor=anchor)

    def grid_stage(self) -> Schedule:
        """Stage 1: sets the best schedule; returns its grid candidate.

        With ``settings.keys`` (chosen elsewhere): the grid with them, nearest first from
        ``settings.anchor``. Otherwise coarse to fine: an even spread over the grid (ToMe's constant
        r always in it), then the unevaluated candidates nearest the best so far (:func:`grid_distance`).
        """
        keys = self.settings.keys
        if keys is None:
            self.best, self.best_m, grid_best = self.grid_search(self.cands)
            return grid_best
        self.best, self.best_m, grid_best = self.grid_search(self.cands, keys=keys, anchor=self.settings.anchor)
        if self.best is None:
            raise DSMError(f"no schedule with {keys} reaches {self.settings.target:.2f}x fewer FLOPs on this model")
        return grid_best

    def attempt(self, s: Schedule, label: str, rows: list[Candidate] | None, tried: list) -> Candidate | None:
        """Evaluate variant ``s`` raised to the target; appends ``(raised, metrics, s)`` to ``tried``
        and the metrics to ``evaluated`` (and ``rows``). None if ``s`` is invalid."""
        variant = s
        try:
            s = reach_target(self.model, s, self.settings.target)
            m = scored(self.model, s, self.pixels, self.base)
        except ScheduleError:  # e.g. more prune blocks than global blocks
            return None
        m.variant = label
        self.evaluated.append(m)
        if rows is not None:
            rows.append(m)
        tried.append((s, m, variant))
        return m

    def variant_stage(self, grid_s: Schedule, rows: list[Candidate] | None):
        """Each variant on ``grid_s``, then the groups' best singles combined; the best one tried
        (schedule, metrics, variant before :func:`reach_target`), or None."""
        tried: list[tuple[Schedule, Candidate, Schedule]] = []
        singles: dict[str, tuple[Schedule, Candidate]] = {}  # the best single variant of each group
        for v in variant_candidates(grid_s):
            m = self.attempt(v, variant_label(v), rows, tried)
            self.bar.update()
            g = variant_group(v.variant_keys())
            if m is not None and (g not in singles or better(m, singles[g][1])):
                singles[g] = (v, m)
        # Combine the groups' best singles, best group first
        order = sorted(singles, key=lambda g: quality_key(singles[g][1]))
        for k in range(2, len(order) + 1):
            combo = _combine(grid_s, [singles[g][0] for g in order[:k]])
            self.attempt(combo, variant_label(combo), rows, tried)
            self.bar.update()
        return min(tried, key=lambda t: quality_key(t[1]), default=None)

    def variant_search(self, grid_best: Schedule) -> None:
        """Stages 2-3: the variant stage on the best grid schedule (its rows in ``variant_rows``,
        the plain one first); if a variant wins, :meth:`regrid` with its keys."""
        self.variant_rows.append(dataclasses.replace(self.best_m, variant="plain"))
        found = self.variant_stage(self.best, self.variant_rows)
        if found is not None and better(found[1], self.best_m):
            self.best, self.best_m, winner = found
            self.regrid(grid_best, winner)

    def regrid(self, grid_best: Schedule, winner: Schedule) -> None:
        """Stage 3: the grid again with the winning variant keys, nearest first from the plain winner
        ``grid_best``; if another grid schedule wins, the variant stage once more on it.

        Every similarity metric is a candidate here: which one matches best depends on the grid
        schedule too (on DeiT-Tiny at 2x, metric=tokens loses on the plain winner's grid and wins
        with one more dense block).
        """
        keys = {k: getattr(winner, k) for k in ("protect", "prune", "merge")}
        first = dataclasses.replace(grid_best, metric=winner.metric)
        pairs = [first] + [dataclasses.replace(g, metric=m) for g in self.cands for m in METRICS
                           if (g, m) != (grid_best, winner.metric)]
        self.best, self.best_m, regrid = self.grid_search(pairs, keys=keys, best=(self.best, self.best_m),
                                                          anchor=first)
        if regrid is not first:
            found = self.variant_stage(dataclasses.replace(regrid, metric="keys"), None)
            if found is not None and better(found[1], self.best_m):
                self.best, self.best_m = found[0], found[1]

    def reaches(self, s: Schedule) -> bool:
        """Whether ``s`` fits the model and still reaches the target."""
        try:
            resolve(s, self.depth, self.grid, self.prefix)
            return flops_ratio(self.model, s) >= self.settings.target
        except ScheduleError:
            return False

    def refine(self) -> None:
        """Stage 4, per-block refinement: move ``step`` merged tokens from block i to block j
        (``settings.refine_steps`` random moves, seed 0), keeping a move only if it scores better."""
        plan = list(self.best.plan(self.depth))
        rng = np.random.default_rng(0)
        merging = [i for i, b in enumerate(plan) if b.mode != "none"]
        for _ in range(self.settings.refine_steps):
            self.bar.update()
            if len(merging) < 2:
                break
            i, j = rng.choice(merging, size=2, replace=False)
            step = int(rng.integers(1, 5))
            if plan[i].r < step:
                continue
            trial = list(plan)
            trial[i] = BlockPlan(plan[i].mode, plan[i].r - step)
            trial[j] = BlockPlan(plan[j].mode, plan[j].r + step)
            s = dataclasses.replace(self.best, blocks=tuple(trial), prune=0)
            if not self.reaches(s):
                continue
            m = scored(self.model, s, self.pixels, self.base)
            self.evaluated.append(m)
            if better(m, self.best_m):
                self.best, self.best_m, plan = s, m, trial


def search_schedules(model: nn.Module, pixels: torch.Tensor, settings: ScheduleSearchSettings,
                     base: np.ndarray | None = None, bar=None) -> ScheduleSearchResult:
    """Search for the schedule with the least divergence at ``settings.target``-fold fewer FLOPs:
    ``ScheduleSearch(model, pixels, settings, base, bar).run()`` (:class:`ScheduleSearch`, see the
    module doc).

    Returns:
        A :class:`ScheduleSearchResult`.

    Raises:
        DSMError: if no schedule reaches the target.
        ValueError: ``base`` does not hold one output per scored view.
    """
    return ScheduleSearch(model, pixels, settings, base, bar).run()
