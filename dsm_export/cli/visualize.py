"""Subcommand ``visualize``: merged-token groups over an image."""

from __future__ import annotations

import os

from .. import checks
from ..check.visualize import visualize
from ..core.schedule import Schedule
from ..data import load_image
from ..errors import DSMError
from ._common import add_weights_args, model_from_args


def add(sub):
    p = sub.add_parser("visualize", help="draw the merged-token groups at chosen blocks over an image")
    p.add_argument("model", help="timm model name, or a Hugging Face Transformers model (a save_pretrained folder, or a hub id in the local cache)")
    add_weights_args(p, num_classes=False)
    p.add_argument("--image", required=True)
    p.add_argument("--schedule", required=True)
    p.add_argument("--blocks", required=True, help="comma-separated block indices, e.g. 3,6,11")
    p.add_argument("--output", "-o", required=True, help="PNG file")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
    except ValueError:
        raise DSMError(f"--blocks {args.blocks!r}: expected comma-separated integers") from None
    if not blocks:
        raise DSMError("--blocks names no block")
    if not os.path.isfile(args.image):
        raise DSMError(f"image {args.image!r} does not exist")
    checks.output_file(args.output, "--output")
    checks.input_file(args.weights, "weights file")
    load_image(args.image)  # readable, before the model is built
    model = model_from_args(args, args.model)
    counts = visualize(model, Schedule.parse(args.schedule), args.image, blocks, args.output)
    print(f"wrote {args.output}: " + ", ".join(f"block {b}: {n} tokens" for b, n in counts.items()))
    return 0
