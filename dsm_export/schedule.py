"""Merge schedules: which blocks merge, how many tokens, locally or globally.

A schedule is a per-block plan, one entry per transformer block: ``none`` (the block stays dense),
``local r`` (merge inside each window of the patch grid, ``ceil(r / W)`` tokens in each of the W
windows, so windows keep equal sizes) or ``global r`` (ToMe's bipartite soft matching over all
mergeable tokens). It follows DSM (Heo et al., arXiv 2303.02331): a *delay* of dense bottom blocks
(Sec. 3, attention there has not converged), then *spatial* merging inside local windows for the
first merging blocks, then global merging (Sec. 4, hierarchical merging).

Compact text form (the CLI's ``--schedule``)::

    none                              no merging (the unmerged baseline through the same path)
    r=13                              ToMe's constant schedule: global r=13 from block 0
    r=13,delay=2,local=4,windows=2x2  DSM: 2 dense blocks, 4 local blocks, then global
    r=24,r_end=8,delay=3              r falls linearly from 24 to 8 over the merging blocks

A JSON file holds the explicit list, so per-block r may vary freely::

    {"blocks": ["none", "none", "local 16", "local 16", "global 12", ...], "windows": "2x2"}

Token counts follow from the schedule alone, so every shape of an exported graph is static; they are
checked up front by :func:`resolve` (at most half the mergeable tokens per step, per window in
local mode; windows must divide the patch grid; local blocks must precede global ones).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from .errors import ScheduleError

MODES = ("none", "local", "global")


@dataclass(frozen=True)
class BlockPlan:
    """One block's entry: ``mode`` in ``none | local | global`` and ``r`` tokens to remove.

    For ``local``, ``r`` is the total asked for; each of the W windows merges ``ceil(r / W)``.
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
                raise ScheduleError(f"block entry {item!r}: expected 'none', 'local R' or 'global R'")
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
        removed: tokens this block really removes (``W * ceil(r / W)`` for local).
        per_window: tokens merged inside each window (local only, else 0).
        tokens_in: tokens entering the block (attention runs on these).
        tokens_out: tokens leaving the block (the MLP runs on these).
    """

    index: int
    plan: BlockPlan
    removed: int
    per_window: int
    tokens_in: int
    tokens_out: int


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
    """

    r: int = 0
    delay: int = 0
    local: int = 0
    windows: tuple[int, int] = (2, 2)
    r_end: int | None = None
    blocks: tuple[BlockPlan, ...] | None = field(default=None)

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
            elif key in ("r", "delay", "local", "r_end"):
                params[key] = _nonneg_int(value, f"schedule {text!r}: {key}")
            else:
                raise ScheduleError(
                    f"schedule {text!r}: unknown key {key!r} (use r, delay, local, windows, r_end)")
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
        if "blocks" in data:
            blocks = tuple(BlockPlan.parse(b) for b in data["blocks"])
            return cls(windows=windows, blocks=blocks)
        known = {"r", "delay", "local", "r_end"}
        unknown = set(data) - known - {"windows", "spec"}
        if unknown:
            raise ScheduleError(f"schedule JSON: unknown keys {sorted(unknown)}")
        params = {k: _nonneg_int(data[k], k) for k in known if data.get(k) is not None}
        return cls(windows=windows, **params)

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
        if self.delay:
            parts.append(f"delay={self.delay}")
        if self.local:
            parts.append(f"local={self.local}")
            parts.append(f"windows={self.windows[0]}x{self.windows[1]}")
        return ",".join(parts)

    def __str__(self) -> str:
        return self.spec()

    def to_dict(self, depth: int) -> dict:
        """The explicit JSON form for a model of ``depth`` blocks (loadable by :meth:`from_dict`)."""
        return {
            "blocks": [str(b) for b in self.plan(depth)],
            "windows": f"{self.windows[0]}x{self.windows[1]}",
        }

    def plan(self, depth: int) -> tuple[BlockPlan, ...]:
        """Expand to one :class:`BlockPlan` per block.

        Raises:
            ScheduleError: if an explicit list has the wrong length, or delay exceeds depth.
        """
        if self.blocks is not None:
            if len(self.blocks) != depth:
                raise ScheduleError(
                    f"schedule lists {len(self.blocks)} blocks but the model has {depth}")
            return self.blocks
        if self.is_none:
            return tuple(BlockPlan() for _ in range(depth))
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
        return tuple(out)


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
            half of the mergeable tokens per step, per window in local mode), if windows do not
            divide the patch grid, or if a local block follows a global one.
    """
    plan = schedule.plan(depth)
    wh, ww = schedule.windows
    n_windows = wh * ww
    uses_local = any(b.mode == "local" and b.r > 0 for b in plan)
    if uses_local and (grid[0] % wh or grid[1] % ww):
        raise ScheduleError(
            f"windows {wh}x{ww} do not divide the {grid[0]}x{grid[1]} patch grid")
    n = grid[0] * grid[1]  # mergeable tokens
    seen_global = None
    out = []
    for i, b in enumerate(plan):
        removed = per_window = 0
        if b.mode == "global" and b.r > 0:
            if b.r > n // 2:
                raise ScheduleError(
                    f"block {i}: global r={b.r} asks for more than half of its {n} mergeable tokens "
                    f"(at most {n // 2})")
            removed = b.r
            seen_global = i if seen_global is None else seen_global
        elif b.mode == "local" and b.r > 0:
            if seen_global is not None:
                raise ScheduleError(
                    f"block {i}: local merging after global merging at block {seen_global}; "
                    "local blocks must come first")
            per_window = math.ceil(b.r / n_windows)
            n_w = n // n_windows
            if per_window > n_w // 2:
                raise ScheduleError(
                    f"block {i}: local r={b.r} needs {per_window} merges in each of {n_windows} windows "
                    f"of {n_w} tokens (at most {n_w // 2} per window)")
            removed = per_window * n_windows
        out.append(BlockTokens(i, b, removed, per_window, n + num_prefix, n - removed + num_prefix))
        n -= removed
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


def _parse_windows(value: str) -> tuple[int, int]:
    parts = str(value).lower().split("x")
    if len(parts) != 2:
        raise ScheduleError(f"windows {value!r}: expected ROWSxCOLS such as 2x2")
    rows, cols = (_nonneg_int(p, f"windows {value!r}") for p in parts)
    if rows < 1 or cols < 1:
        raise ScheduleError(f"windows {value!r}: both numbers must be at least 1")
    return rows, cols
