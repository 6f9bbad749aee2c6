"""Accuracy of merge schedules in PyTorch: KL to and top-1 agreement with the unmerged model.

Used to compare and tune schedules. Images are preprocessed once (timm's eval transform) and the
unmerged logits computed once; each schedule then costs one forward pass over the images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data import ImageSet, eval_transform, load_batch
from .flops import schedule_flops
from .patch import apply
from .schedule import Schedule
from .validate import agreement_metrics


def load_pixels(images: ImageSet, model: nn.Module, progress: bool = False) -> torch.Tensor:
    """All images through the model's eval transform: ``[N, 3, H, W]`` float32."""
    from tqdm import tqdm

    transform = eval_transform(model)
    idx = range(len(images))
    return torch.stack([load_batch(images, [i], transform)[0]
                        for i in tqdm(idx, desc="load images", disable=not progress, leave=False)])


@torch.inference_mode()
def model_logits(module: nn.Module, pixels: torch.Tensor, batch_size: int = 50) -> np.ndarray:
    """Logits ``[N, classes]`` float32 of ``module`` over ``pixels`` ``[N, 3, H, W]``."""
    return np.concatenate([module(pixels[i:i + batch_size]).float().numpy()
                           for i in range(0, len(pixels), batch_size)])


def flops_ratio(model: nn.Module, schedule: Schedule) -> float:
    """Unmerged FLOPs over the FLOPs under ``schedule`` (analytic, see :mod:`dsm_export.flops`).

    Raises:
        ScheduleError: if the schedule does not fit the model.
    """
    merged, base, _ = schedule_flops(model, schedule)
    return base / merged


def schedule_metrics(model: nn.Module, schedule: Schedule, pixels: torch.Tensor, base_logits: np.ndarray,
                     labels=None, batch_size: int = 50) -> dict:
    """Evaluate one schedule (PyTorch reference implementation).

    Args:
        model: the unmerged timm ViT (eval mode).
        schedule: the schedule.
        pixels: ``[N, 3, H, W]`` preprocessed images.
        base_logits: ``[N, classes]`` logits of the unmerged model on ``pixels``.
        labels: ``[N]`` class indices, or None.

    Returns:
        ``{"schedule", "flops_ratio", "kl", "top1_agreement"[, "top1_accuracy",
        "baseline_top1_accuracy"]}``.
    """
    logits = model_logits(apply(model, schedule).eval(), pixels, batch_size)
    return {"schedule": schedule.spec(), "flops_ratio": flops_ratio(model, schedule),
            **agreement_metrics(logits, base_logits, labels)}
