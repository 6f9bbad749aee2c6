"""Accuracy of merge schedules in PyTorch: KL to and top-1 agreement with the unmerged model
(classifiers), or mean 1 - cosine similarity to and retrieval overlap@k with it (embedding models,
timm ``num_classes=0``). Both carry the generic keys ``divergence`` and ``agreement``.

Used to compare and tune schedules. Images are preprocessed once (timm's eval transform) and the
unmerged logits computed once; each schedule then costs one forward pass over the images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..data import ImageSet, eval_transform, load_batch, split_calibration
from ..core.flops import schedule_flops
from ..core.patch import apply
from ..core.schedule import Schedule
from ..core.models import is_embedding_model
from ..metrics import output_metrics


def load_pixels(images: ImageSet, model: nn.Module, progress: bool = False) -> torch.Tensor:
    """All images through the model's eval transform: ``[N, 3, H, W]`` float32."""
    transform = eval_transform(model)
    idx = range(len(images))
    return torch.stack([load_batch(images, [i], transform)[0]
                        for i in tqdm(idx, desc="load images", disable=not progress, leave=False)])


def split_pixels(model: nn.Module, images: ImageSet, calibration: int, holdout: int | None = None,
                 progress: bool = False):
    """The calibration and held-apart photos of ``tune --calibration N``, preprocessed.

    Returns:
        ``(calib, held, calib_pixels, held_pixels)``: the two :class:`ImageSet` splits (held-apart
        cut to its first ``holdout`` photos if given) and their ``[N, 3, H, W]`` pixels.
    """
    calib, held = split_calibration(images, calibration)
    if holdout:
        held = held.subset(range(min(holdout, len(held))))
    return calib, held, load_pixels(calib, model, progress), load_pixels(held, model, progress)


@torch.inference_mode()
def model_logits(module: nn.Module, pixels: torch.Tensor, batch_size: int = 50) -> np.ndarray:
    """Outputs ``[N, classes]`` (or ``[N, dim]`` embeddings) float32 of ``module`` over ``pixels``
    ``[N, 3, H, W]``."""
    return np.concatenate([module(pixels[i:i + batch_size]).float().numpy()
                           for i in range(0, len(pixels), batch_size)])


def flops_ratio(model: nn.Module, schedule: Schedule, last_block: str | None = None) -> float:
    """timm's unmerged FLOPs over the FLOPs under ``schedule`` (analytic, see :mod:`dsm_export.core.flops`;
    ``last_block`` as for :func:`dsm_export.core.flops.schedule_flops`).

    Raises:
        ScheduleError: if the schedule does not fit the model.
    """
    merged, base, _ = schedule_flops(model, schedule, last_block)
    return base / merged


def schedule_metrics(model: nn.Module, schedule: Schedule, pixels: torch.Tensor, base_logits: np.ndarray,
                     labels=None, batch_size: int = 50) -> dict:
    """Evaluate one schedule (PyTorch reference implementation).

    Args:
        model: the unmerged timm ViT (eval mode).
        schedule: the schedule.
        pixels: ``[N, 3, H, W]`` preprocessed images.
        base_logits: ``[N, classes]`` logits (or ``[N, dim]`` embeddings) of the unmerged model.
        labels: ``[N]`` class indices, or None (ignored for embedding models).

    Returns:
        ``{"schedule", "flops_ratio", "divergence", "agreement", ...}``; classifiers add ``kl``,
        ``top1_agreement`` (and ``top1_accuracy``, ``baseline_top1_accuracy`` with labels), embedding
        models ``cosine_distance``, ``min_cosine``, ``mean_cosine``, ``knn_overlap``, ``knn_k``
        (see :func:`dsm_export.check.validate.output_metrics`).
    """
    logits = model_logits(apply(model, schedule).eval(), pixels, batch_size)
    return {"schedule": schedule.spec(), "flops_ratio": flops_ratio(model, schedule),
            **output_metrics(logits, base_logits, labels, embeddings=is_embedding_model(model))}


def bootstrap_interval(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-photo values (Efron and Tibshirani, "An
    Introduction to the Bootstrap", 1993, Ch. 13): the photos are resampled with replacement
    ``resamples`` times and the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the
    resampled means returned.

    For a paired comparison of two schedules on the same photos, pass the per-photo differences
    (e.g. KL of one minus KL of the other): the photos' shared difficulty then cancels.

    Args:
        values: ``[N]`` per-photo values, e.g. KL in nats or top-1 agreement as 0/1.
        level: coverage, in (0, 1).
        resamples: bootstrap resamples, at least 100.
        seed: NumPy generator seed (the same seed gives the same interval).

    Returns:
        ``(low, high)``.

    Raises:
        ValueError: if ``values`` is empty or not one-dimensional, ``level`` is outside (0, 1), or
            ``resamples`` is below 100.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty [N] array, got shape {v.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if resamples < 100:
        raise ValueError(f"resamples must be at least 100, got {resamples}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def divergence_name(model: nn.Module) -> str:
    """What ``divergence`` measures for this model: ``KL`` or ``1 - cosine``."""
    return "1 - cosine" if is_embedding_model(model) else "KL"
