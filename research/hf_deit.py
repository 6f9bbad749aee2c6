#!/usr/bin/env python3
"""The Hugging Face path beside the timm path on the shared DeiT-Tiny weights and photos.

The weights are written as a ``ViTForImageClassification`` folder (the layout of Hugging Face's
``facebook/deit-tiny-patch16-224``, LayerNorm epsilon 1e-12) with that checkpoint's image processor
(``DeiTImageProcessor``: 256x256 bicubic resize, 224 centre crop, ImageNet mean and std). Each
schedule is exported twice, from the folder and from the timm name, and run with ONNX Runtime:

* the same pixel tensors (timm's eval transform) through both exports: the largest logit difference,
  and the photos above 1e-4 (the folder is written twice: with the checkpoint's epsilon, 1e-12, and
  with timm's, 1e-6, which makes the two exports the same arithmetic);
* each path through its own preprocessing (the folder's processor; timm's transform, which resizes
  the short side to 248 and keeps the aspect ratio): top-1 on the labelled photos, and the top-1
  agreement between the two paths.

    python research/hf_deit.py deit_tiny_patch16_224 --weights ../shared/models/deit_tiny_patch16_224.pth \\
        --images ../shared/data/imagenet-sample
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import numpy as np
import transformers
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from dsm_export.check.validate import onnx_runner
from dsm_export.core.hf import save_as_hf_vit
from dsm_export.core.models import create_model, transform_for
from dsm_export.data import iter_batches, list_images
from dsm_export.graph.export import export_onnx

SCHEDULES = ("none", "r=34,r_end=0,delay=3,local=1")
EPSILONS = (1e-12, 1e-6)  # the Hugging Face checkpoint's LayerNorm epsilon, and timm's


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--weights", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--limit", type=int)
    return p.parse_args(argv)


def deit_processor():
    """The image processor of ``facebook/deit-tiny-patch16-224`` (its preprocessor_config.json)."""
    return transformers.DeiTImageProcessor(
        size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224}, resample=3,
        image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD))


def logits(path: str, images, transform) -> np.ndarray:
    run = onnx_runner(path)
    return np.concatenate([run(x.numpy()) for _, x in iter_batches(images, transform, 50)])


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.simplefilter("ignore")
    images = list_images(args.images, args.limit)
    labels = np.asarray(images.labels)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        timm_tf = transform_for(args.model)
        for eps in EPSILONS:
            folder = os.path.join(tmp, f"deit-tiny-patch16-224-eps{eps:g}")
            save_as_hf_vit(create_model(args.model, args.weights), folder, deit_processor(), eps=eps)
            hf_tf = transform_for(folder)
            for schedule in SCHEDULES:
                hf_path, timm_path = os.path.join(tmp, "hf.onnx"), os.path.join(tmp, "timm.onnx")
                export_onnx(folder, hf_path, schedule)
                export_onnx(args.model, timm_path, schedule, args.weights)
                diff = np.abs(logits(hf_path, images, timm_tf) - logits(timm_path, images, timm_tf)).max(axis=1)
                own_hf, own_timm = logits(hf_path, images, hf_tf), logits(timm_path, images, timm_tf)
                rows.append((eps, schedule, diff.max(), int((diff > 1e-4).sum()),
                             (own_timm.argmax(1) == labels).mean(), (own_hf.argmax(1) == labels).mean(),
                             (own_hf.argmax(1) == own_timm.argmax(1)).mean()))
    print(f"DeiT-Tiny (shared weights), {len(images)} labelled photos, ONNX Runtime fp32. layer_norm_eps 1e-12 is "
          "the Hugging Face checkpoint's config, 1e-06 timm's.\n")
    print("| layer_norm_eps | schedule | max \\|dlogit\\| HF vs timm export, same pixels | photos above 1e-4 "
          "| top-1 timm path (timm transform) | top-1 Hugging Face path (its DeiTImageProcessor) "
          "| top-1 agreement of the two paths |")
    print("|---|---|---|---|---|---|---|")
    for eps, schedule, worst, over, t_acc, h_acc, agree in rows:
        print(f"| {eps:g} | `{schedule}` | {worst:.2e} | {over} | {100 * t_acc:.1f} % | {100 * h_acc:.1f} % "
              f"| {100 * agree:.1f} % |")


if __name__ == "__main__":
    main()
