"""Subcommand ``export``: a timm ViT with a merge schedule to static-shape ONNX."""

from __future__ import annotations

from .. import checks
from ..graph.export import export_onnx, parse_input_size
from ..graph.onnx_file import external_locations, read_graph
from ._common import add_weights_args, check_weights_args


def add(sub):
    p = sub.add_parser("export", help="export a timm or Hugging Face ViT with a merge schedule to static-shape ONNX")
    p.add_argument("model", help="timm model name, e.g. deit_tiny_patch16_224, deit_tiny_patch16_224.fb_in1k "
                                 "or hf-hub:timm/deit_tiny_patch16_224.fb_in1k; or a Hugging Face Transformers vision model: a "
                                 "save_pretrained folder, or a hub id in the local cache (with --pretrained), e.g. "
                                 "facebook/dinov2-small")
    add_weights_args(p)
    p.add_argument("--schedule", default="none",
                   help="schedule spec (r=13,delay=2,local=4,windows=2x2), 'none', or a JSON file")
    p.add_argument("--output", "-o", required=True, help="output .onnx file")
    p.add_argument("--batch", type=int, help="fix the batch axis (default: dynamic)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17, default 18)")
    p.add_argument("--input-size", help="expected input size, N or HxW; must be the model's")
    p.add_argument("--full-last-block", action="store_true",
                   help="run the last block on every token, as timm does (a timm-equivalent baseline for "
                        "benchmarks; by default only the tokens the head reads are computed there)")
    p.add_argument("--external-data", action="store_true",
                   help="write the weights to OUTPUT.data beside the model (ONNX external data); models of "
                        "2 GB or more are always written so")
    p.add_argument("--last-hidden-state", action="store_true",
                   help="a Hugging Face model without a classifier (ViTModel, Dinov2Model, CLIP or SigLIP vision "
                        "model): output last_hidden_state [batch, tokens, dim], every token left after the last "
                        "block, instead of the pooled output")
    p.set_defaults(func=run)


def run(args) -> int:
    check_weights_args(args)
    checks.output_file(args.output, "--output")
    checks.input_file(args.weights, "weights file")
    hw = parse_input_size(args.input_size) if args.input_size else None
    info = export_onnx(args.model, args.output, args.schedule, args.weights, batch=args.batch,
                       opset=args.opset, image_size=hw, pretrained=args.pretrained,
                       num_classes=args.num_classes, full_last_block=args.full_last_block,
                       external_data=args.external_data, last_hidden_state=args.last_hidden_state)
    tokens = " ".join(str(t) for t in info.tokens)
    print(f"wrote {args.output}: {info.model}, schedule {args.schedule}, output {info.output}, "
          f"batch {info.batch or 'dynamic'}, tokens per block {tokens}"
          + ("; last block for the prefix tokens alone" if info.last_block == "prefix" else ""))
    data = external_locations(read_graph(args.output))
    if data:
        print(f"weights in {', '.join(data)} beside it (ONNX external data: copy it with the model)")
    return 0
