"""Parity and accuracy report of an exported graph against PyTorch.

For every image the graph's logits are compared with (a) the PyTorch model running the same
schedule with the *reference* merge implementation (ToMe's scatter merges, SDPA attention), and
(b) the unmerged PyTorch model. The graph passes when its logits are within ``atol`` of (a) and its
top-1 class equals (a)'s on every image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .data import ImageSet, eval_transform, iter_batches, list_images
from .errors import DSMError
from .export import ExportInfo, load_onnx, read_metadata
from .flops import schedule_flops
from .models import create_model, sha256_file
from .patch import apply, input_size
from .schedule import Schedule

DEFAULT_ATOL = 1e-4  # fp32 logits
FP16_MEDIAN_ATOL = 0.1  # fp16 engines: median over images of the max |logit difference|
FP16_MIN_TOP1_MATCH = 0.98  # fp16 engines: top-1 equal to PyTorch-with-schedule on this fraction


@dataclass
class Logits:
    """Logits collected over an image set, ``[images, classes]`` float32 each."""

    graph: np.ndarray
    merged: np.ndarray
    unmerged: np.ndarray


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """Per-image ``KL(softmax(p) || softmax(q))`` in nats, computed in float64.

    Args:
        p_logits, q_logits: ``[images, classes]``; p is the reference (the unmerged model).

    Returns:
        ``[images]``.
    """
    p = torch.from_numpy(np.asarray(p_logits, dtype=np.float64)).log_softmax(-1)
    q = torch.from_numpy(np.asarray(q_logits, dtype=np.float64)).log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).numpy()


def agreement_metrics(logits: np.ndarray, unmerged: np.ndarray, labels=None) -> dict:
    """Top-1 agreement with and mean KL to the unmerged model, plus accuracy if labels are given."""
    top, base_top = logits.argmax(-1), unmerged.argmax(-1)
    out = {
        "top1_agreement": float((top == base_top).mean()),
        "kl": float(kl_divergence(unmerged, logits).mean()),
    }
    if labels is not None:
        labels = np.asarray(labels)
        out["top1_accuracy"] = float((top == labels).mean())
        out["baseline_top1_accuracy"] = float((base_top == labels).mean())
    return out


def onnx_runner(path: str, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """An ONNX Runtime CPU runner for ``path``: ``[B, 3, H, W]`` float32 -> ``[B, classes]``.

    A graph with a static batch axis is fed in chunks of that size, the last one padded.

    Raises:
        DSMError: if ONNX Runtime cannot load the file.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several types for bad files
        raise DSMError(f"ONNX Runtime cannot load {path!r}: {str(exc).splitlines()[0]}") from None
    inp = session.get_inputs()[0]
    static = inp.shape[0] if isinstance(inp.shape[0], int) else None
    return batched_runner(lambda x: session.run(None, {inp.name: x})[0], static)


def batched_runner(run: Callable[[np.ndarray], np.ndarray], static_batch: int | None):
    """Wrap ``run`` so that a graph with a fixed batch size takes any number of images."""

    def runner(x: np.ndarray) -> np.ndarray:
        if static_batch is None:
            return run(np.ascontiguousarray(x, dtype=np.float32))
        outs = []
        for start in range(0, len(x), static_batch):
            chunk = x[start:start + static_batch]
            n = len(chunk)
            if n < static_batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], static_batch - n, axis=0)])
            outs.append(run(np.ascontiguousarray(chunk, dtype=np.float32))[:n])
        return np.concatenate(outs)

    return runner


def resolve_weights(info: ExportInfo, weights: str | None) -> str:
    """Pick the weights for the PyTorch side: ``weights`` if given, else the path stored at export.

    Raises:
        DSMError: if none is available, or if the file's sha256 differs from the exported one.
    """
    path = weights or info.weights
    if not path:
        raise DSMError(
            "the graph was exported from randomly initialised weights; PyTorch cannot rebuild them "
            "(export with --weights to validate)")
    if not os.path.isfile(path):
        raise DSMError(f"weights file {path!r} does not exist (pass --weights)")
    if info.weights_sha256 and sha256_file(path) != info.weights_sha256:
        raise DSMError(
            f"weights {path!r} are not the ones the graph was exported from "
            f"(sha256 {info.weights_sha256[:12]}...)")
    return path


def collect_logits(runner, model, merged, images, transform, batch_size: int, progress: bool) -> Logits:
    """Run the graph, the merged reference and the unmerged model over all images."""
    from tqdm import tqdm

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


def validate_runner(
    runner: Callable[[np.ndarray], np.ndarray],
    info: ExportInfo,
    images_dir: str | ImageSet,
    weights: str | None = None,
    model_name: str | None = None,
    schedule: Schedule | str | None = None,
    atol: float = DEFAULT_ATOL,
    batch_size: int = 32,
    limit: int | None = None,
    progress: bool = True,
    fp16: bool = False,
) -> dict:
    """Compare any graph runner with PyTorch over an image folder (see module docstring).

    Args:
        runner: ``[B, 3, H, W]`` float32 numpy -> ``[B, classes]`` logits.
        info: the graph's dsm-export metadata (model, schedule, weights, input size).
        images_dir: folder of images, optionally with ``labels.csv``; or an already listed (and
            checked, see :func:`dsm_export.checks.readable_images`) :class:`~dsm_export.data.ImageSet`.
        weights, model_name, schedule: override what the metadata says.
        atol: tolerance on the max absolute logit difference against PyTorch-with-schedule.
        batch_size: images per batch.
        limit: validate on the first ``limit`` images only (a folder given by name).
        progress: show a progress bar.
        fp16: judge by the fp16 criterion (:data:`FP16_MEDIAN_ATOL`, :data:`FP16_MIN_TOP1_MATCH`).

    Returns:
        The report: ``max_abs_diff``, ``top1_match_pytorch`` (fraction), ``top1_mismatches``,
        ``top1_agreement``, ``kl`` (mean, nats), ``top1_accuracy`` and ``baseline_top1_accuracy``
        (labelled folders only), ``gflops``, ``baseline_gflops``, ``flops_ratio``, ``images``,
        ``atol``, ``passed``, ``model``, ``schedule``.

    Raises:
        DSMError: bad folder, weights, model name or schedule; an input size other than the model's.
    """
    if batch_size < 1:
        raise DSMError(f"batch size must be at least 1, got {batch_size}")
    if atol <= 0:
        raise DSMError(f"atol must be positive, got {atol}")
    name = model_name or info.model
    if isinstance(schedule, str):
        schedule = Schedule.parse(schedule)
    schedule = schedule or info.schedule
    images = images_dir if isinstance(images_dir, ImageSet) else list_images(images_dir, limit)
    model = create_model(name, resolve_weights(info, weights))
    if tuple(input_size(model)) != tuple(info.input_size):
        c, h, w = info.input_size
        _, mh, mw = input_size(model)
        raise DSMError(f"the graph takes {h}x{w} inputs but {name} takes {mh}x{mw}")
    merged = apply(model, schedule, impl="reference", name=name).eval()
    logits = collect_logits(runner, model, merged, images, eval_transform(model), batch_size, progress)

    per_image = np.abs(logits.graph - logits.merged).max(-1)
    diff = float(per_image.max())
    match = logits.graph.argmax(-1) == logits.merged.argmax(-1)
    flops, base_flops, _ = schedule_flops(model, schedule)
    report = {
        "model": name,
        "schedule": schedule.spec(),
        "images": len(images),
        "max_abs_diff": diff,
        "top1_match_pytorch": float(match.mean()),
        "top1_mismatches": int((~match).sum()),
        "median_abs_diff": float(np.median(per_image)),
        **agreement_metrics(logits.graph, logits.unmerged, images.labels),
        "gflops": flops / 1e9,
        "baseline_gflops": base_flops / 1e9,
        "flops_ratio": base_flops / flops,
        "atol": atol,
    }
    if images.labels is None:
        report["top1_accuracy"] = None
        report["baseline_top1_accuracy"] = None
    if fp16:
        # fp16 engines: a near-tie in the matching may merge other tokens than fp32 does on a few
        # images, so the criterion is on the typical image and on top-1, not on the worst logit.
        report["criterion"] = (f"fp16: median per-image max |dlogit| <= {FP16_MEDIAN_ATOL}, "
                               f"top-1 match >= {FP16_MIN_TOP1_MATCH:.0%}")
        report["passed"] = bool(report["median_abs_diff"] <= FP16_MEDIAN_ATOL
                                and report["top1_match_pytorch"] >= FP16_MIN_TOP1_MATCH)
    else:
        report["criterion"] = f"fp32: max |dlogit| <= {atol:g} and top-1 equal on every image"
        report["passed"] = bool(diff <= atol and match.all())
    return report


def validate(onnx_path: str, images_dir: str | ImageSet, threads: int | None = None, **kwargs) -> dict:
    """Validate an exported ONNX file with ONNX Runtime (CPU); see :func:`validate_runner`.

    Raises:
        DSMError: corrupt or foreign ONNX file, and everything :func:`validate_runner` raises.
    """
    model = load_onnx(onnx_path)
    info = read_metadata(model, onnx_path)
    precision = {p.key: p.value for p in model.metadata_props}.get("dsm.precision", "fp32")
    kwargs.setdefault("fp16", precision == "fp16")
    return validate_runner(onnx_runner(onnx_path, threads), info, images_dir, **kwargs)


def validate_engine(plan_path: str, images_dir: str | ImageSet, **kwargs) -> dict:
    """Validate a TensorRT engine built by ``dsm-export build`` (needs tensorrt and a GPU)."""
    from .engines import TensorRTRunner, engine_info

    info, sidecar = engine_info(plan_path)
    runner = TensorRTRunner(plan_path)
    kwargs.setdefault("fp16", sidecar.get("precision") == "fp16")
    return validate_runner(runner, info, images_dir, **kwargs)
