"""Calibration and validation images: listing, labels, timm's eval transform."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from torch import nn

from .errors import DSMError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class ImageSet:
    """Image files of a folder, sorted by name, with ImageNet labels where ``labels.csv`` gives them.

    Attributes:
        root: the folder.
        files: file names (not paths), sorted.
        labels: class index per file, or None if the folder has no ``labels.csv``.
    """

    root: str
    files: tuple[str, ...]
    labels: tuple[int, ...] | None

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices) -> "ImageSet":
        """The images at ``indices``, in that order."""
        files = tuple(self.files[i] for i in indices)
        labels = None if self.labels is None else tuple(self.labels[i] for i in indices)
        return ImageSet(self.root, files, labels)


def list_images(root: str, limit: int | None = None) -> ImageSet:
    """List the images of a folder (non-recursive), reading ``labels.csv`` if present.

    ``labels.csv`` has columns ``file`` and ``class_index`` (as in ``shared/data/imagenet-sample``).

    Args:
        root: folder.
        limit: keep only the first ``limit`` images (sorted by name).

    Raises:
        DSMError: if the folder does not exist, holds no images, or its labels.csv is malformed.
    """
    if not os.path.isdir(root):
        raise DSMError(f"image folder {root!r} does not exist")
    if limit is not None and limit < 1:
        raise DSMError(f"the image limit must be at least 1, got {limit}")
    files = sorted(f for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS)
                   and os.path.isfile(os.path.join(root, f)))
    if not files:
        raise DSMError(f"image folder {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if limit is not None:
        files = files[:limit]
    labels = None
    csv_path = os.path.join(root, "labels.csv")
    if os.path.isfile(csv_path):
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"file", "class_index"} <= set(reader.fieldnames):
                raise DSMError(f"{csv_path}: needs columns 'file' and 'class_index'")
            try:
                table = {row["file"]: int(row["class_index"]) for row in reader}
            except (TypeError, ValueError) as exc:
                raise DSMError(f"{csv_path}: bad class_index ({exc})") from None
        missing = [f for f in files if f not in table]
        if missing:
            raise DSMError(f"{csv_path}: no label for {missing[0]} ({len(missing)} images unlabelled)")
        labels = tuple(table[f] for f in files)
    return ImageSet(root, tuple(files), labels)


def eval_transform(model: nn.Module):
    """The eval transform for ``model``: a Hugging Face model's own image processor where it has one
    (``model.hf_transform``), else timm's (``resolve_data_config`` + ``create_transform``)."""
    hf = getattr(model, "hf_transform", None)
    if hf is not None:
        return hf
    return create_transform(**resolve_data_config(model=model), is_training=False)


def load_image(path: str):
    """Open an image as RGB (grayscale and CMYK converted).

    Raises:
        DSMError: if the file is not a readable image.
    """
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DSMError(f"{path}: not a readable image ({exc})") from None


def load_batch(images: ImageSet, indices, transform) -> torch.Tensor:
    """Load and transform images to a ``[len(indices), 3, H, W]`` float32 tensor."""
    return torch.stack([transform(load_image(images.path(i))) for i in indices])


def iter_batches(images: ImageSet, transform, batch_size: int):
    """Yield ``(indices, pixels)`` batches of at most ``batch_size`` images, in order."""
    for start in range(0, len(images), batch_size):
        idx = list(range(start, min(start + batch_size, len(images))))
        yield idx, load_batch(images, idx, transform)


def split_calibration(images: ImageSet, calibration: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Split images into a calibration set and the held-apart rest, by a fixed shuffle.

    Returns:
        ``(calibration_set, held_apart_set)``; the same ``seed`` gives the same split everywhere.
    """
    order = np.random.default_rng(seed).permutation(len(images))
    return images.subset(order[:calibration]), images.subset(order[calibration:])
