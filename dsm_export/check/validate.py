"""Parity and accuracy report of an exported graph against PyTorch.

For every image the graph's output is compared with (a) the PyTorch model running the same
schedule with the *reference* merge implementation (ToMe's scatter merges, SDPA attention), and
(b) the unmerged PyTorch model.

* Classifiers (output ``logits``): the graph passes when its logits are within ``atol`` of (a) and
  its top-1 class equals (a)'s on every image; KL and top-1 agreement to (b) are reported.
* Embedding models (output ``embeddings``, timm ``num_classes=0``): cosine similarity to (a) and (b)
  per image (min and mean), and k-nearest-neighbour retrieval agreement over the image set
  (overlap@k: the fraction of each image's k nearest neighbours by cosine that are the same as
  with the reference's embeddings). The graph passes when every image's cosine similarity to (a) is
  at least ``1 - COSINE_ATOL`` and retrieval overlap@k with (a) is at least
  :data:`MIN_KNN_OVERLAP` (fp16: the mean cosine distance criterion of :data:`FP16_COSINE_ATOL`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..data import ImageSet, eval_transform, iter_batches, list_images
from ..errors import DSMError
from ..graph.export import ExportInfo, load_onnx, read_metadata, weights_path
from ..core.flops import schedule_flops
from ..core.hf import ATTN_IMPLEMENTATIONS, is_hf_name
from ..core.hf_reference import merged_reference
from ..core.models import create_hf_model, create_model, is_embedding_model, pretrained_file, sha256_file
from ..core.patch import input_size
from ..core.schedule import Schedule
from ..engines.registry import Runner, RunnerOptions, open_runner
from ..metrics import (  # noqa: F401  (the metrics, here since before metrics.py)
    KNN_K, agreement_metrics, cosine_similarity, embedding_metrics, kl_divergence, knn_indices, knn_overlap,
    output_metrics, per_image_divergence,
)

DEFAULT_ATOL = 1e-4  # fp32 logits
FP16_MEDIAN_ATOL = 0.1  # fp16 engines: median over images of the max |logit difference|
FP16_MIN_TOP1_MATCH = 0.98  # fp16 engines: top-1 equal to PyTorch-with-schedule on this fraction
COSINE_ATOL = 1e-5  # fp32 embeddings: 1 - cosine similarity to PyTorch-with-schedule, every image
FP16_COSINE_ATOL = 1e-3  # fp16 embeddings: median over images of 1 - cosine similarity
MIN_KNN_OVERLAP = 0.98  # embeddings: retrieval overlap@k with PyTorch-with-schedule (fp16: 0.9)
FP16_MIN_KNN_OVERLAP = 0.9
# INT8 engines, against the fp32 model with the same schedule. Measured on the shared DeiT-Tiny (500
# photos, static QDQ, symmetric, percentile calibration on 64): unmerged 96 % top-1 match, KL 0.008;
# r=34,r_end=0,delay=3,local=1 93.8 %, KL 0.033 (INT8 noise in the keys also flips some merges).
INT8_MIN_TOP1_MATCH = 0.90  # top-1 equal to PyTorch-with-schedule (fp32) on this fraction of images
INT8_MAX_KL = 0.05  # mean KL(PyTorch-with-schedule fp32 || INT8 graph), nats
# bf16 engines (OpenVINO on a CPU with AVX-512 BF16 or AMX), against the fp32 model with the same
# schedule: bf16 keeps 8 mantissa bits, so logits move by up to ~1-3 and a near-tie in the matching
# scores can merge other tokens. On the shared DeiT-Tiny, r=24,r_end=8,delay=3,protect=16,merge=mlerp,
# OpenVINO 2026.4 (`build --backend openvino --precision bf16`, then `validate --limit 64`): 98.4 %
# top-1 match, KL 0.0035.
BF16_MIN_TOP1_MATCH = 0.95
BF16_MAX_KL = 0.02


@dataclass
class Logits:
    """Logits collected over an image set, ``[images, classes]`` float32 each."""

    graph: np.ndarray
    merged: np.ndarray
    unmerged: np.ndarray


def onnx_runner(path: str, threads: int | None = None, provider: str | None = "cpu") -> Runner:
    """A runner for the engine ``path`` (an ONNX file: ONNX Runtime on ``provider``, see
    :func:`dsm_export.engines.providers.resolve_providers`): ``[B, 3, H, W]`` float32 -> ``[B, classes]``
    (or ``[B, dim]`` embeddings); :func:`dsm_export.engines.registry.open_runner` with those options.

    Raises:
        DSMError: if the runtime cannot load the file, or the provider is not available.
    """
    return open_runner(path, RunnerOptions(threads=threads, provider=provider))


def resolve_weights(info: ExportInfo, weights: str | None = None, pretrained: bool = False,
                    onnx_path: str | None = None) -> tuple[str | None, bool]:
    """Pick the weights for the PyTorch side.

    In order: ``weights`` if given; timm's pretrained weights if ``pretrained`` or if the graph was
    exported from them; else the file recorded at export (relative to ``onnx_path``'s folder).
    The pretrained file's sha256 is checked after loading (:func:`check_weights`).

    Returns:
        ``(weights file or None, pretrained)`` for :func:`dsm_export.core.models.create_model`.

    Raises:
        DSMError: if none is available, the file is missing, or its sha256 differs from the file
            the graph was exported from (for a graph exported from timm's pretrained weights a local
            file only warns: its format may differ; the parity check judges the values).
    """
    if weights:
        path = weights
    elif pretrained or info.pretrained:
        return None, True
    else:
        path = weights_path(info, onnx_path or ".") if info.weights else ""
        if not path:
            raise DSMError(
                "the graph was exported from randomly initialised weights; PyTorch cannot rebuild them "
                "(export with --weights or --pretrained to validate)")
    if not os.path.isfile(path):
        raise DSMError(f"weights file {path!r} does not exist (pass --weights or --pretrained)")
    if info.weights_sha256 and sha256_file(path) != info.weights_sha256:
        if info.pretrained:
            # Exported from timm's cached file, validated against a local file: the bytes (format)
            # may differ for the same weights; the parity check judges the values.
            warnings.warn(f"weights {path!r} are another file than the timm pretrained weights the graph "
                          f"was exported from (sha256 {info.weights_sha256[:12]}...)", stacklevel=2)
        else:
            raise DSMError(
                f"weights {path!r} are not the ones the graph was exported from "
                f"(sha256 {info.weights_sha256[:12]}...)")
    return path, False


def check_weights(info: ExportInfo, model: torch.nn.Module, pretrained: bool) -> None:
    """Check that timm's pretrained file behind ``model`` is the one the graph was exported from.

    A graph exported from a local file and validated with ``--pretrained`` only warns on a
    mismatch (another file may hold the same weights; the parity check judges them).

    Raises:
        DSMError: on a sha256 mismatch with the cached file a ``--pretrained`` export recorded.
    """
    if not pretrained or not info.weights_sha256:
        return
    path = pretrained_file(model)
    if path and sha256_file(path) != info.weights_sha256:
        if not info.pretrained:
            # Exported from a local file, validated against timm's: another file for possibly the
            # same weights; the parity check judges the values.
            warnings.warn(f"timm's pretrained weights for {info.model} are another file than the weights "
                          f"the graph was exported from (sha256 {info.weights_sha256[:12]}...)", stacklevel=2)
            return
        raise DSMError(f"timm's pretrained weights for {info.model} ({path}) are not the ones the graph "
                       f"was exported from (sha256 {info.weights_sha256[:12]}...)")


def collect_logits(runner, model, merged, images, transform, batch_size: int, progress: bool) -> Logits:
    """Run the graph, the merged reference and the unmerged model over all images."""
    graph, ref, base = [], [], []
    batches = iter_batches(images, transform, batch_size)
    bar = tqdm(batches, total=-(-len(images) // batch_size), desc="validate", unit="batch",
               disable=not progress, leave=False)
    with torch.inference_mode():
        for _, pixels in bar:
            graph.append(np.asarray(runner(pixels.numpy()), dtype=np.float32))
            ref.append(merged(pixels).float().numpy())
            base.append(model(pixels).float().numpy())
    return Logits(np.concatenate(graph), np.concatenate(ref), np.concatenate(base))


@dataclass(frozen=True)
class ValidateOptions:
    """What the PyTorch side of a validation is and how it is judged.

    Attributes:
        weights, model_name, schedule: override what the engine's metadata says.
        atol: tolerance on the max absolute logit difference against PyTorch-with-schedule (fp32
            classifiers).
        batch_size: images per batch.
        limit: validate on the first ``limit`` images only (a folder given by name).
        progress: show a progress bar.
        precision: the criterion: ``fp32``, ``fp16`` (:data:`FP16_MEDIAN_ATOL`,
            :data:`FP16_MIN_TOP1_MATCH`; embeddings :data:`FP16_COSINE_ATOL`), ``bf16``
            (:data:`BF16_MIN_TOP1_MATCH`, :data:`BF16_MAX_KL`; embeddings as fp16) or ``int8``
            (:data:`INT8_MIN_TOP1_MATCH`, :data:`INT8_MAX_KL`); None: the runner's ``judged_as``.
        pretrained: rebuild the PyTorch model from timm's pretrained weights of the model name.
        source_path: the engine's file; a relative weights path in the metadata is taken from its folder.
        attn_implementation: a Hugging Face model's attention implementation in the reference
            (``eager`` or ``sdpa``; None: transformers' default); ignored for timm models.
    """

    weights: str | None = None
    model_name: str | None = None
    schedule: Schedule | str | None = None
    atol: float = DEFAULT_ATOL
    batch_size: int = 32
    limit: int | None = None
    progress: bool = True
    precision: str | None = None
    pretrained: bool = False
    source_path: str | None = None
    attn_implementation: str | None = None

    def check(self) -> None:
        """Raises DSMError on a batch size below 1, a non-positive atol or an unknown precision."""
        if self.batch_size < 1:
            raise DSMError(f"batch size must be at least 1, got {self.batch_size}")
        if self.atol <= 0:
            raise DSMError(f"atol must be positive, got {self.atol}")
        if self.precision not in (None, *CRITERIA):
            raise DSMError(f"precision {self.precision!r}: choose one of {', '.join(CRITERIA)}")
        if self.attn_implementation not in (None, *ATTN_IMPLEMENTATIONS):
            raise DSMError(f"attention implementation {self.attn_implementation!r}: choose one of "
                           f"{', '.join(ATTN_IMPLEMENTATIONS)}")


@dataclass
class Reference:
    """The PyTorch side of a validation: the model (timm, or rebuilt from Hugging Face), the same
    schedule's reference form, and the unmerged forward compared against (for a Hugging Face model
    both run its own modules: :class:`~dsm_export.core.hf_reference.HFMergedReference`)."""

    name: str
    schedule: Schedule
    model: torch.nn.Module
    merged: torch.nn.Module
    unmerged: torch.nn.Module | None = None
    kind: str = ""  # for a Hugging Face model: its class and attention implementation

    def __post_init__(self):
        if self.unmerged is None:
            self.unmerged = self.model


def reference_models(info: ExportInfo, options: ValidateOptions) -> Reference:
    """Rebuild the PyTorch model an engine was exported from, checked against the engine's metadata.

    Raises:
        DSMError: missing or mismatched weights, another input size or output kind than the engine's.
    """
    name = options.model_name or info.model
    schedule = options.schedule
    if isinstance(schedule, str):
        schedule = Schedule.parse(schedule)
    schedule = schedule or info.schedule
    path, use_pretrained = resolve_weights(info, options.weights, options.pretrained, options.source_path)
    if is_hf_name(name):
        model = create_hf_model(name, path, pretrained=use_pretrained, num_classes=info.num_classes,
                                attn_implementation=options.attn_implementation,
                                output=info.output)
    else:
        model = create_model(name, path, pretrained=use_pretrained, num_classes=info.num_classes)
    check_weights(info, model, use_pretrained and not options.model_name)
    if tuple(input_size(model)) != tuple(info.input_size):
        c, h, w = info.input_size
        _, mh, mw = input_size(model)
        raise DSMError(f"the graph takes {h}x{w} inputs but {name} takes {mh}x{mw}")
    if is_embedding_model(model) != info.embeddings:
        raise DSMError(f"the graph outputs {info.output} but {name} (num_classes "
                       f"{model.num_classes}) does not: pass the export's --num-classes")
    merged = merged_reference(model, schedule, name)
    if not is_hf_name(name):
        return Reference(name, schedule, model, merged)
    impl = getattr(model.hf_model.config, "_attn_implementation", None) or "eager"
    kind = f"Hugging Face {model.hf_spec.architecture}, its own modules, {impl} attention"
    return Reference(name, schedule, model, merged, merged_reference(model, "none", name), kind)


def validate_runner(runner: Callable[[np.ndarray], np.ndarray], info: ExportInfo, images_dir: str | ImageSet,
                    options: ValidateOptions | None = None, **overrides) -> dict:
    """Compare any graph runner with PyTorch over an image folder (see module docstring).

    Args:
        runner: ``[B, 3, H, W]`` float32 numpy -> ``[B, classes]`` logits (or ``[B, dim]`` embeddings);
            a :class:`~dsm_export.engines.registry.Runner` gives its ``judged_as`` as the precision.
        info: the graph's dsm-export metadata (model, schedule, weights, input size, output kind).
        images_dir: folder of images, optionally with ``labels.csv``; or an already listed (and
            checked, see :func:`dsm_export.checks.readable_images`) :class:`~dsm_export.data.ImageSet`.
        options: :class:`ValidateOptions`; ``overrides``: its fields by name instead.

    Returns:
        The report. Always: ``model``, ``schedule``, ``images``, ``output`` (``logits`` or
        ``embeddings``), ``gflops``, ``baseline_gflops``, ``flops_ratio``, ``criterion``, ``passed``,
        ``precision``. Classifiers: ``max_abs_diff``, ``median_abs_diff``, ``top1_match_pytorch``
        (fraction), ``top1_mismatches``, ``top1_agreement``, ``kl`` (mean, nats), ``kl_to_pytorch``,
        ``top1_accuracy`` and ``baseline_top1_accuracy`` (None for unlabelled folders), ``atol``.
        Embeddings: ``cosine`` = ``{"pytorch": {"min", "mean"}, "unmerged": {"min", "mean"}, "knn_k",
        "knn_overlap_pytorch", "knn_overlap_unmerged", "tolerance"}`` and ``max_abs_diff``.

    Raises:
        DSMError: bad folder, weights, model name, schedule or options; an input size other than the model's.
    """
    options = replace(options or ValidateOptions(), **overrides)
    options.check()
    precision = options.precision or getattr(runner, "judged_as", "fp32")
    images = images_dir if isinstance(images_dir, ImageSet) else list_images(images_dir, options.limit)
    ref = reference_models(info, options)
    logits = collect_logits(runner, ref.unmerged, ref.merged, images, eval_transform(ref.model), options.batch_size,
                            options.progress)
    return logits_report(logits, ref, info, images, options, precision)


def logits_report(logits: Logits, ref: Reference, info: ExportInfo, images: ImageSet, options: ValidateOptions,
                  precision: str) -> dict:
    """The report of :func:`validate_runner` from the collected outputs (wherever they were run).

    Raises:
        DSMError: the graph's output size differs from the PyTorch model's.
    """
    if logits.graph.shape != logits.merged.shape:
        raise DSMError(f"the graph outputs {logits.graph.shape[1:]} per image but {ref.name} gives "
                       f"{logits.merged.shape[1:]}")
    flops, base_flops, _ = schedule_flops(ref.model, ref.schedule, info.last_block)
    per_image = np.abs(logits.graph - logits.merged).reshape(len(logits.graph), -1).max(-1)
    report = {
        "model": ref.name, "schedule": ref.schedule.spec(), "images": len(images), "output": info.output,
        "max_abs_diff": float(per_image.max()), "median_abs_diff": float(np.median(per_image)),
        # a photo this far off merged other tokens: a near-tie in the matching scores that the two
        # frameworks' float rounding ordered differently (research/tie_flips.py counts them)
        "images_over_1e-3": int((per_image > 1e-3).sum()),
        "precision": precision, "gflops": flops / 1e9, "baseline_gflops": base_flops / 1e9,
        "flops_ratio": base_flops / flops,
    }
    if ref.kind:
        report["reference"] = ref.kind
    if info.embeddings:
        base = None
        if logits.graph.ndim == 3:  # last_hidden_state: parity on every token, the summary against unmerged
            logits, base, report["unmerged_compared_on"] = hidden_state_view(logits, ref.model)
        report.update(_embedding_report(logits, precision in ("fp16", "bf16"), base))
        return report
    match = logits.graph.argmax(-1) == logits.merged.argmax(-1)
    report.update({
        "top1_match_pytorch": float(match.mean()), "top1_mismatches": int((~match).sum()),
        "logit_std": float(np.std(logits.merged)),  # the scale max_abs_diff is read against
        "kl_to_pytorch": float(kl_divergence(logits.merged, logits.graph).mean()),
        **agreement_metrics(logits.graph, logits.unmerged, images.labels), "atol": options.atol,
    })
    if images.labels is None:
        report["top1_accuracy"] = None
        report["baseline_top1_accuracy"] = None
    report["criterion"], report["passed"] = CRITERIA[precision](report, bool(match.all()))
    return report


def _fp32_criterion(report: dict, all_match: bool) -> tuple[str, bool]:
    atol = report["atol"]
    return (f"fp32: max |dlogit| <= {atol:g} and top-1 equal on every image",
            bool(report["max_abs_diff"] <= atol and all_match))


def _fp16_criterion(report: dict, all_match: bool) -> tuple[str, bool]:
    # fp16 engines: a near-tie in the matching may merge other tokens than fp32 does on a few
    # images, so the criterion is on the typical image and on top-1, not on the worst logit.
    return (f"fp16: median per-image max |dlogit| <= {FP16_MEDIAN_ATOL}, top-1 match >= {FP16_MIN_TOP1_MATCH:.0%}",
            bool(report["median_abs_diff"] <= FP16_MEDIAN_ATOL and report["top1_match_pytorch"] >= FP16_MIN_TOP1_MATCH))


def _bf16_criterion(report: dict, all_match: bool) -> tuple[str, bool]:
    return (f"bf16: top-1 match with PyTorch-with-schedule >= {BF16_MIN_TOP1_MATCH:.0%}, KL to it <= {BF16_MAX_KL}",
            bool(report["top1_match_pytorch"] >= BF16_MIN_TOP1_MATCH and report["kl_to_pytorch"] <= BF16_MAX_KL))


def _int8_criterion(report: dict, all_match: bool) -> tuple[str, bool]:
    # INT8 engines: quantization moves every logit; judged by agreement with and KL to the fp32
    # model with the same schedule, not by the worst logit.
    return (f"int8: top-1 match with PyTorch-with-schedule >= {INT8_MIN_TOP1_MATCH:.0%}, KL to it <= {INT8_MAX_KL}",
            bool(report["top1_match_pytorch"] >= INT8_MIN_TOP1_MATCH and report["kl_to_pytorch"] <= INT8_MAX_KL))


# A classifier's criterion per precision: (report, top-1 equal on every image) -> (text, passed).
CRITERIA = {"fp32": _fp32_criterion, "fp16": _fp16_criterion, "bf16": _bf16_criterion, "int8": _int8_criterion}


def hidden_state_view(logits: Logits, model: torch.nn.Module) -> tuple[Logits, tuple, str]:
    """``last_hidden_state`` outputs (``[images, tokens, dim]``) as the embedding report reads them:
    graph and reference flattened to ``[images, tokens * dim]`` (the tokens come in the same order from
    both: the merges are the same), and, against the unmerged model (more tokens), one summary row
    each: the class token, or without one the mean token (sizes are not an output: approximate).

    Returns:
        ``(flattened Logits, (graph summary, unmerged summary), what the summary is)``.
    """
    n = len(logits.graph)
    if getattr(model, "cls_token", None) is not None:
        pair, what = (logits.graph[:, 0], logits.unmerged[:, 0]), "the class token"
    else:
        pair, what = (logits.graph.mean(axis=1), logits.unmerged.mean(axis=1)), "the mean token (unweighted)"
    flat = Logits(logits.graph.reshape(n, -1), logits.merged.reshape(n, -1), logits.unmerged[:, 0])
    return flat, pair, what


def _embedding_report(logits: Logits, fp16: bool, base: tuple | None = None) -> dict:
    """The cosine / retrieval part of an embedding model's report (see :func:`validate_runner`);
    ``base``: ``(graph, unmerged)`` rows to compare with the unmerged model, if not the outputs."""
    graph_row, unmerged_row = base if base is not None else (logits.graph, logits.unmerged)
    to_ref = cosine_similarity(logits.graph, logits.merged)
    to_base = cosine_similarity(graph_row, unmerged_row)
    k = min(KNN_K, len(to_ref) - 1)
    overlap_ref = knn_overlap(logits.graph, logits.merged, KNN_K)
    overlap_base = knn_overlap(graph_row, unmerged_row, KNN_K)
    if fp16:
        criterion = (f"fp16: median 1 - cosine to PyTorch with schedule <= {FP16_COSINE_ATOL:g}, "
                     f"retrieval overlap@{k} >= {FP16_MIN_KNN_OVERLAP:.0%}")
        passed = float(np.median(1 - to_ref)) <= FP16_COSINE_ATOL and overlap_ref >= FP16_MIN_KNN_OVERLAP
    else:
        criterion = (f"fp32: 1 - cosine to PyTorch with schedule <= {COSINE_ATOL:g} on every image, "
                     f"retrieval overlap@{k} >= {MIN_KNN_OVERLAP:.0%}")
        passed = float((1 - to_ref).max()) <= COSINE_ATOL and overlap_ref >= MIN_KNN_OVERLAP
    return {
        "cosine": {
            "pytorch": {"min": float(to_ref.min()), "mean": float(to_ref.mean())},
            "unmerged": {"min": float(to_base.min()), "mean": float(to_base.mean())},
            "knn_k": k,
            "knn_overlap_pytorch": overlap_ref,
            "knn_overlap_unmerged": overlap_base,
            "tolerance": COSINE_ATOL if not fp16 else FP16_COSINE_ATOL,
        },
        "criterion": criterion,
        "passed": bool(passed),
    }


def validate(path: str, images_dir: str | ImageSet, runner_options: RunnerOptions | None = None,
             **kwargs) -> dict:
    """Validate an engine of any registered backend against PyTorch (``dsm-export validate``): the
    backend that claims the file's suffix opens a runner on it (:func:`dsm_export.engines.registry.open_runner`),
    judged by the precision it runs at (an OpenVINO bf16 IR on a CPU without BF16 runs f32: the fp32
    criterion). The rest as for :func:`validate_runner`; the report adds ``engine`` (the backend),
    ``runtime`` (the runner's label) and, for OpenVINO, ``inference_precision``.

    Args:
        path: the engine file (its metadata names the model, schedule and weights).
        images_dir: as for :func:`validate_runner`.
        runner_options: threads, ONNX Runtime provider, TensorRT flavour and runtime cache.
        **kwargs: :class:`ValidateOptions` fields.

    Raises:
        DSMError: a foreign or corrupt file, an unavailable runtime or provider, no GPU for a GPU
            engine, and everything :func:`validate_runner` raises.
    """
    runner = open_runner(path, runner_options)
    try:
        kwargs.setdefault("source_path", runner.engine_file.source_path)
        report = validate_runner(runner, runner.engine_file.info, images_dir, **kwargs)
    finally:
        runner.close()
    report["engine"] = runner.engine_file.backend
    report["runtime"] = runner.label
    if getattr(runner, "inference_precision", None):
        report["inference_precision"] = runner.inference_precision
    return report
