"""Where an engine's time goes: the runtime's own time per op (``dsm-export profile``), summed by op type
and split into the model's own work, the merge path and layout conversions.

The split comes from node labels, not guesses: an op is merge work where it is a node of the matching
and size path (the node list every INT8 and fp16 build keeps in fp32,
:func:`dsm_export.engines.fp16.fp32_island_nodes`: key mean, normalisation, similarity MatMul,
ArgMax/TopK, the one-hot assignment, sizes and ``log(size)``), layout work where the runtime only
converts layout or precision (:data:`dsm_export.engines.registry.LAYOUT_OPS`), model work otherwise.
Ops outside that list that only move tokens (the unmerged rows' gathers, the merged sequence's
Concat) and nodes a runtime names itself count as model work, so the merge share is a lower bound
on what merging costs; a token-count twin (``research/merge_overhead.py``) measures the whole.
The runtimes measure: ONNX Runtime's profiler (``SessionOptions.enable_profiling``) and OpenVINO's
``PERF_COUNT``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..engines.registry import Profile, RunnerOptions, backend_for
from ..errors import DSMError

PARTS = ("model", "merge", "layout")


@dataclass
class ProfileSummary:
    """One engine's profile, summed.

    Attributes:
        profile: the :class:`~dsm_export.engines.registry.Profile` it sums.
        op_ms: milliseconds per run by op type, largest first.
        part_ms: milliseconds per run of the model's work, the merge path and layout conversions.
        op_ms_total: the sum over ops (ms per run); ``profile.wall_ms`` is the wall time, which also
            holds the runtime's dispatch between ops.
        ops: ops that ran.
    """

    profile: Profile
    op_ms: dict[str, float]
    part_ms: dict[str, float]
    op_ms_total: float
    ops: int

    def to_json(self) -> dict:
        """The summary as JSON (``--json``); the per-op list under ``profile.ops``."""
        return asdict(self)


def summarize(profile: Profile) -> ProfileSummary:
    """Sum a profile by op type and by part (see the module docstring)."""
    op_ms: dict[str, float] = {}
    part_ms = dict.fromkeys(PARTS, 0.0)
    for op in profile.ops:
        op_ms[op.op_type] = op_ms.get(op.op_type, 0.0) + op.ms
        part_ms[op.part] += op.ms
    ordered = dict(sorted(op_ms.items(), key=lambda kv: -kv[1]))
    return ProfileSummary(profile, ordered, part_ms, sum(op_ms.values()), len(profile.ops))


def profile_engine(path: str, options: RunnerOptions | None = None, batch: int = 32, runs: int = 10,
                   warmup: int = 3) -> ProfileSummary:
    """Profile the engine ``path`` with its backend's profiler hook and sum it.

    Args:
        path: an engine file of any registered backend.
        options: threads and provider (:class:`~dsm_export.engines.registry.RunnerOptions`).
        batch: images per run; runs, warmup: timed and untimed runs.

    Raises:
        DSMError: a backend with no profiler hook (TensorRT here: layer timings need its GPU runtime),
            bad counts, and what the backend's profiler raises.
    """
    if batch < 1 or runs < 1 or warmup < 0:
        raise DSMError("--batch and --runs must be at least 1, --warmup at least 0")
    backend = backend_for(path)
    if backend.profile is None:
        raise DSMError(f"profile: {backend.label} engines have no profiler hook here"
                       + (" (their layer timings need an NVIDIA GPU)" if backend.needs_gpu else ""))
    return summarize(backend.profile(path, options or RunnerOptions(), batch, runs, warmup))


def format_profiles(summaries: list[ProfileSummary], top: int = 12) -> str:
    """A table per op type (the ``top`` largest of the first engine, then the rest summed) and the split
    into model, merge and layout work, engines side by side."""
    heads = [f"{s.profile.path.rsplit('/', 1)[-1]}" for s in summaries]
    width = max(18, *(len(h) + 2 for h in heads))
    lines = [f"{'':24}" + "".join(f"{h:>{width}}" for h in heads)]
    first = summaries[0]
    types = list(first.op_ms)[:top]
    for s in summaries[1:]:
        types += [t for t in list(s.op_ms)[:top] if t not in types]
    for t in types:
        lines.append(f"{t:24}" + "".join(f"{s.op_ms.get(t, 0.0):{width - 3}.2f} ms" for s in summaries))
    rest = [s.op_ms_total - sum(s.op_ms.get(t, 0.0) for t in types) for s in summaries]
    lines.append(f"{'(other op types)':24}" + "".join(f"{r:{width - 3}.2f} ms" for r in rest))
    lines.append(f"{'sum over ops':24}" + "".join(f"{s.op_ms_total:{width - 3}.2f} ms" for s in summaries))
    lines.append(f"{'wall time':24}" + "".join(f"{s.profile.wall_ms:{width - 3}.2f} ms" for s in summaries))
    for part in PARTS:
        cells = "".join(
            f"{s.part_ms[part]:{width - 9}.2f} ms {100 * s.part_ms[part] / (s.op_ms_total or 1):3.0f}%" for s in summaries)
        lines.append(f"{part + ' work':24}" + cells)
    lines.append(f"{'ops':24}" + "".join(f"{s.ops:>{width}}" for s in summaries))
    return "\n".join(lines)
