"""Merge schedules: which blocks merge, how many tokens, locally or globally.

A schedule is a per-block plan, one entry per transformer block: ``none`` (the block stays dense),
``local r`` (merge inside each window of the patch grid, ``ceil(r / W)`` tokens in each of the W
windows where the windows divide the grid; see below for uneven windows) or ``global r`` (ToMe's bipartite soft matching over all
mergeable tokens). It follows DSM (Heo et al., arXiv 2303.02331): a *delay* of dense bottom blocks
(Sec. 3, attention there has not converged), then *spatial* merging inside local windows for the
first merging blocks, then global merging (Sec. 4, hierarchical merging).

Compact text form (the CLI's ``--schedule``)::

    none                              no merging (the unmerged baseline through the same path)
    r=13                              ToMe's constant schedule: global r=13 from block 0
    r=13,delay=2,local=4,windows=2x2  DSM: 2 dense blocks, 4 local blocks, then global
    r=24,r_end=8,delay=3              r falls linearly from 24 to 8 over the merging blocks
    r=24,r_end=8,delay=3,protect=16   ... and the 16 tokens with the most class attention never merge
    r=24,r_end=8,delay=3,prune=3      ... and the last 3 merging blocks drop tokens instead
    r=27,r_end=9,delay=3,stride=2     ... merging in every second block only, two blocks' r at once
    r=13,mode=tome                    exactly ToMe's official timm patch (prefix tokens in the split)
    r=13,inflect=-0.5,mode=tome       ToMe's ``(r, inflection)`` schedule, as its ``parse_r``

A JSON file holds the explicit list, so per-block r may vary freely::

    {"blocks": ["none", "none", "local 16", "local 16", "global 12", ..., "prune 8"], "windows": "2x2"}
    {"mode": "tome", "r": [16, 16, 8]}   ToMe's r list (padded with zeros to the depth, as ToMe does)

Merge variants (DSM mode only; see :mod:`dsm_export.core.merge` for the maths and sources):

* ``protect=P``: importance-protected matching. In global blocks the ``P`` mergeable tokens with
  the most class-token attention (mean over heads) are neither merged away nor merged into, in the
  spirit of PiToMe's protection of informative tokens (Tran et al., arXiv 2405.16148, Sec. 3) with
  EViT's class-attention importance (Liang et al., ICLR 2022, Sec. 3.1).
* ``prune=K`` (or ``"prune R"`` block entries): prune-then-merge. The last ``K`` merging blocks
  drop the ``r`` tokens with the least class attention instead of merging them, as DiffRate's
  pruning (Chen et al., ICCV 2023, Sec. 3.2) and PPT (Wu et al., 2023); dropped tokens and their
  sizes leave the sequence, so proportional attention no longer counts the patches they stood for.
* ``metric=heads``: match on the cosine similarity of each head's keys, averaged over heads,
  instead of the cosine of the head-averaged keys (ToMe's choice, Bolya et al. 2023, Sec. 3).
* ``metric=tokens``: match on the cosine similarity of the tokens themselves, the block's input
  after its first LayerNorm (the feature attention reads; "X" in ToMe's feature-choice ablation,
  Bolya et al. 2023, Sec. 4.1, Table 1a). ToMe found keys slightly better after fine-tuning; on the
  off-the-shelf DeiT-Tiny here the tokens match better at 2x (README, merge variants).
* ``merge=mlerp``: norm-preserving merge; the size-weighted mean is rescaled to the largest norm
  among the tokens merged into it (MLERP of ToFu, Kim et al., WACV 2024), so averaging
  dissimilar tokens does not shrink them.

``stride=K`` merges less often: each run of ``K`` consecutive merging blocks of one mode merges
its ``K`` blocks' r at once, in its last block, and the others stay dense (the token count after
each run is the same). Every merging block costs the matching and the merge, time that its FLOPs
do not show, so fewer merging blocks at the same FLOP ratio could run faster. Measured on DeiT-Tiny
(the README's frontier) it did with fp32 ONNX Runtime but not with INT8, and merged less accurately.
See :func:`stride_blocks`.

``mode=tome`` reproduces ``tome.patch.timm`` of the official ToMe code (Bolya et al. 2023): the class
and distillation tokens take part in the alternating A/B split and are protected by a -inf score,
r is clipped to ``(tokens - protected) // 2`` in every block, and the schedule follows ToMe's
``parse_r`` (an int, ``r`` with ``inflect``, or an r list padded with zeros).

Token counts follow from the schedule alone, so every shape of an exported graph is static; they are
checked up front by :func:`resolve` (at most half the mergeable tokens per step, per window in
local mode; local blocks must precede global ones).

Windows that do not divide the patch grid are uneven, with sizes fixed by the grid: rows and
columns split as evenly as possible, larger windows first (a 7x7 grid in 2x2 windows is 4/3 rows by
4/3 columns: windows of 16, 12, 12 and 9 tokens; 37x37 in 2x2 is 19/18 by 19/18). A local block's
``r`` spreads over the windows in proportion to their tokens, rounded up: a window of ``n_w`` of the
``n`` mergeable tokens merges ``ceil(r * n_w / n)``, which is ``ceil(r / W)`` for equal windows. So
windows of one size stay equal, and the export merges each group of equal windows with the same
ops as the even case (:func:`window_groups`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import ScheduleError

MODES = ("none", "local", "global", "prune")
SCHEDULE_MODES = ("dsm", "tome")
METRICS = ("keys", "heads", "tokens")
MERGES = ("mean", "mlerp")


@dataclass(frozen=True)
class BlockPlan:
    """One block's entry: ``mode`` in ``none | local | global | prune`` and ``r`` tokens to remove.

    For ``local``, ``r`` is the total asked for; each of the W windows merges ``ceil(r / W)``.
    ``prune`` drops the ``r`` tokens with the least class attention instead of merging them.
    """

    mode: str = "none"
    r: int = 0

    def __str__(self) -> str:
        return "none" if self.mode == "none" else f"{self.mode} {self.r}"

    @classmethod
    def parse(cls, item) -> "BlockPlan":
        """Parse ``"none"``, ``"local 16"``, ``"global 13"`` or ``{"mode": ..., "r": ...}``.

        Raises:
            ScheduleError: for any other form.
        """
        if isinstance(item, dict):
            mode, r = item.get("mode", "none"), item.get("r", 0)
        elif isinstance(item, str):
            parts = item.split()
            if len(parts) == 1 and parts[0] == "none":
                mode, r = "none", 0
            elif len(parts) == 2:
                mode, r = parts[0], parts[1]
            else:
                raise ScheduleError(
                    f"block entry {item!r}: expected 'none', 'local R', 'global R' or 'prune R'")
        else:
            raise ScheduleError(f"block entry {item!r}: expected a string such as 'global 13'")
        if mode not in MODES:
            raise ScheduleError(f"block entry {item!r}: mode must be one of {', '.join(MODES)}")
        r = _nonneg_int(r, f"block entry {item!r}: r")
        if mode == "none":
            r = 0
        return cls(mode, r)


@dataclass(frozen=True)
class BlockTokens:
    """Resolved plan of one block, with the true token counts (prefix tokens included).

    Attributes:
        index: block index (0-based).
        plan: the scheduled entry.
        removed: tokens this block really removes (for local, the sum over windows of
            ``ceil(r * n_w / n)``: ``W * ceil(r / W)`` where the windows divide the grid).
        per_window: tokens merged inside each window, the largest window's where windows differ
            (local only, else 0).
        tokens_in: tokens entering the block (attention runs on these).
        tokens_out: tokens leaving the block (the MLP runs on these).
        matched: tokens entering the matching (the mergeable ones; prefix tokens included in
            ``mode=tome``, as ToMe splits them too); 0 for blocks that do not merge.
        protect: tokens protected from merging by class attention (``protect=P``, clipped to
            ``mergeable - 2 * removed`` so that enough tokens stay free to merge), else 0.
        windows: local only: ``(count, tokens, r)`` per group of equal windows
            (:func:`window_groups`, largest first): each of ``count`` windows enters the block with
            ``tokens`` tokens and merges ``r`` of them; one group where the windows divide the grid.
    """

    index: int
    plan: BlockPlan
    removed: int
    per_window: int
    tokens_in: int
    tokens_out: int
    matched: int = 0
    protect: int = 0
    windows: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class Schedule:
    """A DSM merge schedule, from parameters or an explicit per-block list.

    Attributes:
        r: tokens removed per merging block (0: no merging).
        delay: number of bottom blocks left dense.
        local: number of merging blocks, after the delay, that merge inside windows.
        windows: window grid over the patch grid ``(rows, cols)``, default ``(2, 2)``.
        r_end: if set, r falls (or rises) linearly from ``r`` to ``r_end`` over the merging blocks.
        blocks: an explicit per-block list; when set it overrides the parameters above.
        mode: ``"dsm"`` (prefix tokens kept out of the matching) or ``"tome"`` (the official ToMe
            timm patch, exactly; see the module doc).
        inflect: ToMe's inflection in ``[-1, 1]`` (``mode=tome`` only): r rises (+1) or falls (-1)
            over the blocks around its mean, as ToMe's ``parse_r((r, inflect))``.
        protect: importance-protected matching: tokens kept out of global merges by class attention.
        prune: the last ``prune`` merging blocks drop tokens instead of merging them.
        metric: similarity of the matching: ``"keys"`` (cosine of the keys averaged over heads,
            ToMe), ``"heads"`` (cosine similarity of each head's keys, averaged over heads) or
            ``"tokens"`` (cosine similarity of the block's normalised input tokens).
        merge: ``"mean"`` (ToMe's size-weighted mean) or ``"mlerp"`` (the mean rescaled to the
            largest norm among the merged tokens, ToFu's norm-preserving MLERP).
        stride: merge in every ``stride``-th merging block only, each merging the r of its run
            (:func:`stride_blocks`); 1 merges in every block.
    """

    r: int = 0
    delay: int = 0
    local: int = 0
    windows: tuple[int, int] = (2, 2)
    r_end: int | None = None
    blocks: tuple[BlockPlan, ...] | None = field(default=None)
    mode: str = "dsm"
    inflect: float | None = None
    protect: int = 0
    prune: int = 0
    metric: str = "keys"
    merge: str = "mean"
    stride: int = 1

    def __post_init__(self):
        if self.stride < 1:
            raise ScheduleError(f"stride={self.stride}: must be at least 1")
        if self.metric not in METRICS:
            raise ScheduleError(f"metric={self.metric!r}: expected one of {', '.join(METRICS)}")
        if self.merge not in MERGES:
            raise ScheduleError(f"merge={self.merge!r}: expected one of {', '.join(MERGES)}")
        if self.mode not in SCHEDULE_MODES:
            raise ScheduleError(f"mode={self.mode!r}: expected one of {', '.join(SCHEDULE_MODES)}")
        if self.mode == "tome":
            extra = [k for k, v in (("delay", self.delay), ("local", self.local), ("r_end", self.r_end),
                                    ("stride", self.stride > 1)) if v]
            extra += list(self.variant_keys())
            if extra:
                raise ScheduleError(
                    f"mode=tome reproduces ToMe and takes r, inflect or an r list only, not {', '.join(extra)}")
            if self.blocks is not None and any(b.mode not in ("none", "global") for b in self.blocks):
                raise ScheduleError("mode=tome blocks must be 'none' or 'global R'")
        elif self.inflect is not None:
            raise ScheduleError("inflect is ToMe's parameter: use it with mode=tome (or use r_end)")
        if self.inflect is not None and not -1.0 <= self.inflect <= 1.0:
            raise ScheduleError(f"inflect={self.inflect}: must lie in [-1, 1]")

    # ---------------------------------------------------------------- parsing
    @classmethod
    def parse(cls, text: str) -> "Schedule":
        """Parse the compact text form, or load a JSON file if ``text`` names one.

        Raises:
            ScheduleError: unknown key, malformed value, or unreadable JSON file.
        """
        text = text.strip()
        if text.lower().endswith(".json"):
            return cls.from_json_file(text)
        if text.startswith("{") or text.startswith("["):
            try:
                return cls.from_dict(json.loads(text))
            except json.JSONDecodeError as exc:
                raise ScheduleError(f"schedule is not valid JSON: {exc}") from None
        if text in ("", "none"):
            return cls()
        params: dict = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key:
                raise ScheduleError(f"schedule {text!r}: expected key=value pairs such as r=13,delay=2")
            if key in params:
                raise ScheduleError(f"schedule {text!r}: {key} given twice")
            if key == "windows":
                params[key] = _parse_windows(value)
            elif key in ("r", "delay", "local", "r_end", "protect", "prune", "stride"):
                params[key] = _nonneg_int(value, f"schedule {text!r}: {key}")
            elif key in ("mode", "metric", "merge"):
                params[key] = value
            elif key == "inflect":
                params[key] = _float(value, f"schedule {text!r}: inflect")
            else:
                raise ScheduleError(
                    f"schedule {text!r}: unknown key {key!r} "
                    "(use r, delay, local, windows, r_end, stride, protect, prune, metric, merge, mode, inflect)")
        if "r" not in params:
            raise ScheduleError(f"schedule {text!r}: r is required (or 'none')")
        return cls(**params)

    @classmethod
    def from_dict(cls, data) -> "Schedule":
        """Build from ``{"blocks": [...], "windows": "2x2"}`` or a bare list of block entries.

        A dict without ``blocks`` may hold the parameters instead (``{"r": 13, "delay": 2}``).

        Raises:
            ScheduleError: on a malformed entry.
        """
        if isinstance(data, list):
            data = {"blocks": data}
        if not isinstance(data, dict):
            raise ScheduleError("schedule JSON must be an object or a list of block entries")
        windows = data.get("windows", (2, 2))
        windows = _parse_windows(windows) if isinstance(windows, str) else tuple(windows)
        if len(windows) != 2 or min(windows) < 1:
            raise ScheduleError(f"windows {windows!r}: expected two positive integers")
        extra = {"mode": str(data.get("mode", "dsm")), "metric": str(data.get("metric", "keys")),
                 "merge": str(data.get("merge", "mean"))}
        if data.get("inflect") is not None:
            extra["inflect"] = _float(data["inflect"], "inflect")
        for key in ("protect", "prune"):
            if data.get(key):
                extra[key] = _nonneg_int(data[key], key)
        if "blocks" in data:
            if not isinstance(data["blocks"], list):
                raise ScheduleError("schedule JSON: blocks must be a list")
            blocks = tuple(BlockPlan.parse(b) for b in data["blocks"])
            extra.pop("prune", None)  # an explicit list names its prune blocks
            return cls(windows=windows, blocks=blocks, **extra)
        if extra["mode"] == "tome" and isinstance(data.get("r"), list):
            # ToMe's r list: one r per block, padded with zeros (tome.utils.parse_r)
            rs = [_nonneg_int(v, "r list entry") for v in data["r"]]
            return cls(windows=windows, blocks=tuple(BlockPlan("global", v) if v else BlockPlan() for v in rs),
                       **extra)
        known = {"r", "delay", "local", "r_end", "stride"}
        unknown = set(data) - known - {"windows", "spec", "mode", "metric", "merge", "inflect",
                                       "protect", "prune", "precision"}
        if unknown:
            raise ScheduleError(f"schedule JSON: unknown keys {sorted(unknown)}")
        params = {k: _nonneg_int(data[k], k) for k in known if data.get(k) is not None}
        return cls(windows=windows, **params, **extra)

    @classmethod
    def from_json_file(cls, path: str) -> "Schedule":
        """Load a schedule JSON file (see :meth:`from_dict`).

        Raises:
            ScheduleError: if the file is missing or not valid JSON.
        """
        if not os.path.isfile(path):
            raise ScheduleError(f"schedule file {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ScheduleError(f"schedule file {path!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    # ---------------------------------------------------------------- forms
    @property
    def is_none(self) -> bool:
        """True if no block merges."""
        if self.blocks is not None:
            return all(b.mode == "none" or b.r == 0 for b in self.blocks)
        return self.r == 0 and not self.r_end

    def spec(self) -> str:
        """The compact text form (an explicit list is given as JSON)."""
        if self.blocks is not None:
            return json.dumps(self.to_dict(len(self.blocks)), separators=(",", ":"))
        if self.is_none:
            return "none"
        parts = [f"r={self.r}"]
        if self.r_end is not None:
            parts.append(f"r_end={self.r_end}")
        if self.inflect is not None:
            parts.append(f"inflect={self.inflect:g}")
        if self.delay:
            parts.append(f"delay={self.delay}")
        if self.local:
            parts.append(f"local={self.local}")
            parts.append(f"windows={self.windows[0]}x{self.windows[1]}")
        if self.stride > 1:
            parts.append(f"stride={self.stride}")
        parts += [f"{k}={v}" for k, v in self.variant_keys().items()]
        if self.mode != "dsm":
            parts.append(f"mode={self.mode}")
        return ",".join(parts)

    def variant_keys(self, prune: int | None = None) -> dict:
        """The merge-variant keys that differ from their defaults, in spec order: ``protect``,
        ``prune``, ``metric``, ``merge``. ``prune`` is the parameter unless given (an
        explicit block list names its ``"prune R"`` blocks instead)."""
        prune = self.prune if prune is None else prune
        keys = {"protect": self.protect, "prune": prune, "metric": self.metric != "keys" and self.metric,
                "merge": self.merge != "mean" and self.merge}
        return {k: v for k, v in keys.items() if v}

    def __str__(self) -> str:
        return self.spec()

    def to_dict(self, depth: int) -> dict:
        """The explicit JSON form for a model of ``depth`` blocks (loadable by :meth:`from_dict`)."""
        out = {
            "blocks": [str(b) for b in self.plan(depth)],
            "windows": f"{self.windows[0]}x{self.windows[1]}",
        }
        if self.mode != "dsm":
            out["mode"] = self.mode
        out.update((k, v) for k, v in self.variant_keys().items() if k != "prune")  # blocks name prunes
        return out

    def same_as(self, other: "Schedule", depth: int) -> bool:
        """Whether two schedules run the same model of ``depth`` blocks (same explicit form)."""
        return self.to_dict(depth) == other.to_dict(depth)

    def plan(self, depth: int) -> tuple[BlockPlan, ...]:
        """Expand to one :class:`BlockPlan` per block.

        Raises:
            ScheduleError: if an explicit list has the wrong length, or delay exceeds depth.
        """
        if self.blocks is not None:
            if self.mode == "tome" and len(self.blocks) < depth:  # ToMe pads r lists with zeros
                return self.blocks + tuple(BlockPlan() for _ in range(depth - len(self.blocks)))
            if len(self.blocks) != depth:
                raise ScheduleError(
                    f"schedule lists {len(self.blocks)} blocks but the model has {depth}")
            return self.blocks
        if self.is_none:
            return tuple(BlockPlan() for _ in range(depth))
        if self.mode == "tome":
            return tuple(BlockPlan("global", r) if r > 0 else BlockPlan()
                         for r in tome_parse_r(depth, self.r, self.inflect or 0.0))
        if self.delay > depth:
            raise ScheduleError(f"delay={self.delay} exceeds the model's {depth} blocks")
        merging = depth - self.delay
        if self.local > merging:
            raise ScheduleError(
                f"local={self.local} exceeds the {merging} merging blocks left after delay={self.delay}")
        out = [BlockPlan() for _ in range(self.delay)]
        for j in range(merging):
            r = self.r
            if self.r_end is not None and merging > 1:
                r = int(round(self.r + (self.r_end - self.r) * j / (merging - 1)))
            out.append(BlockPlan("local" if j < self.local else "global", r))
        if self.prune:
            if self.prune > merging - self.local:
                raise ScheduleError(
                    f"prune={self.prune} exceeds the {merging - self.local} global merging blocks "
                    f"(after delay={self.delay} and local={self.local})")
            for i in range(depth - self.prune, depth):
                out[i] = BlockPlan("prune", out[i].r)
        return stride_blocks(out, self.stride)


def stride_blocks(plan, stride: int) -> tuple[BlockPlan, ...]:
    """Merge in every ``stride``-th block only: each run of ``stride`` consecutive merging blocks of
    one mode (``local``, ``global`` or ``prune``; runs start at the first merging block) becomes
    dense blocks and one last block that removes the run's total r, so the token count after each
    run is unchanged and tokens leave later (fewer FLOPs saved, fewer matchings run).

    Args:
        plan: one :class:`BlockPlan` per block.
        stride: run length, at least 1 (1 returns the plan as it is).

    Returns:
        The new per-block plan, same length.

    Raises:
        ScheduleError: if ``stride`` is below 1.
    """
    if stride < 1:
        raise ScheduleError(f"stride={stride}: must be at least 1")
    out = list(plan)
    if stride == 1:
        return tuple(out)
    i = 0
    while i < len(out):
        if out[i].mode == "none" or out[i].r == 0:
            i += 1
            continue
        run = [i]
        while len(run) < stride and run[-1] + 1 < len(out) and out[run[-1] + 1].mode == out[i].mode \
                and out[run[-1] + 1].r > 0:
            run.append(run[-1] + 1)
        total = sum(out[j].r for j in run)
        for j in run[:-1]:
            out[j] = BlockPlan()
        out[run[-1]] = BlockPlan(out[run[-1]].mode, total)
        i = run[-1] + 1
    return tuple(out)


def tome_parse_r(depth: int, r: int, inflect: float = 0.0) -> list[int]:
    """ToMe's per-block r for ``(r, inflect)`` (``tome.utils.parse_r``, Bolya et al. 2023, Sec. 4.1).

    ``min = int(r * (1 - inflect))``, ``max = 2 r - min``, r rises linearly from min to max over
    the ``depth`` blocks and every value is truncated with ``int`` as ToMe does.

    Returns:
        ``depth`` values of r (not yet clipped to what each block can give; see :func:`resolve`).
    """
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / (depth - 1) if depth > 1 else 0.0
    return [int(lo + step * i) for i in range(depth)]


def window_sizes(length: int, parts: int) -> list[int]:
    """Split ``length`` patch rows (or columns) into ``parts`` windows as evenly as possible, the
    larger windows first: 7 rows in 2 windows are ``[4, 3]``, 37 in 3 are ``[13, 12, 12]``.

    Raises:
        ValueError: if ``parts`` is not between 1 and ``length``.
    """
    if not 1 <= parts <= length:
        raise ValueError(f"cannot split {length} patch rows or columns into {parts} windows")
    base, extra = divmod(length, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class WindowGroup(NamedTuple):
    """Windows of one token count, contiguous after :func:`window_permutation`.

    Attributes:
        count: number of windows in the group.
        tokens: patch tokens in each of its windows (before any merge).
        windows: their raster indices in the window grid.
    """

    count: int
    tokens: int
    windows: tuple[int, ...]


def window_groups(grid: tuple[int, int], windows: tuple[int, int]) -> list[WindowGroup]:
    """Local windows of the patch grid, grouped by token count, largest first.

    DSM's spatial merging (Heo et al., Sec. 4) merges inside local windows of the patch grid. Where
    the windows divide the grid all have the same size and there is one group. Where they do not,
    rows and columns are split by :func:`window_sizes` (a 7x7 grid in 2x2 windows has windows of
    4x4, 4x3, 3x4 and 3x3 tokens: groups of 16, 12 (two windows) and 9 tokens). Windows of one
    group merge together as one ``[B, count, tokens, C]`` tensor; every size is fixed by the grid.

    Raises:
        ValueError: if a window would have no row or column.
    """
    (gh, gw), (wh, ww) = grid, windows
    rows, cols = window_sizes(gh, wh), window_sizes(gw, ww)
    by_tokens: dict[int, list[int]] = {}
    for wy in range(wh):
        for wx in range(ww):
            by_tokens.setdefault(rows[wy] * cols[wx], []).append(wy * ww + wx)
    return [WindowGroup(len(w), n, tuple(w)) for n, w in sorted(by_tokens.items(), reverse=True)]


def resolve(schedule: Schedule, depth: int, grid: tuple[int, int], num_prefix: int) -> list[BlockTokens]:
    """Check a schedule against a model and return per-block token counts.

    Args:
        schedule: the schedule.
        depth: number of transformer blocks.
        grid: patch grid ``(rows, cols)``.
        num_prefix: class, distillation and register tokens (never merged).

    Returns:
        One :class:`BlockTokens` per block, prefix tokens included in the counts.

    Raises:
        ScheduleError: naming the block, if a block asks for more tokens than it can give (at most
            half of the mergeable tokens per step, per window in local mode), if there are more
            windows than patch rows or columns, or if a local block follows a global one.
    """
    plan = schedule.plan(depth)
    if schedule.mode == "tome":
        return _resolve_tome(plan, grid, num_prefix)
    wh, ww = schedule.windows
    uses_local = any(b.mode == "local" and b.r > 0 for b in plan)
    groups = []
    if uses_local:
        if wh > grid[0] or ww > grid[1]:
            raise ScheduleError(
                f"windows {wh}x{ww} need at least one patch row and column each: the patch grid is "
                f"{grid[0]}x{grid[1]}")
        groups = window_groups(grid, (wh, ww))
    in_window = [g.tokens for g in groups]  # tokens now in each window of each group
    n = grid[0] * grid[1]  # mergeable tokens
    seen_global = None
    out = []
    for i, b in enumerate(plan):
        removed = per_window = 0
        windows = ()
        if b.mode in ("global", "prune") and b.r > 0:
            if b.r > n // 2:
                raise ScheduleError(
                    f"block {i}: {b.mode} r={b.r} asks for more than half of its {n} mergeable tokens "
                    f"(at most {n // 2})")
            removed = b.r
            seen_global = i if seen_global is None else seen_global
        elif b.mode == "local" and b.r > 0:
            if seen_global is not None:
                raise ScheduleError(
                    f"block {i}: local merging after global merging at block {seen_global}; "
                    "local blocks must come first")
            # each window merges its share of r, rounded up: ceil(r / W) where windows are equal
            rs = [-(-b.r * n_w // n) for n_w in in_window]
            for g, n_w, r_w in zip(groups, in_window, rs):
                if r_w > n_w // 2:
                    where = f"each of {g.count} windows" if len(groups) == 1 else "a window"
                    raise ScheduleError(
                        f"block {i}: local r={b.r} needs {r_w} merges in {where} of {n_w} tokens "
                        f"(at most {n_w // 2} per window)")
            windows = tuple((g.count, n_w, r_w) for g, n_w, r_w in zip(groups, in_window, rs))
            removed = sum(g.count * r_w for g, r_w in zip(groups, rs))
            per_window = rs[0]
            in_window = [n_w - r_w for n_w, r_w in zip(in_window, rs)]
        # protection is clipped so that 2r tokens stay free to merge
        protect = max(0, min(schedule.protect, n - 2 * removed)) if (b.mode == "global" and removed) else 0
        out.append(BlockTokens(i, b, removed, per_window, n + num_prefix, n - removed + num_prefix,
                               n if removed else 0, protect, windows))
        n -= removed
    return out


def _resolve_tome(plan, grid: tuple[int, int], num_prefix: int) -> list[BlockTokens]:
    """Token counts of ``mode=tome``: every token (prefix included) enters the matching and r is
    clipped to ``(tokens - protected) // 2``, protected being the class and distillation tokens
    (``tome.merge.bipartite_soft_matching``)."""
    t = grid[0] * grid[1] + num_prefix
    out = []
    for i, b in enumerate(plan):
        removed = min(b.r, (t - num_prefix) // 2) if b.mode == "global" else 0
        removed = max(removed, 0)
        out.append(BlockTokens(i, b, removed, 0, t, t - removed, t if removed else 0, 0))
        t -= removed
    return out


def _nonneg_int(value, what: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        ivalue = int(value)
    except (TypeError, ValueError):
        raise ScheduleError(f"{what} must be a non-negative integer, got {value!r}") from None
    if ivalue < 0:
        raise ScheduleError(f"{what} must be a non-negative integer, got {value!r}")
    return ivalue


def _float(value, what: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        out = float(value)
    except (TypeError, ValueError):
        raise ScheduleError(f"{what} must be a number, got {value!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise ScheduleError(f"{what} must be a finite number, got {value!r}")
    return out


def _parse_windows(value: str) -> tuple[int, int]:
    parts = str(value).lower().split("x")
    if len(parts) != 2:
        raise ScheduleError(f"windows {value!r}: expected ROWSxCOLS such as 2x2")
    rows, cols = (_nonneg_int(p, f"windows {value!r}") for p in parts)
    if rows < 1 or cols < 1:
        raise ScheduleError(f"windows {value!r}: both numbers must be at least 1")
    return rows, cols
