"""ONNX Runtime throughput and batch-1 latency (any execution provider), shared by the benchmark
scripts and ``tune``."""

from __future__ import annotations

import platform
import statistics
import time

import numpy as np

from ..engines.providers import create_session


# /proc/cpuinfo flags that decide which kernels OpenVINO, ONNX Runtime and oneDNN run, in the words printed
ISA_FLAGS = (("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"), ("amx_bf16", "AMX"))


def cpu_flags() -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (``avx2``, ``avx512f``, ``amx_bf16``...);
    empty where there is no such file."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next((set(line.split(":", 1)[1].split()) for line in fh if line.startswith("flags")), set())
    except OSError:
        return set()


def isa_words(flags: set[str]) -> str:
    """The vector extensions among ``flags`` that decide the runtimes' kernels, as printed:
    ``AVX-512, VNNI, BF16, AMX``, ``AVX2, no AVX-512`` or ``no AVX2``."""
    have = [word for flag, word in ISA_FLAGS if flag in flags]
    return ", ".join(have) if have else ("AVX2, no AVX-512" if "avx2" in flags else "no AVX2")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform's best guess) and its vector extensions
    (:func:`isa_words`), e.g. ``AMD EPYC (AVX2, no AVX-512)``: the same model name can stand for
    CPUs with and without AVX-512 BF16 and VNNI, whose INT8 and bf16 speeds differ."""
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), name)
    except OSError:
        pass
    flags = cpu_flags()
    return f"{name} ({isa_words(flags)})" if flags else name


def make_session(path: str, threads: int | None = None, provider: str | None = "cpu", spinning: bool | None = None):
    """An ``InferenceSession`` with all graph optimizations and ``threads`` intra-op threads on
    ``provider`` (see :func:`dsm_export.engines.providers.resolve_providers`).

    Raises:
        DSMError: an unavailable provider or an unloadable file.
    """
    return create_session(path, provider, threads, optimization="all", spinning=spinning)


def _warm_sessions(paths: dict[str, str], batch: int, warmup: int, threads, provider):
    """Sessions for ``paths`` fed one shared random ``[batch, C, H, W]`` input, each run ``warmup`` times."""
    sessions = {k: make_session(p, threads, provider) for k, p in paths.items()}
    shape = [batch] + list(next(iter(sessions.values())).get_inputs()[0].shape[1:])
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    return sessions, feeds


def timing_order(labels: list[str], reference: str | None = None) -> list[str]:
    """The graphs one repetition of :func:`ort_throughput` times, in order: each label once, or with a
    ``reference``, the reference before every other label (the reference alone if it is the only one)."""
    others = [k for k in labels if k != reference]
    return list(labels) if reference is None or not others else [g for k in others for g in (reference, k)]


def _timed_runs(paths: dict[str, str], batch: int, repeats: int, warmup: int, threads, iters: int, provider,
               reference: str | None):
    """Warm the sessions, then yield ``(label, seconds for iters runs)`` in :func:`timing_order`,
    ``repeats`` times over. Raises KeyError for a ``reference`` not among ``paths``."""
    if reference is not None and reference not in paths:
        raise KeyError(f"reference {reference!r} is not one of the graphs")
    sessions, feeds = _warm_sessions(paths, batch, warmup, threads, provider)
    runs = {k: (lambda s=s, feed=feeds[k]: s.run(None, feed)) for k, s in sessions.items()}
    yield from _alternate(runs, timing_order(list(sessions), reference), repeats, iters)


def _alternate(runs: dict, order: list[str], repeats: int, iters: int):
    """Yield ``(label, seconds for iters runs)`` of ``runs[label]()`` in ``order``, ``repeats`` times over."""
    for _ in range(repeats):
        for k in order:
            start = time.perf_counter()
            for _ in range(iters):
                runs[k]()
            yield k, time.perf_counter() - start


def alternating_throughput(runs: dict, batch: int, repeats: int = 5, warmup: int = 1,
                           iters: int = 1, reference: str | None = None, quiet: float | None = None,
                           full_speed: float | None = None, max_repeats: int | None = None,
                           stats: dict | None = None) -> dict[str, float]:
    """Median images/s of engines of any runtime, alternating in each repetition as :func:`ort_throughput`.

    With ``quiet`` (and a ``reference``), only the pairs timed while the machine ran at full speed
    count: a pair (the reference's run and the engine's run right after it) is kept when the
    reference ran at ``quiet`` or more of its full speed, the largest of ``full_speed`` and the
    median of the fastest third of the reference's runs here. On a shared 2-core VM, slow stretches
    ran a merged OpenVINO engine far slower than the unmerged one (figures at
    :data:`dsm_export.search.runtimes.QUIET`), so a ratio taken there, paired or not, is biased low.
    Repetitions go on, up to ``max_repeats`` (default 3 x ``repeats``), until every engine has
    ``repeats`` kept pairs; if then any engine has fewer than half of them (at least 3), every pair
    of every engine counts (``stats["fallback"]``).

    Args:
        runs: label -> a no-argument callable that runs one batch of ``batch`` images (its input
            already bound, so that only inference is timed).
        batch, repeats, warmup, iters, reference: as for :func:`ort_throughput`.
        quiet: the fraction of the reference's full speed a kept pair's reference run reaches
            (e.g. 0.94), or None to keep every pair.
        full_speed: the reference's full speed (images/s) known from earlier runs, if any.
        max_repeats: the most repetitions with ``quiet``.
        stats: a dict to fill with ``full_speed``, ``repetitions``, ``kept`` (label -> pairs
            counted), ``quiet_kept`` (label -> pairs at full speed) and ``fallback``.

    Returns:
        label -> images per second.

    Raises:
        KeyError: ``reference`` is not a label of ``runs``.
        ValueError: ``quiet`` without a ``reference``, or outside (0, 1].
    """
    if reference is not None and reference not in runs:
        raise KeyError(f"reference {reference!r} is not one of the engines")
    if quiet is not None and (reference is None or not 0 < quiet <= 1):
        raise ValueError("quiet needs a reference and a fraction in (0, 1]")
    for _ in range(warmup):
        for run in runs.values():
            run()
    order = timing_order(list(runs), reference)
    pairs: dict[str, list[tuple[float, float]]] = {k: [] for k in runs if k != reference}  # (reference, engine)
    rates: dict[str, list[float]] = {k: [] for k in runs}
    last = None
    limit = repeats if quiet is None else (max_repeats or 3 * repeats)
    done = 0
    kept: dict[str, list[tuple[float, float]]] = {}
    full = None
    while done < limit:
        for k, took in _alternate(runs, order, 1, iters):
            rate = batch * iters / took
            rates[k].append(rate)
            if k == reference:
                last = rate
            elif k in pairs and last is not None:
                pairs[k].append((last, rate))
        done += 1
        if quiet is None or done < repeats:
            continue
        ref = sorted(rates[reference], reverse=True)
        full = max(full_speed or 0.0, statistics.median(ref[:max(1, len(ref) // 3)]))
        kept = {k: [p for p in v if p[0] >= quiet * full] for k, v in pairs.items()}
        if all(len(v) >= repeats for v in kept.values()):
            break
    if quiet is None or not pairs:
        return {k: statistics.median(v) for k, v in rates.items()}
    enough = max(3, (repeats + 1) // 2)
    fallback = not all(len(v) >= min(enough, len(pairs[k])) for k, v in kept.items())
    quiet_kept = {k: len(v) for k, v in kept.items()}
    if fallback:
        kept = pairs
    out = {k: statistics.median(e for _, e in v) for k, v in kept.items()}
    out[reference] = statistics.median(r for v in kept.values() for r, _ in v)
    if stats is not None:
        stats.update(full_speed=full, repetitions=done, kept={k: len(v) for k, v in kept.items()},
                     quiet_kept=quiet_kept, fallback=fallback)
    return {k: out[k] for k in runs}


def ort_throughput(paths: dict[str, str], batch: int = 32, repeats: int = 5, warmup: int = 1,
                   threads: int | None = None, iters: int = 1, provider: str | None = "cpu",
                   reference: str | None = None) -> dict[str, float]:
    """Median images/s of each graph on the same random batch; graphs alternate in each repetition.

    Args:
        paths: label -> ONNX file (same input shape apart from the batch axis).
        batch: images per run.
        repeats: repetitions; the median is reported.
        warmup: untimed runs per graph first.
        threads: ONNX Runtime intra-op threads (default: all cores).
        iters: timed runs per repetition.
        provider: ONNX Runtime execution provider (``cpu``, ``cuda``, ``tensorrt``, ``openvino`` or a
            full name). On a GPU provider the input is copied from the host on every run.
        reference: optional label of ``paths`` (the graph speed-ups are taken against) timed again
            before every other graph in each repetition. Its median then rests on ``repeats x
            (len(paths) - 1)`` runs instead of ``repeats``: with many graphs, the noise of a few
            reference runs would otherwise shift every speed-up of the run together.

    Returns:
        label -> images per second.

    Raises:
        KeyError: ``reference`` is not a label of ``paths``.
    """
    rates: dict[str, list[float]] = {k: [] for k in paths}
    for k, took in _timed_runs(paths, batch, repeats, warmup, threads, iters, provider, reference):
        rates[k].append(batch * iters / took)
    return {k: statistics.median(v) for k, v in rates.items()}


def ort_speedups(paths: dict[str, str], reference: str, batch: int = 32, repeats: int = 5, warmup: int = 1,
                 threads: int | None = None, iters: int = 1, provider: str | None = "cpu") -> dict[str, list[float]]:
    """Paired speed-ups against ``reference``: in each repetition the reference runs right before
    every other graph (:func:`timing_order`), and each pair gives one ratio ``t_reference / t_graph``.

    A ratio of medians (:func:`ort_throughput`) lets a slow stretch of a shared machine that hits
    the reference in some repetitions and a graph in others move the speed-up; a pair is timed
    within about a second, so the load it meets is mostly common to both of its runs. The
    per-repetition ratios also give the spread (e.g. a lower quartile) one figure would hide.

    Args:
        paths: label -> ONNX file, ``reference`` among them.
        reference: the label speed-ups are taken against.
        batch, repeats, warmup, threads, iters, provider: as for :func:`ort_throughput`.

    Returns:
        label (every one but ``reference``) -> ``repeats`` ratios (> 1: faster than the reference),
        in repetition order.

    Raises:
        KeyError: ``reference`` is not a label of ``paths``.
    """
    ratios: dict[str, list[float]] = {k: [] for k in paths if k != reference}
    before = None
    # _timed_runs raises the KeyError for an unknown reference before it times anything
    for k, took in _timed_runs(paths, batch, repeats, warmup, threads, iters, provider, reference):
        if k == reference:
            before = took
        else:
            ratios[k].append(before / took)
    return ratios


def ort_latency(paths: dict[str, str], runs: int = 50, warmup: int = 5, threads: int | None = None,
                percentiles=(50, 90), provider: str | None = "cpu") -> dict[str, dict[str, float]]:
    """Batch-1 latency of each graph: single images, graphs alternating run by run.

    Args:
        paths: label -> ONNX file.
        runs: timed single-image runs per graph (at least 50 for a stable p90).
        warmup: untimed runs per graph first.
        threads: ONNX Runtime intra-op threads (default: all cores).
        percentiles: which percentiles to report.
        provider: ONNX Runtime execution provider (as for :func:`ort_throughput`).

    Returns:
        label -> ``{"p50": ms, "p90": ms, ...}`` (milliseconds).
    """
    sessions, feeds = _warm_sessions(paths, 1, warmup, threads, provider)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(1000 * (time.perf_counter() - start))
    return {k: {f"p{q}": float(np.percentile(v, q)) for q in percentiles} for k, v in times.items()}
