#!/usr/bin/env python3
"""How `build --precision int8` chose its defaults: calibration method x activation type x mode x smoothing.

Quantizes the unmerged export and a DSM export every way `build` offers, calibrating on the first
--quant-count images of the calibration split of `dsm-export tune --calibration-count 128` and scoring on
the rest of that split (KL to and top-1 agreement with the fp32 unmerged model). The held-apart
photos that `research/frontier.py` reports on are never used here. Prints a Markdown table.

    python research/int8_choices.py deit_tiny_patch16_224 \\
        --weights ../shared/models/deit_tiny_patch16_224.pth --images ../shared/data/imagenet-sample
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

VARIANTS = (  # mode, calibration, activations, layers kept fp32, SmoothQuant alpha (None: no smoothing)
    ("static", "minmax", "int8", (), None), ("static", "entropy", "int8", (), None),
    ("static", "percentile", "int8", (), None), ("static", "percentile", "int8", ("fc2",), None),
    ("static", "minmax", "uint8", (), None), ("static", "percentile", "uint8", (), None),
    ("static", "percentile", "int8", (), 0.5), ("static", "percentile", "int8", (), 0.7),
    ("dynamic", "-", "uint8", (), None), ("dynamic", "-", "uint8", ("blocks.0",), None),
    ("dynamic", "-", "uint8", (), 0.5), ("dynamic", "-", "uint8", ("blocks.0",), 0.5),
    ("dynamic", "-", "uint8", (), 0.7), ("dynamic", "-", "uint8", ("blocks.0",), 0.7),
    ("dynamic", "-", "uint8", (), 0.85), ("dynamic", "-", "uint8", ("blocks.0",), 0.85),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--schedules", nargs="+", default=["none", "r=34,r_end=0,delay=3,local=1"])
    parser.add_argument("--calibration-count", type=int, default=128)
    parser.add_argument("--quant-count", type=int, default=64)
    args = parser.parse_args(argv)
    if not 0 < args.quant_count < args.calibration_count:
        parser.error("need 0 < --quant-count < --calibration (the rest of the split scores the choice)")

    from dsm_export.data import list_images, split_calibration
    from dsm_export.search.engine_search import ort_logits
    from dsm_export.check.evaluate import load_pixels, model_logits
    from dsm_export.graph.export import export_model
    from dsm_export.core.models import create_model
    from dsm_export.engines.int8.quantize import QuantizeOptions, quantize_int8
    from dsm_export.check.validate import agreement_metrics

    model = create_model(args.model, args.weights)
    calib, _ = split_calibration(list_images(args.images), args.calibration_count)
    pixels = load_pixels(calib, model)
    quant, score = pixels.numpy()[:args.quant_count], pixels[args.quant_count:]
    base = model_logits(model, score)
    print(f"calibration on {len(quant)} images, scored on {len(score)} other images of the calibration split")
    print("| schedule | mode | calibration | activations | kept fp32 | smoothing alpha | KL | agreement |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for spec in args.schedules:
            fp32 = os.path.join(work, "fp32.onnx")
            export_model(model, args.model, fp32, spec, weights=args.weights)
            for mode, method, activations, keep, alpha in VARIANTS:
                out = os.path.join(work, "int8.onnx")
                opts = QuantizeOptions(mode=mode, activations=activations, keep_fp32=keep, smooth_alpha=alpha,
                                       calibration_method=method if mode == "static" else "minmax")
                quantize_int8(fp32, out, quant if mode == "static" or alpha is not None else None, opts)
                m = agreement_metrics(ort_logits(out, score.numpy()), base)
                print(f"| `{spec}` | {mode} | {method} | {activations} | {', '.join(keep) or '-'} | {alpha or '-'} | {m['kl']:.4f} | "
                      f"{100 * m['top1_agreement']:.1f} % |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
