"""The tune pipeline as one call: :func:`tune` searches the schedule (and, at a speed-up target,
the precision) with the least KL to the unmerged model, scores the choice on photos the search
never saw, and optionally writes the engine (``dsm-export tune`` is argument parsing and printing
over it).

Two searches, by target:

* ``target_flops_ratio``: the PyTorch schedule search of :mod:`.schedule_search` (FLOPs counted,
  not timed), then with ``export`` the speed check of :mod:`.speed_check` and the chosen schedule
  exported (and quantized);
* ``target_speedup``: schedule x precision, every engine built and timed in the runtime of
  ``backend`` (:mod:`.engine_search`, the runtimes of :mod:`.runtimes`).

Settings: :class:`TuneOptions` mirrors the flags as given; :meth:`TuneOptions.check` refuses every
mistake and returns a :class:`ResolvedTuneOptions` (defaults filled in, one field per choice), the
only settings the pipeline reads. What a run found is a :class:`TuneReport`.

Calibration images are the first ``calibration_count`` of ``images`` (:func:`.data.split_calibration`);
all the rest (or ``holdout`` of them) are held apart and judge the choice.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from typing import Callable

from .. import checks
from ..check.evaluate import divergence_name, load_pixels, model_logits, schedule_metrics
from ..core.hf import is_hf_folder
from ..core.models import create_model, is_embedding_model
from ..core.schedule import Schedule
from ..data import list_images, split_calibration
from ..engines.int8.quantize import quantize_int8
from ..engines.providers import resolve_providers
from ..engines.registry import backends, engine_files, get_backend
from ..errors import DSMError
from ..fileio import atomic_path, write_json
from ..graph.export import export_model
from ..metrics import output_metrics
from .candidates import Budget, Candidate, fastest_within, least, schedule_of
from .engine_search import EngineSearchSettings, search_engines
from .runtimes import RUNTIMES, make_runtime, precision_options
from .schedule_search import ScheduleSearchSettings, search_schedules
from .speed_check import SPEED_PER_FLOP, SpeedCheckSettings, speed_check

# The default accuracy guard of a --target-speedup run: KL to the unmerged model on the calibration
# images, in nats. About the README's DSM schedule's KL on the 500 photos (0.048); an unguarded
# `tune --backend openvino --target-speedup 1.6` on a Xeon with AMX (bf16 4.2x ONNX Runtime fp32, so
# 1.6x over it needs heavy merging) chose bf16 at 2.79x fewer FLOPs with KL 0.41, top-1 68.0 % against
# 79.8 % unmerged on the held-apart photos. --max-kl inf lifts it.
SPEEDUP_MAX_KL = 0.05


@dataclass(frozen=True)
class TuneOptions:
    """Every setting of a tune run as given, named as the ``dsm-export tune`` flags (``--max-kl`` is
    ``max_kl``, ``--no-mirror`` is ``no_mirror``); ``None`` means the flag's default. Exactly one of
    ``target_flops_ratio`` (FLOPs reduction, e.g. 1.7) and ``target_speedup`` (measured speed-up over
    the fastest unmerged engine of ``backend``) is set. ``min_agreement`` is a percentage; ``max_kl``
    is in nats (1 - cosine for embedding models); with ``target_speedup`` and neither bound the budget is
    the guard ``KL <= SPEEDUP_MAX_KL`` (``max_kl=float("inf")`` lifts it). ``export``, ``output`` (schedule JSON) and
    ``report`` (report JSON) are paths written at the end, each through a temporary file.
    ``calibration`` is the old name of ``calibration_count``.

    Frozen: :meth:`check` returns the resolved settings (:class:`ResolvedTuneOptions`) and leaves
    this as given."""

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
    calibration: int | None = None
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

    @classmethod
    def from_namespace(cls, namespace) -> "TuneOptions":
        """The options of an object with one attribute per field (``dsm-export tune``'s parsed arguments)."""
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})

    def check(self) -> "ResolvedTuneOptions":
        """Refuse every mistake and resolve the defaults, before minutes of search.

        Returns:
            a :class:`ResolvedTuneOptions`; this object is left as it was.

        Raises:
            DSMError: one line naming the flag.
        """
        _check_target(self)
        runtime = _check_runtime(self)
        precision = self.precision or runtime.default_precision
        if precision not in runtime.tune_precisions:
            raise DSMError(f"--precision {precision} is not an {runtime.label} precision: choose one of "
                           f"{', '.join(runtime.tune_precisions)}")
        calibration_count = _calibration_count(self)
        measured = self.target_speedup is not None
        if self.mirror and not measured:
            raise DSMError("--mirror is for --target-speedup (--target-flops-ratio scores mirror images unless "
                           "--no-mirror)")
        if precision == "auto" and not measured:
            raise DSMError("--precision auto needs --target-speedup (FLOPs do not change with precision)")
        _check_numbers(self)
        if self.weights and self.pretrained:
            raise DSMError("give either --weights FILE or --pretrained, not both")
        if not (self.weights or self.pretrained or is_hf_folder(self.model)):
            raise DSMError("give --weights FILE or --pretrained (the search needs trained weights)")
        budget = _budget(self, measured)
        for path in (self.output, self.report, self.export):
            if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise DSMError(f"output folder of {path!r} does not exist")
        quick = (8, 4) if measured else (24, 12)  # --quick's grid and refine steps
        full = (16, 8) if measured else (48, 24)
        return ResolvedTuneOptions(
            model=self.model, images=self.images, weights=self.weights, pretrained=self.pretrained,
            num_classes=self.num_classes, target_flops_ratio=self.target_flops_ratio,
            target_speedup=self.target_speedup, backend=runtime.name, precision=precision, provider=self.provider,
            export=self.export, output=self.output, report=self.report, budget=budget,
            speed_floor=_speed_floor(self),
            speed_candidates=self.speed_candidates, calibration_count=calibration_count, holdout=self.holdout,
            mirror=not self.quick and (self.mirror if measured else not self.no_mirror),
            max_grid=self.max_grid or (quick if self.quick else full)[0],
            refine_steps=self.refine_steps if self.refine_steps is not None else (quick if self.quick else full)[1],
            rungs=self.rungs if self.rungs is not None else (3 if self.quick else 4), repeats=self.repeats,
            strides=parse_strides(self.strides), skip_unreadable=self.skip_unreadable,
            progress=not self.no_progress)


@dataclass(frozen=True, kw_only=True)
class ResolvedTuneOptions:
    """A tune run's settings as :meth:`TuneOptions.check` resolved them: every flag checked, every
    default filled in, one field per choice. :func:`tune` and its stages read only this.

    Attributes:
        model, images, weights, pretrained, num_classes: the model and the photos, as given.
        target_flops_ratio, target_speedup: the target; exactly one is set.
        backend: the runtime the engines are built and timed in (a key of :data:`.runtimes.RUNTIMES`).
        precision: one of that runtime's ``tune_precisions`` (``auto``: the search chooses).
        provider: the ONNX Runtime execution provider timed.
        export, output, report: the engine, schedule JSON and report JSON written at the end, or None.
        budget: the accuracy budget on the calibration images (:class:`.candidates.Budget`).
        speed_floor: the speed check's least measured speed-up per unit of FLOP ratio (0: no check).
        speed_candidates: schedules the speed check times at most.
        calibration_count: calibration images, the first of ``images``.
        holdout: held-apart images (None: all the rest).
        mirror: whether schedules are also scored on the calibration images' mirror images.
        max_grid, refine_steps: the schedule search's grid schedules and per-block moves (per rung with
            ``target_speedup``).
        rungs: merged FLOP-ratio rungs measured at most (``target_speedup``).
        repeats: timing repetitions, median taken.
        strides: merge strides tried at each rung (``target_speedup``).
        skip_unreadable: leave out images that cannot be decoded instead of stopping.
        progress: show progress bars.
    """

    model: str
    images: str
    weights: str | None
    pretrained: bool
    num_classes: int | None
    target_flops_ratio: float | None
    target_speedup: float | None
    backend: str
    precision: str
    provider: str
    export: str | None
    output: str | None
    report: str | None
    budget: Budget
    speed_floor: float
    speed_candidates: int
    calibration_count: int
    holdout: int | None
    mirror: bool
    max_grid: int
    refine_steps: int
    rungs: int
    repeats: int
    strides: tuple[int, ...]
    skip_unreadable: bool
    progress: bool

    @property
    def measured(self) -> bool:
        """Whether the target is a measured speed-up (``target_speedup``) rather than FLOPs."""
        return self.target_speedup is not None

    @property
    def runtime_class(self) -> type:
        """The search runtime of ``backend`` (:data:`.runtimes.RUNTIMES`): its label, precisions, ..."""
        return RUNTIMES[self.backend]


def _check_target(opts: TuneOptions) -> None:
    """Exactly one target (``target_flops_ratio`` or ``target_speedup``), above 1."""
    if (opts.target_flops_ratio is None) == (opts.target_speedup is None):
        raise DSMError("give exactly one of --target-flops-ratio and --target-speedup")
    target = opts.target_flops_ratio if opts.target_flops_ratio is not None else opts.target_speedup
    if not 1.0 < target < 10:
        raise DSMError(f"the target must be above 1, got {target}")


def _calibration_count(opts: TuneOptions) -> int:
    """``calibration_count`` (or its old name ``calibration``), by default 128 (64 with ``quick``)."""
    count = opts.calibration_count
    if opts.calibration is not None:  # the old spelling: a count, where build's --calibration is a folder
        if count is not None:
            raise DSMError("give --calibration-count only (--calibration N is its old name)")
        count = opts.calibration
    if count is None:
        count = 64 if opts.quick else 128
    if not 1 <= count <= 128:
        raise DSMError("--calibration-count must be between 1 and 128 images")
    return count


def _check_runtime(opts: TuneOptions) -> type:
    """The search runtime class of ``backend`` (:data:`.runtimes.RUNTIMES`), with the flags that
    depend on it checked: the target it needs, ``provider``, and ``export``'s suffix (the engine
    registry's: :meth:`dsm_export.engines.registry.Backend.claims`)."""
    runtime = RUNTIMES.get(opts.backend)
    if runtime is None:
        raise DSMError(f"--backend {opts.backend}: choose {' or '.join(RUNTIMES)}")
    if runtime.needs_target_speedup and opts.target_speedup is None:
        raise DSMError(f"--backend {runtime.name} needs --target-speedup (it measures {runtime.label} engines)")
    if not runtime.takes_provider and opts.provider != "cpu":
        raise DSMError(f"--provider is an ONNX Runtime execution provider: not with --backend {runtime.name}")
    backend = get_backend(runtime.name)
    if opts.export and not backend.claims(opts.export):
        owner = next((b for b in backends() if b.claims(opts.export) and b.name in RUNTIMES), None)
        hint = f" (writing {owner.label} engines needs --backend {owner.name})" if owner else ""
        raise DSMError(f"--export {opts.export!r}: --backend {backend.name} writes {' or '.join(backend.suffixes)} "
                       f"files, give a {backend.suffixes[0]} path{hint}")
    return runtime


def _check_numbers(opts: TuneOptions) -> None:
    """The numeric flags' ranges (``repeats``, the speed check's, ``rungs``, the budget's)."""
    if opts.repeats < 5:
        raise DSMError("--repeats must be at least 5 (the median of 5 or more runs)")
    if opts.min_speed_per_flop is not None:
        if not opts.target_flops_ratio or not opts.export:
            raise DSMError("--min-speed-per-flop needs --target-flops-ratio and --export (it times the exported "
                           "candidates; --target-speedup measures speed itself)")
        if not 0 <= opts.min_speed_per_flop <= 2:
            raise DSMError(f"--min-speed-per-flop must be between 0 and 2, got {opts.min_speed_per_flop:g}")
    if opts.speed_candidates < 1:
        raise DSMError(f"--speed-candidates must be at least 1, got {opts.speed_candidates}")
    if opts.rungs is not None and opts.rungs < 1:
        raise DSMError("--rungs must be at least 1")
    if opts.min_agreement is not None and not 0 <= opts.min_agreement <= 100:
        raise DSMError(f"--min-agreement is a percentage from 0 to 100, got {opts.min_agreement:g}")
    if opts.max_kl is not None and not opts.max_kl >= 0:
        raise DSMError(f"--max-kl must be 0 or more, got {opts.max_kl:g}")


def _budget(opts: TuneOptions, measured: bool) -> Budget:
    """The accuracy budget of ``--min-agreement`` and ``--max-kl``. A ``--target-speedup`` run with
    neither keeps within the guard ``KL <= SPEEDUP_MAX_KL`` (:data:`SPEEDUP_MAX_KL`): a fast target is
    otherwise met by merging until the model is another one. ``--max-kl inf`` lifts it."""
    max_kl = opts.max_kl
    if measured and max_kl is None and opts.min_agreement is None:
        max_kl = SPEEDUP_MAX_KL
    return Budget(None if opts.min_agreement is None else opts.min_agreement / 100.0,
                  None if max_kl is None or math.isinf(max_kl) else max_kl,
                  guard=measured and opts.max_kl is None and opts.min_agreement is None)


def _speed_floor(opts: TuneOptions) -> float:
    """The speed check's floor (:mod:`.speed_check`): ``min_speed_per_flop``, by default
    :data:`.speed_check.SPEED_PER_FLOP` with ``target_flops_ratio`` and ``export``, else 0 (no check)."""
    if opts.min_speed_per_flop is not None:
        return opts.min_speed_per_flop
    return SPEED_PER_FLOP if opts.target_flops_ratio and opts.export else 0.0


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
    fastest_past_budget: dict | None = None  # nothing reached the target within it: the fastest that did outside it
    exported: str | None = None
    nearest: str | None = None  # target_flops_ratio outside the budget: the least-KL schedule at the target

    @property
    def winning_variant(self) -> dict | None:
        """The variant row with the least calibration divergence (``variants[0]``, the plain
        schedule, when no variant beat it); None without a variant stage."""
        return least(self.variants) if self.variants else None

    def to_json(self) -> dict:
        """The ``--report`` JSON (``schedule`` a spec string, or null when nothing reached the target)."""
        if self.schedule is None:
            return {"schedule": None, "precision": None, "divergence": self.divergence, "target": self.target,
                    "budget": self.budget, "fastest_within_budget": self.fastest_within_budget,
                    "fastest_past_budget": self.fastest_past_budget,
                    "pareto": self.pareto, "evaluated": self.evaluated, "machine": self.machine,
                    "calibration_images": len(self.calibration_files), "held_apart_images": self.held_apart_images,
                    "skipped_unreadable": self.skipped_unreadable}
        return {"schedule": self.schedule.spec(), "precision": self.precision, "divergence": self.divergence,
                "budget": self.budget, "calibration": self.calibration, "held_apart": self.held_apart,
                "pareto": self.pareto, "evaluated": self.evaluated, "variants": self.variants,
                "speed_check": self.speed_check, "machine": self.machine,
                "calibration_files": self.calibration_files, "held_apart_images": self.held_apart_images,
                "skipped_unreadable": self.skipped_unreadable}


def tune(options: TuneOptions | ResolvedTuneOptions | None = None, echo: Callable[[str], None] = print,
         **settings) -> TuneReport:
    """Search, judge on held-apart photos and (``export``) write the engine.

    Args:
        options: a :class:`TuneOptions` (checked here), a :class:`ResolvedTuneOptions` (from
            :meth:`TuneOptions.check`), or None to build a :class:`TuneOptions` from ``settings``
            (``tune(model="deit_tiny_patch16_224", weights=..., images=..., target_speedup=1.6)``).
        echo: called with each line the search reports as it goes (speed-check tables, notes).

    Returns:
        a :class:`TuneReport`; ``output``, ``report`` and ``export`` are written as it returns.

    Raises:
        DSMError: a user mistake (:meth:`TuneOptions.check`), an unreadable image folder, too few
            images, an unavailable runtime; before any search.
    """
    opts = options if options is not None else TuneOptions(**settings)
    if isinstance(opts, TuneOptions):
        opts = opts.check()
    runtime = _open_runtime(opts)
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
    out = TuneReport(schedule=None, precision=None, divergence=div, agreement_name=agree,
                     budget=opts.budget.describe(div, agree) or None, measured=opts.measured, depth=len(model.blocks),
                     target=(f"a {opts.target_speedup:.2f}x measured speed-up" if opts.measured
                             else f"{opts.target_flops_ratio:.2f}x fewer FLOPs"),
                     calibration_files=list(calib.files), held_apart_images=len(held), skipped_unreadable=skipped)
    with tempfile.TemporaryDirectory(prefix="dsm-tune-") as work:
        if opts.measured:
            chosen_path = _search_engines(opts, runtime, model, calib_pixels, work, out, echo)
        else:
            chosen_path = _search_flops(opts, model, calib_pixels, work, out, echo)
        if out.schedule is None:  # nothing reached the target within the budget: write the report only
            if opts.report:
                write_json(opts.report, out.to_json())
            return out
        _judge_held_apart(opts, runtime, chosen_path, model, held, held_pixels, base, out)
        if opts.export:
            copy_engine(chosen_path, opts.export)
            out.exported = opts.export
    if opts.output:
        write_json(opts.output, {**out.schedule.to_dict(out.depth), "spec": out.schedule.spec(),
                                 "precision": out.precision})
    if opts.report:
        write_json(opts.report, out.to_json())
    return out


def _open_runtime(opts: ResolvedTuneOptions):
    """Check the output paths and the weights file, and open the runtime the engines are built,
    timed and scored in (:func:`.runtimes.make_runtime`): OpenVINO missing, an unavailable provider
    or a bf16 engine on a CPU that would run it as f32 fail here, before minutes of search."""
    for path, what in ((opts.output, "--output"), (opts.report, "--report"), (opts.export, "--export")):
        checks.output_file(path, what)
    checks.input_file(opts.weights, "weights file")
    runtime = make_runtime(opts.backend, opts.provider, batch=32, repeats=opts.repeats)
    if opts.precision == "bf16" and not runtime.bf16:
        raise DSMError("--precision bf16: this CPU has no BF16 (AVX-512 BF16 or AMX), OpenVINO would run "
                       "it as f32; tune fp32 here, or on the CPU that will serve it")
    if opts.speed_floor:
        resolve_providers(opts.provider)
    return runtime


def _judge_held_apart(opts: ResolvedTuneOptions, runtime, chosen_path: str | None, model, held, held_pixels, base,
                      out: TuneReport) -> None:
    """Score the choice on the held-apart photos (``out.held_apart``): the engine as it will be
    served when one was written (``chosen_path``), else the schedule in PyTorch; then the variants."""
    if chosen_path:
        outputs = runtime.outputs(chosen_path, held_pixels.numpy())
        out.held_apart = output_metrics(outputs, base, held.labels, embeddings=is_embedding_model(model))
        out.held_apart["flops_ratio"] = out.calibration["flops_ratio"]
    else:
        out.held_apart = schedule_metrics(model, out.schedule, held_pixels, base, held.labels)
    if out.divergence != "KL":
        out.agreement_name = f"retrieval overlap@{out.held_apart.get('knn_k', 5)}"
        out.budget = opts.budget.describe(out.divergence, out.agreement_name) or None
    out.variants = _judge_variants(out.variants, model, held_pixels, base, held.labels)


def copy_engine(path: str, dest: str) -> None:
    """Copy the engine ``path`` to ``dest`` with every file of it
    (:func:`dsm_export.engines.registry.engine_files`: an IR's ``.bin``, ...): the companion files
    first, the engine file last, each through :func:`dsm_export.fileio.atomic_path`, so the engine
    never names a companion that is not there yet. A companion named after the engine's stem is
    renamed after ``dest``'s (``ov_int8.bin`` beside ``ov_int8.xml`` -> ``tuned.bin`` beside
    ``tuned.xml``); any other keeps its name.

    Raises:
        DSMError: ``dest``'s folder does not exist, or the engine cannot be read.
    """
    files = engine_files(path)
    stem = os.path.splitext(os.path.basename(files[0]))[0]
    dest_stem = os.path.splitext(os.path.basename(dest))[0]
    folder = os.path.dirname(os.path.abspath(dest))
    for src in files[1:]:
        name = os.path.basename(src)
        if name.startswith(stem):
            name = dest_stem + name[len(stem):]
        with atomic_path(os.path.join(folder, name)) as tmp:
            shutil.copyfile(src, tmp)
    with atomic_path(dest) as tmp:
        shutil.copyfile(files[0], tmp)


def _without_path(row: Candidate) -> dict:
    return {k: v for k, v in row.to_json().items() if k != "path"}


def _search_flops(opts: ResolvedTuneOptions, model, calib_pixels, work: str, out: TuneReport, echo) -> str | None:
    """``target_flops_ratio``: the PyTorch schedule search; with ``export`` the speed check
    (:func:`.speed_check.speed_check`) and the chosen schedule exported (and quantized). Fills
    ``out``; returns the engine's path (None without ``export``)."""
    result = search_schedules(model, calib_pixels, ScheduleSearchSettings(
        opts.target_flops_ratio, max_grid=opts.max_grid, refine_steps=opts.refine_steps, progress=opts.progress,
        mirror=opts.mirror))
    out.pareto, out.evaluated = [r.to_json() for r in result.pareto], [r.to_json() for r in result.evaluated]
    out.calibration = result.best_metrics.to_json()
    if not opts.budget.admits(result.best_metrics):
        out.nearest = result.best.spec()
        return None
    out.schedule, out.precision, out.variants = result.best, opts.precision, [r.to_json() for r in result.variants]
    if not opts.export:
        return None
    path = os.path.join(work, "fp32.onnx")
    if opts.speed_floor:
        path = _speed_checked(opts, model, result, out, work, echo) or path
    if not os.path.exists(path):
        export_model(model, opts.model, path, out.schedule, weights=opts.weights, pretrained=opts.pretrained,
                     num_classes=opts.num_classes)
    if opts.precision != "fp32":
        quantize_int8(path, os.path.join(work, "int8.onnx"), calib_pixels.numpy()[:64],  # static mode's
                      precision_options(opts.precision))
        path = os.path.join(work, "int8.onnx")
    return path


def _speed_checked(opts: ResolvedTuneOptions, model, result, out: TuneReport, work: str, echo) -> str | None:
    """Run the speed check on ``result``'s evaluated schedules, echo it, record it in ``out``
    (``speed_check``, ``machine``; the choice replaces ``schedule`` and ``calibration``) and return
    the chosen schedule's fp32 export (None: nothing timed)."""
    floor = opts.speed_floor
    check = speed_check(model, result.evaluated, work, SpeedCheckSettings(
        opts.target_flops_ratio, opts.model, weights=opts.weights, pretrained=opts.pretrained,
        num_classes=opts.num_classes, min_quotient=floor, count=opts.speed_candidates, repeats=opts.repeats,
        provider=opts.provider, budget=opts.budget))
    if not check.rows:
        return None
    mach = check.machine
    echo(f"speed check (ONNX Runtime {mach['provider']}, fp32 against timm's unmerged model timed right before "
         f"each, batch {mach['batch']}, {mach['repeats']} pairs, {mach['cpu']}, {mach['threads']} threads): "
         f"speed-up / FLOP ratio of the least-KL schedules, median and lower quartile; kept: the least-KL "
         f"schedule whose lower quartile is at least {floor:.2f}")
    for row in check.rows:
        again = " (timed twice)" if row.timed_twice else ""
        echo(f"  {row.flops_ratio:.3f}x FLOPs  {row.speedup:.2f}x{again}  {row.speed_per_flop:.2f} "
             f"(low {row.speed_per_flop_low:.2f})  KL {row.divergence:.4f}  {row.spec}")
    chosen = check.chosen
    out.speed_check = [_without_path(r) for r in check.rows]
    out.machine = mach
    if chosen is None:
        best = max(check.rows, key=lambda r: r.speed_per_flop_low)
        echo(f"note: none of the {len(check.rows)} schedules timed reached {floor:.2f} of its FLOP ratio in its "
             f"lower quartile (best {best.speed_per_flop_low:.2f}); kept the least-KL schedule")
        least_kl = check.rows[0]
        return least_kl.path if least_kl.spec == result.best.spec() else None
    if chosen.spec != result.best.spec():
        first = check.rows[0]
        echo(f"speed check: {chosen.spec} chosen over the least-KL {first.spec} "
             f"(lower quartile {chosen.speed_per_flop_low:.2f} against {first.speed_per_flop_low:.2f} of the "
             f"FLOP ratio; KL {chosen.divergence:.4f} against {first.divergence:.4f})")
    out.schedule = Schedule.parse(chosen.spec)
    out.calibration = _without_path(chosen)
    return chosen.path


def _judge_variants(rows: list[dict], model, held_pixels, base, labels) -> list[dict]:
    """The variant stage's rows, with the plain schedule and the calibration winner also scored on
    the held-apart images (``held_divergence``, ``held_agreement``)."""
    if not rows:
        return []
    rows = [dict(r) for r in rows]
    winner = least(rows)
    for row in {id(rows[0]): rows[0], id(winner): winner}.values():
        m = schedule_metrics(model, Schedule.parse(row["spec"]), held_pixels, base, labels)
        row["held_divergence"], row["held_agreement"] = m["divergence"], m["agreement"]
    return rows


def _search_engines(opts: ResolvedTuneOptions, runtime, model, calib_pixels, work: str, out: TuneReport,
                    echo) -> str | None:
    """``target_speedup``: schedule x precision measured in ``runtime`` (:mod:`.engine_search`).
    Fills ``out``; returns the chosen engine's path (None: nothing reached the target)."""
    precisions = runtime.auto if opts.precision == "auto" else (opts.precision,)
    settings = EngineSearchSettings(
        target=opts.target_speedup, model_name=opts.model, weights=opts.weights, pretrained=opts.pretrained,
        num_classes=opts.num_classes, precisions=precisions, rungs=opts.rungs, max_grid=opts.max_grid,
        refine_steps=opts.refine_steps, progress=opts.progress, strides=opts.strides, budget=opts.budget,
        mirror=opts.mirror)
    result = search_engines(model, calib_pixels, work, settings, runtime)
    for note in result.notes:
        echo(note)
    if result.variant_keys is not None:
        keys = ",".join(f"{k}={v}" for k, v in result.variant_keys.items()) or "none"
        echo(f"merge variants searched at the {result.variant_rung:.2f}x rung; every rung uses "
             f"its keys: {keys}")
    out.evaluated = [_without_path(r) for r in result.candidates]
    out.pareto = [_without_path(r) for r in result.pareto]
    out.machine = result.machine_report()
    best = result.best
    if best is None:
        fastest = fastest_within(result.candidates, opts.budget)
        out.fastest_within_budget = fastest and _without_path(fastest)
        past = fastest_within(result.candidates)
        if past is not None and past.speedup >= opts.target_speedup and not opts.budget.admits(past):
            out.fastest_past_budget = _without_path(past)  # the target was reached only past the budget
        return None
    out.schedule, out.precision, out.calibration = schedule_of(best), best.precision, _without_path(best)
    return best.path
