#!/usr/bin/env python3
"""`mode=tome` exported to ONNX against the official ToMe timm patch, on real weights and photos.

ToMe (facebookresearch/ToMe) is CC-BY-NC and not vendored: point --tome-src at a folder holding its
``tome`` package (e.g. ``git clone https://github.com/facebookresearch/ToMe``). For each r, the
official ``tome.patch.timm`` model (PyTorch) and dsm-export's ``r=R,mode=tome`` ONNX export (ONNX
Runtime, CPU) score every photo; prints max |Δlogit| and the share of photos with the same top-1,
and the same for dsm-export's eager PyTorch export form (no ONNX Runtime in between).

    python research/tome_parity.py deit_tiny_patch16_224 --tome-src ../ToMe \\
        --weights ../shared/models/deit_tiny_patch16_224.pth --images ../shared/data/imagenet-sample
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--tome-src", required=True, help="folder holding the official `tome` package")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--r", nargs="+", type=int, default=[13, 16])
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.tome_src, "tome")):
        print(f"tome_parity: error: no `tome` package in {args.tome_src}", file=sys.stderr)
        return 2
    sys.path.insert(0, args.tome_src)
    import numpy as np
    import onnxruntime as ort
    import tome
    import torch

    from dsm_export.data import list_images
    from dsm_export.check.evaluate import load_pixels, model_logits
    from dsm_export.graph.export import export_model
    from dsm_export.core.models import create_model
    from dsm_export.core.patch import apply

    model = create_model(args.model, args.weights)
    images = list_images(args.images)
    pixels = load_pixels(images, model, progress=True)
    print(f"{args.model}, {len(images)} photos; official ToMe (PyTorch {torch.__version__}) against the "
          f"dsm-export ONNX file in ONNX Runtime {ort.__version__} CPU")
    print()
    print("| schedule | max abs logit difference | photos over 1e-3 | same top-1 | eager PyTorch form: max abs difference |")
    print("|---|---|---|---|---|")
    for r in args.r:
        official = copy.deepcopy(model)
        tome.patch.timm(official)
        official.r = r
        expected = model_logits(official, pixels)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "tome.onnx")
            export_model(model, args.model, path, f"r={r},mode=tome", weights=args.weights)
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            got = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: pixels[i:i + 50].numpy()})[0]
                                  for i in range(0, len(pixels), 50)])
        same = float((got.argmax(1) == expected.argmax(1)).mean())
        eager = model_logits(apply(model, f"r={r},mode=tome", "export").eval(), pixels)
        over = int((np.abs(got - expected).max(1) > 1e-3).sum())
        print(f"| `r={r},mode=tome` | {np.abs(got - expected).max():.2e} | {over} | {100 * same:.1f} % "
              f"({int(round(same * len(images)))}/{len(images)}) | {np.abs(eager - expected).max():.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
