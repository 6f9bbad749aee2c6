#!/usr/bin/env python3
"""Speed across model sizes: ToMe and DSM at 1.5x, 1.7x and 2x fewer FLOPs, fp32 and dynamic INT8.

Everything else in docs/ is measured on DeiT-Tiny. This times, with ONNX Runtime on the CPU, five
larger timm ViTs (DeiT-S, DeiT-B, ViT-B/16 at 384 px, ViT-L/16, DINOv2-B/14 with 4 register tokens
at 518 px) with **random-init weights**: speed and memory do not depend on the weights' values,
accuracy does, and it is measured on DeiT-Tiny only (docs/results.md). Per model:

* the export time and peak RSS of ``dsm-export``'s unmerged export and of each merged export, each
  export in a child process of its own (``export_model`` timed inside it; peak RSS is the child's
  ``ru_maxrss``: Python, PyTorch, the model and the export together, measured through
  research/child_rss.py so that this process's own peak does not leak into it);
* exact ToMe (``mode=tome``, the constant r whose FLOP ratio is nearest ``--tome-target``, 1.7x) and
  a DSM schedule at each of ``--targets`` (1.5x, 1.7x, 2x fewer FLOPs): the form of ``--base``
  (its delay, local stage, windows and merge variants) with r falling linearly to r_end at the
  base's r_end/r fraction (halved, then 0, where the tokens run out before the target), the r
  just below the target, then topped up to it by
  :func:`dsm_export.search.schedule_search.reach_target` (which, from the base itself, gets stuck
  short of 1.7x on DeiT-S: raising r block by block runs the later blocks out of tokens);
  ``--fallback-base`` where ``--base``'s windows do not divide the patch grid;
* each schedule's FLOP ratio (:func:`dsm_export.check.evaluate.flops_ratio`, against timm's model)
  and its speed-up in fp32 and as the project's dynamic-INT8 build of the same file (``dsm-export
  build --quantization dynamic``), both against timm's unmerged fp32 model (every block on every
  token) in one alternating run (:func:`dsm_export.search.timing.ort_speedups`: the baseline runs
  right before every engine; median of the paired ratios), at ``--batch`` (8), with INT8 alone (the
  unmerged export in dynamic INT8) in the same run; the speed/FLOP quotient (fp32 speed-up over
  FLOP ratio);
* batch-1 latency (:func:`dsm_export.search.timing.ort_latency`) of the unmerged model, INT8
  alone, and the DSM 1.7x engine in fp32 and INT8.

Time: ``--budget-minutes`` per model for its timing (default 10; the exports and INT8 builds come
on top, each timed and reported). After the exports, one
warm run of every engine estimates a repetition; repeats (then latency runs) are cut to fit the
budget, never below 3 repeats and 10 latency runs (a model that needs more still gets those, and
the overrun is printed): models are never dropped. The repeats used are recorded per model. The
ONNX files of one model at a time live in a temporary folder (``--work-dir``, default the system's),
removed after each model: ViT-L takes about 12 GB there. Writes scale.json, scale.md (its table
inside a ``figures:scale`` block; a page's text outside the block is kept) and scale.png
(speed/FLOP quotient against unmerged GFLOPs, one line per schedule) to ``--output``, after every
model. ``--dry-run`` prints the schedules, FLOP ratios and token counts without exporting
anything; ``--render`` redraws scale.md and scale.png from the scale.json of ``--output``;
``--remeasure-exports`` times nothing and exports again the two models per row whose export time and
peak RSS the table shows (for a scale.json written before research/child_rss.py measured peak RSS
free of this process's own). The whole run with ``--budget-minutes 4``: 71 minutes on 2 quiet
cores (2026-12-05; ViT-L 26 of them, 21 for its six exports and INT8 builds; DINOv2 20, 14 of them
timing at the 3-repeat floor).

    python research/scale.py --output docs

Never time while another CPU job runs: the figures are ratios from one run, but a busy machine
still bends them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

MODELS = ("deit_small_patch16_224", "deit_base_patch16_224", "vit_base_patch16_384", "vit_large_patch16_224",
          "vit_base_patch14_reg4_dinov2")  # the last: timm's default image size is 518 px (37x37 patches)
BASE = "r=16,r_end=8,delay=3,protect=16,merge=mlerp"
TARGETS = (1.5, 1.7, 2.0)
TOME_TARGET = 1.7
LATENCY_TARGET = 1.7  # the DSM schedule timed at batch 1 too
MIN_REPEATS, MIN_LATENCY_RUNS = 3, 10
NOTE = "random-init weights: speed only; accuracy is measured on DeiT-Tiny only"
BLOCK = re.compile(r"(<!-- figures:scale -->\n)(.*?)(<!-- /figures:scale -->)", re.S)

INTRO = """# Speed across model sizes

Everything else in these pages is measured on DeiT-Tiny. `research/scale.py` times five larger
timm ViTs with ONNX Runtime on the CPU: export time and peak memory, and, for exact ToMe and DSM
schedules at 1.5x, 1.7x and 2x fewer FLOPs, the measured speed-up in fp32 and in dynamic INT8
against timm's unmerged fp32 model, timed in one alternating run per model, plus batch-1 latency.
The speed/FLOP quotient (fp32 speed-up over FLOP ratio) says how much of a FLOP cut turns into
speed as the model grows (DeiT-Tiny at batch 32: 0.93-0.95, the `merge-overhead` table of
[merge-variants.md](merge-variants.md)).

How: random-init timm models (`pretrained=False`); each engine exported in a child process of its
own (its export time and peak RSS); the INT8 engines the project's dynamic INT8 of the same files
(as `dsm-export build FILE --backend onnxruntime --precision int8 --quantization dynamic --output OUT`
writes them); ONNX Runtime with 2 intra-op threads at batch 8, every engine timed right after timm's
unmerged fp32 model in one alternating run per model (median of the paired ratios); exact ToMe at
the constant r nearest 1.7x fewer FLOPs; DSM at 1.5x, 1.7x and 2x in the form of the base
`r=16,r_end=8,delay=3,protect=16,merge=mlerp`, r re-chosen per model and target and topped up by
`reach_target`.

Caveats: the weights are random (speed and memory do not depend on their values; accuracy does,
and is measured on DeiT-Tiny only); one machine, and few repeats on the larger models (the table
says how many: at least 3, cut to fit a timing budget per model); the schedules are chosen by FLOPs
alone, not tuned for accuracy; DINOv2's 37x37 grid at 518 px takes no 2x2 windows, so a base with
a local stage falls back to the global one there.

```bash
python research/scale.py --output docs
```

![speed/FLOP quotient against model size](scale.png)
"""


# ------------------------------------------------------------------ schedules
def model_facts(model) -> dict:
    """Parameters, patch grid, prefix and input tokens, depth and timm's unmerged GFLOPs of a timm ViT."""
    from dsm_export.core.flops import schedule_flops
    from dsm_export.core.patch import input_size
    from dsm_export.core.schedule import Schedule

    grid = [int(g) for g in model.patch_embed.grid_size]
    prefix = int(model.num_prefix_tokens)
    _, base, _ = schedule_flops(model, Schedule(), "full")
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "image_size": list(input_size(model)[1:]),
            "grid": grid, "prefix_tokens": prefix, "tokens": grid[0] * grid[1] + prefix,
            "depth": len(model.blocks), "gflops": base / 1e9}


def _fits(model, schedule) -> str | None:
    """None if the form of ``schedule`` (r=1) fits ``model``'s grid and depth, else the reason."""
    from dsm_export.check.evaluate import flops_ratio
    from dsm_export.errors import ScheduleError

    if schedule.blocks is not None:
        probe = schedule
    else:
        probe = dataclasses.replace(schedule, r=1, r_end=None if schedule.r_end is None else 1)
    try:
        flops_ratio(model, probe)
    except ScheduleError as exc:
        return str(exc)
    return None


def dsm_at(model, base, target: float):
    """The DSM schedule of ``base``'s form at ``target``-fold fewer FLOPs, and how it was found.

    r falls linearly to ``r_end = round(f * r)`` with ``f`` the base's r_end/r (constant r if the base has
    no r_end); the largest r below the target, then :func:`reach_target` raises r block by block to
    it. Where the tokens run out before the target (a later block asked for more than half of its
    mergeable tokens), ``f`` is halved, then 0. Where ``reach_target`` gets stuck, the smallest r at
    or above the target. An explicit block list goes to ``reach_target`` as it is.

    Raises:
        ScheduleError: no r of any tried fraction reaches the target.
    """
    from dsm_export.check.evaluate import flops_ratio
    from dsm_export.errors import ScheduleError
    from dsm_export.search.schedule_search import reach_target

    if base.blocks is not None:
        return reach_target(model, base, target), "reach_target from the base's block list"
    f0 = None if base.r_end is None or not base.r else base.r_end / base.r
    fractions = [f0] if f0 is None else list(dict.fromkeys([f0, f0 / 2, 0.0]))
    for f in fractions:
        previous = None
        for r in range(1, 4 * max(model.patch_embed.grid_size) ** 2):
            s = dataclasses.replace(base, r=r, r_end=None if f is None else round(f * r))
            try:
                ratio = flops_ratio(model, s)
            except ScheduleError:
                break  # a larger r runs out of tokens too
            if ratio < target:
                previous = s
                continue
            shape = "constant r" if f is None else f"r_end/r {f:g}"
            if previous is not None:
                try:
                    return (reach_target(model, previous, target),
                            f"{previous.spec()} ({shape}), raised to the target by reach_target")
                except ScheduleError:
                    pass
            return s, f"{shape}, smallest r at or above the target"
    raise ScheduleError(f"{base.spec()}: no r reaches {target:g}x fewer FLOPs on this model")


def tome_near(model, target: float, mode: str = "tome"):
    """The constant-r schedule (``mode=tome``, or ``mode`` given) whose FLOP ratio is nearest ``target``."""
    from dsm_export.check.evaluate import flops_ratio
    from dsm_export.core.schedule import Schedule
    from dsm_export.errors import ScheduleError

    best = None
    for r in range(1, 4 * max(model.patch_embed.grid_size) ** 2):
        s = Schedule(r=r, mode=mode)
        try:
            ratio = flops_ratio(model, s)
        except ScheduleError:
            break
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (s, ratio)
        if ratio > target:
            break
    return best[0]


def plan_model(name: str, args) -> tuple[object, dict]:
    """The random-init model and its plan: facts, the base used, and every schedule (label, spec,
    FLOP ratio, tokens into the last block)."""
    from dsm_export.check.evaluate import flops_ratio
    from dsm_export.core.flops import schedule_flops
    from dsm_export.core.models import create_model
    from dsm_export.core.schedule import Schedule

    model = create_model(name, None, warn_random=False)
    plan = {"model": name, **model_facts(model), "base": args.base, "base_note": None}
    base = Schedule.parse(args.base)
    why = _fits(model, base)
    if why:
        plan["base"], plan["base_note"] = args.fallback_base, f"--base does not fit ({why}): --fallback-base"
        base = Schedule.parse(args.fallback_base)
    schedules = []
    if getattr(model, "num_reg_tokens", 0):
        # mode=tome reproduces ToMe's code, which knows no register tokens (core/patch.py refuses
        # it): ToMe's constant r in the default mode, where the prefix tokens stay out of the matching
        tome = tome_near(model, args.tome_target, mode="dsm")
        how = (f"constant r nearest {args.tome_target:g}x fewer FLOPs in the default mode "
               "(mode=tome knows no register tokens)")
    else:
        tome = tome_near(model, args.tome_target)
        how = f"mode=tome, constant r nearest {args.tome_target:g}x fewer FLOPs"
    schedules.append({"label": "ToMe", "kind": "tome", "schedule": tome, "how": how})
    for target in args.targets:
        s, how = dsm_at(model, base, target)
        schedules.append({"label": f"DSM {target:g}x", "kind": "dsm", "target": target, "schedule": s, "how": how})
    for row in schedules:
        s = row.pop("schedule")
        _, _, blocks = schedule_flops(model, s)
        row.update(spec=s.spec(), flops_ratio=flops_ratio(model, s), last_block_tokens=blocks[-1].tokens_in,
                   r_per_block=[b.tokens_in - b.tokens_out for b in blocks[:-1]])
    plan["schedules"] = schedules
    plan["disk_gb"] = disk_needed(plan)
    return model, plan


def disk_needed(plan: dict) -> float:
    """About how many GB one model's files take at the most: two unmerged fp32 exports and one per
    schedule, a dynamic-INT8 copy of each but timm's baseline (about a third of fp32: INT8 weights,
    fp32 first block), and one fp32 working copy of the quantizer."""
    fp32 = 4 * plan["params_m"] * 1e6 / 1e9
    n = len(plan["schedules"])
    return 1.1 * fp32 * ((2 + n) + (1 + n) / 3 + 1)


def print_plan(plan: dict) -> None:
    print(f"{plan['model']}: {plan['params_m']:.1f} M params, {plan['image_size'][0]} px, "
          f"grid {plan['grid'][0]}x{plan['grid'][1]} + {plan['prefix_tokens']} prefix = {plan['tokens']} tokens, "
          f"{plan['depth']} blocks, {plan['gflops']:.2f} GFLOPs unmerged (timm), ~{plan['disk_gb']:.1f} GB of files")
    if plan["base_note"]:
        print(f"  base: {plan['base']} ({plan['base_note']})")
    else:
        print(f"  base: {plan['base']}")
    for row in plan["schedules"]:
        print(f"  {row['label']:<9} {row['flops_ratio']:.3f}x fewer FLOPs, {row['last_block_tokens']} tokens into "
              f"the last block; r per block {','.join(map(str, row['r_per_block']))}")
        print(f"            {row['spec']}")
        print(f"            ({row['how']})")


# ------------------------------------------------------------------ exports in a child
def _export_child(payload: str) -> int:
    """The child of :func:`export_in_child`: build the random-init model, export it, print a JSON line."""
    spec = json.loads(payload)
    import torch

    torch.set_num_threads(spec["threads"])
    from dsm_export.core.models import create_model
    from dsm_export.graph.export import export_model

    start = time.perf_counter()
    model = create_model(spec["model"], None, warn_random=False)
    created = time.perf_counter()
    export_model(model, spec["model"], spec["path"], spec["schedule"], full_last_block=spec["full_last_block"])
    done = time.perf_counter()
    print("SCALE-EXPORT " + json.dumps({"create_s": created - start, "export_s": done - created}), flush=True)
    return 0


def export_in_child(name: str, path: str, spec: str, threads: int, full_last_block: bool = False) -> dict:
    """Export ``name`` (random init) under ``spec`` to ``path`` in a child process.

    Returns:
        ``{"export_s", "create_s", "child_s", "peak_rss_mib", "file_mb"}``: the ``export_model`` call,
        the model's creation, the child's whole wall time, its peak RSS, and the file's size.

    Raises:
        RuntimeError: the child failed (with the end of its output).
    """
    from child_rss import run_measured

    payload = json.dumps({"model": name, "path": path, "schedule": spec, "threads": threads,
                          "full_last_block": full_last_block})
    run = run_measured([sys.executable, os.path.abspath(__file__), "--export-child", payload],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = run["output"]
    lines = [line for line in out.splitlines() if line.startswith("SCALE-EXPORT ")]
    if run["returncode"] != 0 or not lines or run["peak_rss_bytes"] is None:
        raise RuntimeError(f"export of {name} ({spec}) exited {run['returncode']}:\n{out[-3000:]}")
    info = json.loads(lines[-1][len("SCALE-EXPORT "):])
    return {**info, "child_s": run["seconds"], "peak_rss_mib": run["peak_rss_bytes"] / 2**20,
            "file_mb": os.path.getsize(path) / 1e6}


# ------------------------------------------------------------------ timing
def estimate(paths: dict[str, str], latency: list[str], batch: int, threads: int) -> dict:
    """One warm run of every engine at ``batch`` (and at batch 1 for ``latency``): seconds per run,
    and the seconds it took to create the sessions (the timing runs create them again)."""
    import numpy as np

    from dsm_export.search.timing import make_session

    start = time.perf_counter()
    sessions = {k: make_session(p, threads) for k, p in paths.items()}
    created = time.perf_counter() - start
    shape = list(next(iter(sessions.values())).get_inputs()[0].shape[1:])
    rng = np.random.default_rng(0)
    x, x1 = rng.standard_normal([batch] + shape, dtype=np.float32), rng.standard_normal([1] + shape, dtype=np.float32)
    run_s, run1_s = {}, {}
    for k, s in sessions.items():
        feed = {s.get_inputs()[0].name: x}
        s.run(None, feed)  # warm
        t = time.perf_counter()
        s.run(None, feed)
        run_s[k] = time.perf_counter() - t
        if k in latency:
            feed1 = {s.get_inputs()[0].name: x1}
            s.run(None, feed1)
            t = time.perf_counter()
            s.run(None, feed1)
            run1_s[k] = time.perf_counter() - t
    del sessions
    gc.collect()
    return {"sessions_s": created, "run_s": run_s, "run1_s": run1_s, "took_s": time.perf_counter() - start}


def fit_budget(est: dict, left_s: float, repeats: int, latency_runs: int, reference: str, n_latency: int) -> dict:
    """Repeats and latency runs that fit ``left_s`` seconds: repeats cut first (to at least
    ``min(3, repeats)``), then latency runs (to at least ``min(10, latency_runs)``).

    Returns:
        ``{"repeats", "latency_runs", "planned_s", "cut": [messages], "over_s"}``.
    """
    run = est["run_s"]
    per_repeat = sum(run[reference] + t for k, t in run.items() if k != reference)
    per_latency = sum(est["run1_s"].values())
    # fixed costs of the timing calls: the sessions again (all for the speed-ups, n_latency of them for
    # latency) and their warm-up runs (1 for ort_speedups, 2 for ort_latency)
    fixed = est["sessions_s"] * (1 + n_latency / max(len(run), 1)) + sum(run.values()) + 2 * per_latency
    room = left_s - fixed
    n, runs, cut = repeats, latency_runs, []
    if n * per_repeat + runs * per_latency > room:
        n = max(min(MIN_REPEATS, repeats), min(repeats, int((room - runs * per_latency) // per_repeat)))
        if n < repeats:
            cut.append(f"repeats cut from {repeats} to {n}")
    if n * per_repeat + runs * per_latency > room:
        runs = max(min(MIN_LATENCY_RUNS, latency_runs),
                   min(latency_runs, int((room - n * per_repeat) // max(per_latency, 1e-9))))
        if runs < latency_runs:
            cut.append(f"latency runs cut from {latency_runs} to {runs}")
    planned = fixed + n * per_repeat + runs * per_latency
    return {"repeats": n, "latency_runs": runs, "planned_s": planned, "per_repeat_s": per_repeat,
            "cut": cut, "over_s": max(0.0, planned - left_s)}


def measure_model(name: str, plan: dict, args) -> dict:
    """Export, quantize and time one model (see the module doc); its files are removed at the end."""
    import statistics

    from dsm_export.api import QuantizeOptions, quantize
    from dsm_export.search.timing import ort_latency, ort_speedups

    t0 = time.monotonic()
    budget = 60 * args.budget_minutes
    root = args.work_dir or tempfile.gettempdir()
    free_gb = shutil.disk_usage(root).free / 1e9
    if free_gb < plan["disk_gb"]:
        raise RuntimeError(f"{root} has {free_gb:.1f} GB free, {name} needs about {plan['disk_gb']:.1f} GB "
                           "(--work-dir elsewhere)")
    result = {**plan, "exports": {}, "int8_build_s": {}}
    work = tempfile.mkdtemp(prefix="dsm-scale-", dir=root)
    try:
        paths = {}

        def export(key, spec, full_last_block=False):
            paths[key] = os.path.join(work, f"{key}.onnx")
            info = export_in_child(name, paths[key], spec, args.threads, full_last_block)
            result["exports"][key] = {"spec": spec, **info}
            _log(f"{name}: exported {key} in {info['export_s']:.1f} s (peak RSS {info['peak_rss_mib']:.0f} MiB, "
                 f"{info['file_mb']:.0f} MB)")

        def int8(key):
            paths[key + "_int8"] = os.path.join(work, f"{key}_int8.onnx")
            start = time.perf_counter()
            quantize(paths[key], paths[key + "_int8"], None, QuantizeOptions(mode="dynamic"))
            result["int8_build_s"][key] = time.perf_counter() - start

        export("baseline", "none", full_last_block=True)  # timm's model: every block on every token
        export("none", "none")  # dsm-export's unmerged export: the last block for the prefix tokens alone
        int8("none")
        keys = []
        for i, row in enumerate(plan["schedules"]):
            key = f"s{i}"
            keys.append(key)
            export(key, row["spec"])
            int8(key)
        del paths["none"]  # INT8 alone is timed, not the fp32 `none` export (timm's model less most of a block)
        lat_key = next(k for k, row in zip(keys, plan["schedules"]) if row.get("target") == LATENCY_TARGET) \
            if any(row.get("target") == LATENCY_TARGET for row in plan["schedules"]) else keys[-1]
        latency_keys = ["baseline", "none_int8", lat_key, lat_key + "_int8"]
        result["prepare_s"] = time.monotonic() - t0
        _log(f"{name}: {len(result['exports'])} exports and {len(result['int8_build_s'])} INT8 builds took "
             f"{result['prepare_s'] / 60:.1f} min; estimating a repetition")
        timing_start = time.monotonic()
        est = estimate(paths, latency_keys, args.batch, args.threads)
        left = budget - est["took_s"]  # the budget is the timing's: the estimate is its first part
        fit = fit_budget(est, left, args.repeats, args.latency_runs, "baseline", len(latency_keys))
        result.update(estimate=est, budget=fit, repeats=fit["repeats"], latency_runs=fit["latency_runs"],
                      baseline_images_per_s=args.batch / est["run_s"]["baseline"])
        _log(f"{name}: one repetition ~{fit['per_repeat_s']:.0f} s; {fit['repeats']} repeats, "
             f"{fit['latency_runs']} latency runs, ~{fit['planned_s'] / 60:.1f} min of timing "
             f"({left / 60:.1f} min of the budget left after the estimate)")
        for message in fit["cut"]:
            print(f"scale: {name}: {message} to fit --budget-minutes {args.budget_minutes:g}", flush=True)
        if fit["over_s"] > 0:
            print(f"scale: {name}: the least timing ({fit['repeats']} repeats, {fit['latency_runs']} latency runs) "
                  f"overruns --budget-minutes {args.budget_minutes:g} by ~{fit['over_s'] / 60:.1f} min", flush=True)
        pairs = ort_speedups(paths, "baseline", batch=args.batch, repeats=fit["repeats"], warmup=1,
                             threads=args.threads)
        lat = ort_latency({k: paths[k] for k in latency_keys}, runs=fit["latency_runs"], warmup=2,
                          threads=args.threads)
        result["timing_s"] = time.monotonic() - timing_start
        result["int8_alone"] = {"speedup": statistics.median(pairs["none_int8"]), "ratios": pairs["none_int8"]}
        for key, row in zip(keys, result["schedules"]):
            row["export"] = result["exports"][key]
            row["fp32_ratios"], row["int8_ratios"] = pairs[key], pairs[key + "_int8"]
            row["fp32_speedup"] = statistics.median(pairs[key])
            row["int8_speedup"] = statistics.median(pairs[key + "_int8"])
            row["quotient"] = row["fp32_speedup"] / row["flops_ratio"]
            row["int8_over_int8_alone"] = row["int8_speedup"] / result["int8_alone"]["speedup"]
        label = next(row["label"] for key, row in zip(keys, result["schedules"]) if key == lat_key)
        result["latency"] = {"engines": {"baseline": "unmerged fp32", "none_int8": "INT8 alone",
                                         lat_key: f"{label} fp32", lat_key + "_int8": f"{label} INT8"},
                             "ms": lat}
        result["merged_export"] = {"label": label, **result["exports"][lat_key]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["took_s"] = time.monotonic() - t0
    _log(f"{name}: done in {result['took_s'] / 60:.1f} min")
    return result


def remeasure_exports(data: dict, args, command: str) -> None:
    """Export again, in a child each, the two exports the table shows of every measured model in
    ``data``: the unmerged export and the merged one of the latency row (DSM 1.7x). Their export
    time and peak RSS replace the first run's (kept under ``first_run``); the other exports' peak RSS
    is dropped (``peak_rss_note`` says why): runs before research/child_rss.py read the parent's
    peak into every child's. Nothing is timed; ``data`` is changed in place."""
    root = args.work_dir or tempfile.gettempdir()
    stamp = {"command": command, "date": datetime.date.today().isoformat()}
    for m in data["models"]:
        if "merged_export" not in m:
            continue
        label = m["merged_export"]["label"]
        row = next(r for r in m["schedules"] if r["label"] == label)
        work = tempfile.mkdtemp(prefix="dsm-scale-", dir=root)
        try:
            none = export_in_child(m["model"], os.path.join(work, "none.onnx"), "none", data["threads"])
            _log(f"{m['model']}: unmerged export {none['export_s']:.1f} s, peak RSS {none['peak_rss_mib']:.0f} MiB")
            merged = export_in_child(m["model"], os.path.join(work, "merged.onnx"), row["spec"], data["threads"])
            _log(f"{m['model']}: {label} export {merged['export_s']:.1f} s, peak RSS {merged['peak_rss_mib']:.0f} MiB")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        first_none, first_merged = m["exports"]["none"], m["merged_export"]
        for key, e in m["exports"].items():
            if key != "none" and e.get("peak_rss_mib") is not None:
                e["peak_rss_first_run_mib"], e["peak_rss_mib"] = e["peak_rss_mib"], None
                e["peak_rss_note"] = "not re-measured; the first run's figure included the parent's peak"
        m["exports"]["none"] = {"spec": "none", **none, "first_run": first_none}
        m["merged_export"] = {"label": label, "spec": row["spec"], **merged,
                              "first_run": {k: v for k, v in first_merged.items() if k != "label"}}
        row["export"] = {k: v for k, v in m["merged_export"].items() if k != "label"}
        m["exports_remeasured"] = stamp


def _log(message: str) -> None:
    print(f"  [{datetime.datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ writing
def header(data: dict) -> str:
    repeats = ", ".join(f"{short(m['model'])} {m['repeats']}" for m in data["models"] if "repeats" in m)
    return (f"{data['machine']}, {data['threads']} intra-op threads, onnxruntime {data['onnxruntime']} "
            f"CPUExecutionProvider, batch {data['batch']}, {dates(data)}; repeats (median of paired speed-ups): "
            f"{repeats or '-'} (asked {data['repeats_asked']}, timing budget {data['budget_minutes']:g} min a model); "
            f"{NOTE}.")


def dates(data: dict) -> str:
    out: list[str] = []
    for m in data["models"]:
        if m.get("date", data["date"]) not in out:
            out.append(m.get("date", data["date"]))
    return ", ".join(out) or data["date"]


def short(name: str) -> str:
    return {"deit_small_patch16_224": "DeiT-S", "deit_base_patch16_224": "DeiT-B",
            "vit_base_patch16_384": "ViT-B/16-384", "vit_large_patch16_224": "ViT-L/16",
            "vit_base_patch14_reg4_dinov2": "DINOv2-B/14-reg4-518"}.get(name.split(".")[0], name)


def commands(data: dict) -> list[str]:
    """The commands that measured ``data``'s models, in order (one, or several after ``--append``)."""
    out: list[str] = []
    for m in data["models"]:
        cmd = m.get("command", data["command"])
        if cmd not in out:
            out.append(cmd)
    return out or [data["command"]]


def table(data: dict) -> str:
    again = list(dict.fromkeys(m["exports_remeasured"]["command"] for m in data["models"] if "exports_remeasured" in m))
    lines = ["Generated by " + ", then ".join(f"`{c}`" for c in commands(data))
             + "".join(f", then `{c}` (the two export columns)" for c in again), f"({header(data)})", "",
             "| model | params (M) | tokens | GFLOPs | unmerged img/s (one run) | unmerged export: s, peak RSS | "
             "merged export (DSM 1.7x): s, peak RSS | repeats | INT8 alone | batch-1 p50: unmerged, INT8 alone, "
             "DSM 1.7x, DSM 1.7x INT8 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    done = [m for m in data["models"] if "schedules" in m and "repeats" in m]
    for m in done:
        e, x = m["exports"]["none"], m["merged_export"]
        ms = [m["latency"]["ms"][k]["p50"] for k in m["latency"]["engines"]]
        lines.append(f"| {m['model']} | {m['params_m']:.1f} | {m['tokens']} | {m['gflops']:.1f} | "
                     f"{m['baseline_images_per_s']:.2f} | {e['export_s']:.0f} s, {e['peak_rss_mib']:.0f} MiB | "
                     f"{x['export_s']:.0f} s, {x['peak_rss_mib']:.0f} MiB | {m['repeats']} | "
                     f"{m['int8_alone']['speedup']:.2f}x | {' / '.join(f'{v:.0f}' for v in ms)} ms |")
    lines += ["", "| model | schedule | FLOP ratio | fp32 speed-up | INT8 speed-up | INT8: over INT8 alone | "
                  "speed/FLOP quotient (fp32) |", "|---|---|---|---|---|---|---|"]
    for m in done:
        for row in m["schedules"]:
            lines.append(f"| {short(m['model'])} | {row['label']} | {row['flops_ratio']:.2f}x | "
                         f"{row['fp32_speedup']:.2f}x | {row['int8_speedup']:.2f}x | "
                         f"{row['int8_over_int8_alone']:.2f}x | {row['quotient']:.2f} |")
    lines += ["", "Speed-ups: median of the paired ratios against timm's unmerged fp32 model (every block on every "
                  "token; timed right before each engine). INT8: the project's dynamic INT8 (`build --quantization "
                  "dynamic`) of the same file; INT8 alone: of the unmerged export. Export: the "
                  "`export_model` call, in a child process whose peak RSS is given. Schedules:", ""]
    for m in done:
        base = f"base `{m['base']}`" + (f" ({m['base_note']})" if m["base_note"] else "")
        lines.append(f"- {m['model']} ({base}):")
        for row in m["schedules"]:
            lines.append(f"  {row['label']} `{row['spec']}` ({row['how']})")
    failed = [m for m in data["models"] if "error" in m]
    if failed:
        lines += ["", "Not measured: " + "; ".join(f"{m['model']}: {m['error'].splitlines()[0]}" for m in failed)]
    return "\n".join(lines)


def write_outputs(data: dict, output: str, plot: bool = True) -> str:
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "scale.json"), "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    body = table(data)
    path = os.path.join(output, "scale.md")
    text = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    if text and BLOCK.search(text):  # keep the page around the block
        text = BLOCK.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text, count=1)
    else:
        text = INTRO + "\n<!-- figures:scale -->\n" + body + "\n<!-- /figures:scale -->\n"
    from dsm_export.fileio import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    if plot:
        _plot(data, os.path.join(output, "scale.png"))
    return body


def _plot(data: dict, path: str) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted((m for m in data["models"] if "repeats" in m), key=lambda m: m["gflops"])
    if not done:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    labels = list(dict.fromkeys(row["label"] for m in done for row in m["schedules"]))
    for label in labels:
        pts = [(m["gflops"], row["quotient"]) for m in done for row in m["schedules"] if row["label"] == label]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if label != "ToMe" else "s",
                linestyle="--" if label == "ToMe" else "-", label=label)
    lift = 6
    for i, m in enumerate(done):  # a label next to a close neighbour's (ViT-B/16-384, ViT-L/16) goes higher
        lift = lift + 10 if i and m["gflops"] < 1.3 * done[i - 1]["gflops"] else 6
        ax.annotate(short(m["model"]), (m["gflops"], max(row["quotient"] for row in m["schedules"])),
                    textcoords="offset points", xytext=(0, lift), ha="center", fontsize=7)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("unmerged GFLOPs per image (timm; log scale)")
    ax.set_ylabel("speed/FLOP quotient: fp32 speed-up / FLOP ratio")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("How much of a FLOP cut becomes speed, by model size (ONNX Runtime CPU)", fontsize=11)
    fig.text(0.01, 0.01, textwrap.fill(header(data), 190), fontsize=6)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="timm model names (default: the five)")
    parser.add_argument("--base", default=BASE, help=f"DSM base schedule: its form, and r_end/r (default {BASE})")
    parser.add_argument("--fallback-base", default=BASE,
                        help="DSM base where --base does not fit the model (its windows do not divide the grid)")
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS), help="DSM FLOP ratios")
    parser.add_argument("--tome-target", type=float, default=TOME_TARGET,
                        help="ToMe's constant r is the one whose FLOP ratio is nearest this")
    parser.add_argument("--repeats", type=int, default=9, help="timed repetitions (cut to fit the budget, "
                        f"not below {MIN_REPEATS})")
    parser.add_argument("--latency-runs", type=int, default=30, help="batch-1 runs per engine (cut after repeats)")
    parser.add_argument("--budget-minutes", type=float, default=10.0,
                        help="timing time per model (exports and INT8 builds not counted; default 10)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2,
                        help="ONNX Runtime intra-op threads (and PyTorch's while exporting)")
    parser.add_argument("--output", default="scale", help="folder for scale.json, .md, .png")
    parser.add_argument("--work-dir", help="where the temporary ONNX files go (default: the system's temp folder)")
    parser.add_argument("--append", action="store_true",
                        help="keep the other models of --output's scale.json (same batch and threads); the "
                             "models measured now replace theirs")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the schedules, FLOP ratios and token counts; export and time nothing")
    parser.add_argument("--remeasure-exports", action="store_true",
                        help="time nothing: export again the unmerged and the DSM 1.7x model of every model in "
                             "--output's scale.json, for their export time and peak RSS, and rewrite the page")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite scale.md and scale.png from the scale.json in --output")
    return parser


def _previous(args, data: dict) -> dict | int:
    """``--append``: the scale.json of ``--output``, its models stamped with their command and date;
    2 (after one line) when there is none or it was measured at another batch or thread count."""
    path = os.path.join(args.output, "scale.json")
    if not os.path.isfile(path):
        print(f"scale: --append: no {path} to add to", file=sys.stderr)
        return 2
    with open(path, encoding="utf-8") as fh:
        old = json.load(fh)
    for key in ("batch", "threads"):
        if old[key] != data[key]:
            print(f"scale: --append: {path} was measured with {key} {old[key]}, this run uses {data[key]}",
                  file=sys.stderr)
            return 2
    for m in old["models"]:
        m.setdefault("command", old["command"])
        m.setdefault("date", old["date"])
    return old


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--export-child"]:
        return _export_child(argv[1])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.latency_runs < 1 or args.batch < 1 or args.threads < 1:
        parser.error("--repeats, --latency-runs, --batch and --threads must be at least 1")
    if args.render or args.remeasure_exports:
        path = os.path.join(args.output, "scale.json")
        if not os.path.isfile(path):
            flag = "--render" if args.render else "--remeasure-exports"
            print(f"scale: no {path} for {flag} (run without it first)", file=sys.stderr)
            return 2
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if args.remeasure_exports:
            try:
                remeasure_exports(data, args, "python research/scale.py " + " ".join(shlex.quote(a) for a in argv))
            except (RuntimeError, OSError) as exc:
                print(f"scale: --remeasure-exports failed, nothing written: {exc}", file=sys.stderr)
                return 1
        print(write_outputs(data, args.output, not args.no_plot))
        return 0

    from dsm_export.errors import DSMError

    old = None
    if args.append and not args.dry_run:  # before any work: a user mistake is one line and exit 2
        old = _previous(args, {"batch": args.batch, "threads": args.threads})
        if isinstance(old, int):
            return old
    if not args.dry_run:
        os.makedirs(args.output, exist_ok=True)
    plans = []
    for name in args.models:  # every schedule first: a bad name or base stops here, before any export
        try:
            model, plan = plan_model(name, args)
        except DSMError as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 2
        del model
        gc.collect()
        plans.append(plan)
        if args.dry_run:
            print_plan(plan)
    if args.dry_run:
        return 0

    import onnxruntime as ort

    from dsm_export.search.timing import cpu_name

    root = args.work_dir or tempfile.gettempdir()
    _log(f"temporary files in {root} ({shutil.disk_usage(root).free / 1e9:.0f} GB free); "
         f"the largest model needs ~{max(p['disk_gb'] for p in plans):.0f} GB")
    data = {"command": "python research/scale.py " + " ".join(shlex.quote(a) for a in argv),
            "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs", "threads": args.threads,
            "onnxruntime": ort.__version__, "batch": args.batch, "date": datetime.date.today().isoformat(),
            "repeats_asked": args.repeats, "budget_minutes": args.budget_minutes, "note": NOTE, "models": []}
    if old is not None:
        data["models"] = [m for m in old["models"] if m["model"] not in args.models]
    failed = 0
    for plan in plans:
        _log(f"{plan['model']}: starting ({plan['gflops']:.1f} GFLOPs)")
        stamp = {"command": data["command"], "date": data["date"]}
        try:
            data["models"].append({**measure_model(plan["model"], plan, args), **stamp})
        except (DSMError, RuntimeError, OSError) as exc:
            failed += 1
            print(f"scale: {plan['model']} failed: {exc}", file=sys.stderr)
            data["models"].append({**plan, "error": str(exc), **stamp})
        order = {name: i for i, name in enumerate(MODELS)}
        data["models"].sort(key=lambda m: order.get(m["model"], len(order)))
        body = write_outputs(data, args.output, not args.no_plot)  # after every model: a stopped run keeps its rows
    print(body)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
