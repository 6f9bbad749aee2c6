"""The tune pipeline as one call: :func:`tune` searches the schedule (and, at a speed-up target,
the precision) with the least KL to the unmerged model, scores the choice on photos the search
never saw, and optionally writes the engine (``dsm-export tune`` is argument parsing and printing
over it).

Two searches, by target:

* ``target_flops_ratio``: the PyTorch schedule search of :mod:`.schedule_search` (FLOPs counted,
  not timed), then with ``export`` the speed check of :mod:`.speed_check` and the chosen schedule
  exported (and quantized);
* ``target_speedup``: schedule x precision, every engine built and timed in the runtime of
  ``backend`` (:mod:`.engine_search`, :mod:`.engine_runtimes`).

Calibration images are the first ``calibration_count`` of ``images`` (:func:`.data.split_calibration`);
all the rest (or ``holdout`` of them) are held apart and judge the choice.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable

from ..errors import DSMError
from ..core.schedule import Schedule

OPENVINO_PRECISIONS = ("fp32", "bf16", "int8", "auto")
ONNXRUNTIME_PRECISIONS = ("fp32", "int8", "int8-dynamic", "int8-dynamic-all", "auto")


@dataclass
class TuneOptions:
    """Every setting of a tune run, named as the ``dsm-export tune`` flags (``--max-kl`` is
    ``max_kl``); ``None`` means the flag's default. Exactly one of ``target_flops_ratio`` (FLOPs
    reduction, e.g. 1.7) and ``target_speedup`` (measured speed-up over the fastest unmerged engine
    of ``backend``) is set. ``min_agreement`` is a percentage; ``max_kl`` is in nats (1 - cosine
    for embedding models). ``export``, ``output`` (schedule JSON) and ``report`` (report JSON) are
    paths written at the end, each through a temporary file."""

    model: str
    images: str
    target_flops_ratio: float | None = None
    target_speedup: float | None = None
    weights: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    precision: str | None = None
    backend: str = "onnxruntime"
    provider: str = "cpu"
    export: str | None = None
    output: str | None = None
    report: str | None = None
    min_speed_per_flop: float | None = None
    speed_candidates: int = 6
    min_agreement: float | None = None
    max_kl: float | None = None
    quick: bool = False
    calibration_count: int | None = None
    calibration: int | None = None  # the old name of calibration_count
    no_mirror: bool = False
    mirror: bool = False
    holdout: int | None = None
    max_grid: int | None = None
    refine_steps: int | None = None
    rungs: int | None = None
    repeats: int = 5
    strides: str | tuple = "1"
    skip_unreadable: bool = False
    no_progress: bool = False
    budget: object = field(default=None, repr=False)  # set by check(): a candidates.Budget
    runtime: object = field(default=None, repr=False)  # set by tune(): an engine_runtimes runtime

    def check(self) -> None:
        """Resolve the defaults and refuse every mistake, before minutes of search.

        Raises:
            DSMError: one line naming the flag.
        """
        if (self.target_flops_ratio is None) == (self.target_speedup is None):
            raise DSMError("give exactly one of --target-flops-ratio and --target-speedup")
        target = self.target_flops_ratio or self.target_speedup
        if not 1.0 < target < 10:
            raise DSMError(f"the target must be above 1, got {target}")
        if self.calibration is not None:  # the old spelling: a count, where build's --calibration is a folder
            if self.calibration_count is not None:
                raise DSMError("give --calibration-count only (--calibration N is its old name)")
            self.calibration_count, self.calibration = self.calibration, None
        if self.backend not in ("onnxruntime", "openvino"):
            raise DSMError(f"--backend {self.backend}: choose onnxruntime or openvino")
        openvino = self.backend == "openvino"
        if self.precision is None:
            self.precision = "auto" if openvino and self.target_speedup else "fp32"
        allowed = OPENVINO_PRECISIONS if openvino else ONNXRUNTIME_PRECISIONS
        if self.precision not in allowed:
            raise DSMError(f"--precision {self.precision} is not a{'n OpenVINO' if openvino else 'n ONNX Runtime'} "
                           f"precision: choose one of {', '.join(allowed)}")
        if openvino:
            if not self.target_speedup:
                raise DSMError("--backend openvino needs --target-speedup (it measures OpenVINO engines)")
            if self.export and not self.export.endswith(".xml"):
                raise DSMError(f"--export {self.export!r}: an OpenVINO engine is an IR, give a .xml path")
            if self.provider != "cpu":
                raise DSMError("--provider is an ONNX Runtime execution provider: not with --backend openvino")
        elif self.export and self.export.endswith(".xml"):
            raise DSMError(f"--export {self.export!r}: an .xml engine needs --backend openvino")
        if self.calibration_count is None:
            self.calibration_count = 64 if self.quick else 128
        if self.rungs is None:
            self.rungs = 3 if self.quick else 4
        if self.mirror and not self.target_speedup:
            raise DSMError("--mirror is for --target-speedup (--target-flops-ratio scores mirror images unless "
                           "--no-mirror)")
        if self.target_speedup:
            self.no_mirror = not self.mirror
        if self.quick:
            self.no_mirror = True
            self.max_grid = self.max_grid or (8 if self.target_speedup else 24)
            if self.refine_steps is None:
                self.refine_steps = 4 if self.target_speedup else 12
        if not 1 <= self.calibration_count <= 128:
            raise DSMError("--calibration-count must be between 1 and 128 images")
        if self.precision == "auto" and not self.target_speedup:
            raise DSMError("--precision auto needs --target-speedup (FLOPs do not change with precision)")
        if self.repeats < 5:
            raise DSMError("--repeats must be at least 5 (the median of 5 or more runs)")
        if self.min_speed_per_flop is not None:
            if not self.target_flops_ratio or not self.export:
                raise DSMError("--min-speed-per-flop needs --target-flops-ratio and --export (it times the exported "
                               "candidates; --target-speedup measures speed itself)")
            if not 0 <= self.min_speed_per_flop <= 2:
                raise DSMError(f"--min-speed-per-flop must be between 0 and 2, got {self.min_speed_per_flop:g}")
        if self.speed_candidates < 1:
            raise DSMError(f"--speed-candidates must be at least 1, got {self.speed_candidates}")
        if self.rungs < 1:
            raise DSMError("--rungs must be at least 1")
        self.strides = parse_strides(self.strides)
        if self.min_agreement is not None and not 0 <= self.min_agreement <= 100:
            raise DSMError(f"--min-agreement is a percentage from 0 to 100, got {self.min_agreement:g}")
        if self.max_kl is not None and not self.max_kl >= 0:
            raise DSMError(f"--max-kl must be 0 or more, got {self.max_kl:g}")
        if self.weights and self.pretrained:
            raise DSMError("give either --weights FILE or --pretrained, not both")
        if not (self.weights or self.pretrained):
            raise DSMError("give --weights FILE or --pretrained (the search needs trained weights)")
        from .candidates import Budget

        self.budget = Budget(None if self.min_agreement is None else self.min_agreement / 100.0, self.max_kl)
        for path in (self.output, self.report, self.export):
            if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise DSMError(f"output folder of {path!r} does not exist")

    def speed_floor(self) -> float:
        """The speed check's floor (:mod:`.speed_check`): ``min_speed_per_flop``, by default 0.9 with
        ``target_flops_ratio`` and ``export``, else 0 (no check)."""
        from .speed_check import SPEED_PER_FLOP

        if self.min_speed_per_flop is not None:
            return self.min_speed_per_flop
        return SPEED_PER_FLOP if self.target_flops_ratio and self.export else 0.0


def parse_strides(text) -> tuple[int, ...]:
    """``"1,2"`` (or a tuple) as ``(1, 2)``.

    Raises:
        DSMError: anything but distinct whole numbers from 1 to 6.
    """
    try:
        out = tuple(int(v) for v in (text if isinstance(text, tuple) else str(text).split(",")))
    except ValueError:
        out = ()
    if not out or any(not 1 <= k <= 6 for k in out) or len(set(out)) != len(out):
        raise DSMError(f"--strides {text!r}: expected distinct whole numbers from 1 to 6, e.g. 1,2")
    return out


@dataclass
class TuneReport:
    """What :func:`tune` found. ``schedule`` is None when nothing reached the target within the
    accuracy budget (then ``fastest_within_budget`` says what came closest and nothing was
    written). Metrics are dicts with ``divergence`` (KL in nats, or 1 - cosine), ``agreement``
    (a fraction), ``flops_ratio`` and, measured, ``speedup``; ``held_apart`` is the chosen engine
    (or schedule, without ``export``) on the held-apart photos, with ``top1_accuracy`` and
    ``baseline_top1_accuracy`` where the images are labelled."""

    schedule: Schedule | None
    precision: str | None
    divergence: str  # "KL" or "1 - cosine"
    agreement_name: str
    budget: str | None
    target: str
    measured: bool
    depth: int
    calibration: dict | None = None
    held_apart: dict | None = None
    pareto: list = field(default_factory=list)
    evaluated: list = field(default_factory=list)
    variants: list = field(default_factory=list)
    speed_check: list | None = None
    machine: dict | None = None
    calibration_files: list = field(default_factory=list)
    held_apart_images: int = 0
    skipped_unreadable: list = field(default_factory=list)
    fastest_within_budget: dict | None = None
    exported: str | None = None
    nearest: str | None = None  # target_flops_ratio outside the budget: the least-KL schedule at the target

    def to_json(self) -> dict:
        """The ``--report`` JSON (``schedule`` a spec string, or null when nothing reached the target)."""
        if self.schedule is None:
            return {"schedule": None, "precision": None, "divergence": self.divergence, "target": self.target,
                    "budget": self.budget, "fastest_within_budget": self.fastest_within_budget,
                    "pareto": self.pareto, "evaluated": self.evaluated, "machine": self.machine,
                    "calibration_images": len(self.calibration_files), "held_apart_images": self.held_apart_images,
                    "skipped_unreadable": self.skipped_unreadable}
        return {"schedule": self.schedule.spec(), "precision": self.precision, "divergence": self.divergence,
                "budget": self.budget, "calibration": self.calibration, "held_apart": self.held_apart,
                "pareto": self.pareto, "evaluated": self.evaluated, "variants": self.variants,
                "speed_check": self.speed_check, "machine": self.machine,
                "calibration_files": self.calibration_files, "held_apart_images": self.held_apart_images,
                "skipped_unreadable": self.skipped_unreadable}


def tune(options: TuneOptions | None = None, echo: Callable[[str], None] = print, **settings) -> TuneReport:
    """Search, judge on held-apart photos and (``export``) write the engine.

    Args:
        options: a :class:`TuneOptions`, or None to build one from ``settings``
            (``tune(model="deit_tiny_patch16_224", weights=..., images=..., target_speedup=1.6)``).
        echo: called with each line the search reports as it goes (speed-check tables, notes).

    Returns:
        a :class:`TuneReport`; ``output``, ``report`` and ``export`` are written as it returns.

    Raises:
        DSMError: a user mistake (:meth:`TuneOptions.check`), an unreadable image folder, too few
            images, an unavailable runtime; before any search.
    """
    from .. import checks
    from ..data import list_images, split_calibration
    from ..check.evaluate import divergence_name, load_pixels, model_logits, schedule_metrics
    from ..fileio import write_json
    from ..core.models import create_model

    opts = options if options is not None else TuneOptions(**settings)
    opts.check()
    for path, what in ((opts.output, "--output"), (opts.report, "--report"), (opts.export, "--export")):
        checks.output_file(path, what)  # fail before minutes of search, not after
    checks.input_file(opts.weights, "weights file")
    if opts.target_speedup:
        from .runtimes import make_runtime

        # OpenVINO missing or an unavailable provider: fail before minutes of search, not after
        opts.runtime = make_runtime(opts.backend, opts.provider, batch=32, repeats=opts.repeats)
        if opts.precision == "bf16" and not opts.runtime.bf16:
            raise DSMError("--precision bf16: this CPU has no BF16 (AVX-512 BF16 or AMX), OpenVINO would run "
                           "it as f32; tune fp32 here, or on the CPU that will serve it")
    if opts.speed_floor():
        from ..engines.providers import resolve_providers

        resolve_providers(opts.provider)
    images, skipped = checks.readable_images(list_images(opts.images), opts.skip_unreadable)
    model = create_model(opts.model, opts.weights, pretrained=opts.pretrained, num_classes=opts.num_classes)
    if len(images) < opts.calibration_count + 1:
        raise DSMError(f"{opts.images} holds {len(images)} images: need more than --calibration-count")
    calib, held = split_calibration(images, opts.calibration_count)
    if opts.holdout:
        held = held.subset(range(min(opts.holdout, len(held))))
    calib_pixels = load_pixels(calib, model)
    held_pixels = load_pixels(held, model)
    base = model_logits(model, held_pixels)
    div = divergence_name(model)
    agree = "agreement" if div == "KL" else "retrieval overlap"
    measured = bool(opts.target_speedup)
    out = TuneReport(schedule=None, precision=None, divergence=div, agreement_name=agree,
                     budget=opts.budget.describe(div, agree) or None, measured=measured, depth=len(model.blocks),
                     target=(f"a {opts.target_speedup:.2f}x measured speed-up" if measured
                             else f"{opts.target_flops_ratio:.2f}x fewer FLOPs"),
                     calibration_files=list(calib.files), held_apart_images=len(held), skipped_unreadable=skipped)
    with tempfile.TemporaryDirectory(prefix="dsm-tune-") as work:
        search = _search_engines if measured else _search_flops
        chosen_path = search(opts, model, calib_pixels, work, out, echo)
        if out.schedule is None:  # nothing reached the target within the budget: write the report only
            if opts.report:
                write_json(opts.report, out.to_json())
            return out
        if chosen_path:  # the engine as it will be served, on photos the search never saw
            from .engine_search import ort_logits
            from ..core.models import is_embedding_model
            from ..metrics import output_metrics

            outputs = (opts.runtime.outputs(chosen_path, held_pixels.numpy()) if opts.runtime
                       else ort_logits(chosen_path, held_pixels.numpy()))
            out.held_apart = output_metrics(outputs, base, held.labels, embeddings=is_embedding_model(model))
            out.held_apart["flops_ratio"] = out.calibration["flops_ratio"]
        else:
            out.held_apart = schedule_metrics(model, out.schedule, held_pixels, base, held.labels)
        if div != "KL":
            out.agreement_name = f"retrieval overlap@{out.held_apart.get('knn_k', 5)}"
            out.budget = opts.budget.describe(div, out.agreement_name) or None
        out.variants = _judge_variants(out.variants, model, held_pixels, base, held.labels)
        if opts.export:
            from ..fileio import atomic_path

            if chosen_path.endswith(".xml"):  # the weights first: a .xml never names a missing .bin
                with atomic_path(opts.export[:-4] + ".bin") as tmp:
                    shutil.copyfile(chosen_path[:-4] + ".bin", tmp)
            with atomic_path(opts.export) as tmp:
                shutil.copyfile(chosen_path, tmp)
            out.exported = opts.export
    if opts.output:
        write_json(opts.output, {**out.schedule.to_dict(out.depth), "spec": out.schedule.spec(),
                                 "precision": out.precision})
    if opts.report:
        write_json(opts.report, out.to_json())
    return out


def _without_path(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "path"}


def _search_flops(opts: TuneOptions, model, calib_pixels, work: str, out: TuneReport, echo) -> str | None:
    """``target_flops_ratio``: the PyTorch schedule search; with ``export`` the speed check
    (:func:`.speed_check.speed_check`) and the chosen schedule exported (and quantized). Fills
    ``out``; returns the engine's path (None without ``export``)."""
    from ..graph.export import export_model
    from .schedule_search import search_schedules

    result = search_schedules(model, calib_pixels, opts.target_flops_ratio, max_grid=opts.max_grid or 48,
                              refine_steps=opts.refine_steps if opts.refine_steps is not None else 24,
                              progress=not opts.no_progress, mirror=not opts.no_mirror)
    out.pareto, out.evaluated, out.calibration = result.pareto, result.evaluated, result.best_metrics
    if not opts.budget.admits(result.best_metrics):
        out.nearest = result.best.spec()
        return None
    out.schedule, out.precision, out.variants = result.best, opts.precision, result.variants
    if not opts.export:
        return None
    floor = opts.speed_floor()
    path = os.path.join(work, "fp32.onnx")
    if floor:
        path = _speed_checked(opts, model, result, out, floor, work, echo) or path
    if not os.path.exists(path):
        export_model(model, opts.model, path, out.schedule, weights=opts.weights, pretrained=opts.pretrained,
                     num_classes=opts.num_classes)
    if opts.precision != "fp32":
        from .engine_search import precision_options
        from ..engines.int8.quantize import quantize_int8

        quantize_int8(path, os.path.join(work, "int8.onnx"), calib_pixels.numpy()[:64],  # static mode's
                      precision_options(opts.precision))
        path = os.path.join(work, "int8.onnx")
    return path


def _speed_checked(opts: TuneOptions, model, result, out: TuneReport, floor: float, work: str, echo) -> str | None:
    """Run the speed check on ``result``'s evaluated schedules, echo it, record it in ``out``
    (``speed_check``, ``machine``; the choice replaces ``schedule`` and ``calibration``) and return
    the chosen schedule's fp32 export (None: nothing timed)."""
    from .speed_check import speed_check

    check = speed_check(model, opts.model, opts.weights, result.evaluated, opts.target_flops_ratio, work,
                        min_quotient=floor, count=opts.speed_candidates, repeats=opts.repeats, provider=opts.provider,
                        pretrained=opts.pretrained, num_classes=opts.num_classes, budget=opts.budget)
    if not check.rows:
        return None
    mach = check.machine
    echo(f"speed check (ONNX Runtime {mach['provider']}, fp32 against timm's unmerged model timed right before "
         f"each, batch {mach['batch']}, {mach['repeats']} pairs, {mach['cpu']}, {mach['threads']} threads): "
         f"speed-up / FLOP ratio of the least-KL schedules, median and lower quartile; kept: the least-KL "
         f"schedule whose lower quartile is at least {floor:.2f}")
    for row in check.rows:
        again = " (timed twice)" if row.get("timed_twice") else ""
        echo(f"  {row['flops_ratio']:.3f}x FLOPs  {row['speedup']:.2f}x{again}  {row['speed_per_flop']:.2f} "
             f"(low {row['speed_per_flop_low']:.2f})  KL {row['divergence']:.4f}  {row['spec']}")
    chosen = check.chosen
    out.speed_check = [_without_path(r) for r in check.rows]
    out.machine = mach
    if chosen is None:
        best = max(check.rows, key=lambda r: r["speed_per_flop_low"])
        echo(f"note: none of the {len(check.rows)} schedules timed reached {floor:.2f} of its FLOP ratio in its "
             f"lower quartile (best {best['speed_per_flop_low']:.2f}); kept the least-KL schedule")
        least = check.rows[0]
        return least["path"] if least["spec"] == result.best.spec() else None
    if chosen["spec"] != result.best.spec():
        first = check.rows[0]
        echo(f"speed check: {chosen['spec']} chosen over the least-KL {first['spec']} "
             f"(lower quartile {chosen['speed_per_flop_low']:.2f} against {first['speed_per_flop_low']:.2f} of the "
             f"FLOP ratio; KL {chosen['divergence']:.4f} against {first['divergence']:.4f})")
    out.schedule = Schedule.parse(chosen["spec"])
    out.calibration = _without_path(chosen)
    return chosen["path"]


def _judge_variants(rows: list[dict], model, held_pixels, base, labels) -> list[dict]:
    """The variant stage's rows, with the plain schedule and the calibration winner also scored on
    the held-apart images (``held_divergence``, ``held_agreement``)."""
    from ..check.evaluate import schedule_metrics
    from .candidates import least

    if not rows:
        return []
    rows = [dict(r) for r in rows]
    winner = least(rows)
    for row in {id(rows[0]): rows[0], id(winner): winner}.values():
        m = schedule_metrics(model, Schedule.parse(row["spec"]), held_pixels, base, labels)
        row["held_divergence"], row["held_agreement"] = m["divergence"], m["agreement"]
    return rows


def _search_engines(opts: TuneOptions, model, calib_pixels, work: str, out: TuneReport, echo) -> str | None:
    """``target_speedup``: schedule x precision measured in ``opts.runtime`` (:mod:`.engine_search`).
    Fills ``out``; returns the chosen engine's path (None: nothing reached the target)."""
    from .candidates import fastest_within, schedule_of
    from .engine_search import search_engines

    runtime = opts.runtime
    precisions = runtime.auto if opts.precision == "auto" else (opts.precision,)
    result = search_engines(model, opts.model, opts.weights, calib_pixels, opts.target_speedup, work,
                            precisions=precisions, rungs=opts.rungs, max_grid=opts.max_grid or 16,
                            refine_steps=opts.refine_steps if opts.refine_steps is not None else 8,
                            pretrained=opts.pretrained,
                            num_classes=opts.num_classes, progress=not opts.no_progress, strides=opts.strides,
                            budget=opts.budget, mirror=not opts.no_mirror, runtime=runtime)
    for note in result.machine.get("notes", ()):
        echo(note)
    if result.machine.get("variant_keys") is not None:
        keys = ",".join(f"{k}={v}" for k, v in result.machine["variant_keys"].items()) or "none"
        echo(f"merge variants searched at the {result.machine['variant_rung']:.2f}x rung; every rung uses "
             f"its keys: {keys}")
    out.evaluated = [_without_path(r) for r in result.candidates]
    out.pareto = [_without_path(r) for r in result.pareto]
    out.machine = result.machine
    best = result.best
    if best is None:
        fastest = fastest_within(result.candidates, opts.budget)
        out.fastest_within_budget = fastest and _without_path(fastest)
        return None
    out.schedule, out.precision, out.calibration = schedule_of(best), best["precision"], _without_path(best)
    return best["path"]
