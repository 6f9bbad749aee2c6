"""Merged-token groups drawn over the image, as in ToMe's visualisation (Bolya et al. 2023, Fig. 4).

Each token after a block stands for a group of patches; every group gets its own colour, blended
over the image the model sees (timm's eval resize and crop), with group boundaries drawn.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data import eval_transform, load_image
from ..engines.registry import import_optional
from ..errors import DSMError
from ..fileio import atomic_path
from ..core.patch import apply
from ..core.schedule import Schedule


def merge_groups(model: nn.Module, schedule: Schedule, pixels: torch.Tensor, blocks: list[int]) -> dict[int, np.ndarray]:
    """Which token each patch belongs to after each of ``blocks``.

    Args:
        model: timm ViT (eval mode).
        schedule: merge schedule.
        pixels: ``[1, 3, H, W]`` preprocessed image.
        blocks: block indices (0-based).

    Returns:
        ``{block: [rows, cols] int array}`` of token indices (patch tokens only).

    Raises:
        DSMError: if a block index is out of range.
    """
    merged = apply(model, schedule).eval()
    depth = len(model.blocks)
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise DSMError(f"block {bad[0]} out of range: the model has blocks 0..{depth - 1}")
    merged.track_source = True
    with torch.inference_mode():
        merged(pixels)
    gh, gw = merged.grid
    out = {}
    for b in blocks:
        source = merged.sources[b][0]  # [tokens, patches]
        out[b] = source.argmax(0).reshape(gh, gw).numpy()
    return out


def display_image(model: nn.Module, path: str) -> tuple[torch.Tensor, np.ndarray]:
    """The preprocessed ``[1, 3, H, W]`` tensor and the same crop as an ``[H, W, 3]`` float RGB array."""
    transform = eval_transform(model)
    pixels = transform(load_image(path)).unsqueeze(0)
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(3, 1, 1)
    rgb = (pixels[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return pixels, rgb


def overlay(rgb: np.ndarray, groups: np.ndarray, seed: int = 0) -> np.ndarray:
    """Blend one random colour per group over ``rgb`` ``[H, W, 3]`` and draw group boundaries."""
    h, w, _ = rgb.shape
    gh, gw = groups.shape
    per_pixel = np.kron(groups, np.ones((h // gh, w // gw), dtype=groups.dtype))
    colours = np.random.default_rng(seed).uniform(0, 1, size=(int(groups.max()) + 1, 3))
    out = 0.45 * rgb + 0.55 * colours[per_pixel]
    edge = np.zeros((h, w), dtype=bool)
    edge[:, 1:] |= per_pixel[:, 1:] != per_pixel[:, :-1]
    edge[1:, :] |= per_pixel[1:, :] != per_pixel[:-1, :]
    out[edge] = 1.0
    return out


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display).

    Raises:
        DSMError: matplotlib is not installed (the ``tune`` extra).
    """
    import_optional("matplotlib", "tune").use("Agg")
    return import_optional("matplotlib.pyplot", "tune")


def visualize(model: nn.Module, schedule: Schedule, image: str, blocks: list[int], output: str) -> dict[int, int]:
    """Write a PNG: the image, then the merged groups after each of ``blocks``.

    Returns:
        ``{block: number of patch-token groups}``.

    Raises:
        DSMError: unreadable image, bad block index, or missing output folder.
    """
    plt = pyplot()
    pixels, rgb = display_image(model, image)
    groups = merge_groups(model, schedule, pixels, blocks)
    fig, axes = plt.subplots(1, len(blocks) + 1, figsize=(3 * (len(blocks) + 1), 3.3))
    axes[0].imshow(rgb)
    axes[0].set_title("input")
    counts = {}
    for ax, b in zip(axes[1:], blocks):
        counts[b] = len(np.unique(groups[b]))
        ax.imshow(overlay(rgb, groups[b], seed=b))
        ax.set_title(f"after block {b}: {counts[b]} tokens")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"{schedule.spec()}", fontsize=9)
    fig.tight_layout()
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return counts
