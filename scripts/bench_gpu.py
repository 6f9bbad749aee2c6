#!/usr/bin/env python3
"""PyTorch (and ONNX Runtime CUDA) throughput of unmerged against DSM ViTs on a GPU.

For DeiT-Tiny, -Small and -Base (random weights: speed only), batch sizes, fp16/bf16, eager and
CUDA graphs / torch.compile, it times the unmerged model against the same model under a DSM schedule
(median of repetitions, CUDA-synchronised) and prints a Markdown table with the device name. On a
machine without a GPU it runs on the CPU in fp32 with a small batch, so a test keeps it working:

    python scripts/bench_gpu.py                         # GPU: the full table
    python scripts/bench_gpu.py --cpu --batch 2 --models deit_tiny_patch16_224 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

SCHEDULE = "r=34,r_end=0,delay=3,local=1"


def timed(fn, x, repeats: int, iters: int, sync) -> float:
    """Median images/s of ``fn(x)``."""
    rates = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            fn(x)
        sync()
        rates.append(len(x) * iters / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224")
    parser.add_argument("--batch", default="64,256", help="comma-separated batch sizes")
    parser.add_argument("--dtypes", default="float16,bfloat16")
    parser.add_argument("--modes", default="eager,cudagraph,compile")
    parser.add_argument("--schedule", default=SCHEDULE)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (fp32, eager only)")
    args = parser.parse_args(argv)

    import timm

    from dsm_export.core.patch import apply

    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if cuda else [torch.float32]
    modes = args.modes.split(",") if cuda else ["eager"]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    from dsm_export.search.timing import cpu_name

    name = torch.cuda.get_device_name() if cuda else f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"
    print(f"device: {name} | torch {torch.__version__} | schedule {args.schedule} | median of {args.repeats}")
    print()
    print("| model | batch | dtype | mode | unmerged img/s | DSM img/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        base = timm.create_model(model_name, pretrained=False).eval().to(device)
        for dtype in dtypes:
            model = base.to(dtype)
            merged = apply(model, args.schedule, impl="export").eval()
            for batch in (int(b) for b in args.batch.split(",")):
                x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
                for mode in modes:
                    rates = []
                    for module in (model, merged):
                        fn = runner(module, mode, x)
                        with torch.inference_mode():
                            fn(x)  # warm-up / capture
                            rates.append(timed(fn, x, args.repeats, args.iters, sync))
                    print(f"| {model_name} | {batch} | {str(dtype).replace('torch.', '')} | {mode} | "
                          f"{rates[0]:.0f} | {rates[1]:.0f} | {rates[1] / rates[0]:.2f}x |", flush=True)
        if cuda:
            ort_cuda(model_name, args)
    return 0


def ort_cuda(model_name: str, args) -> None:
    """Rows for ONNX Runtime's CUDA execution provider (fp32 exports), where it is installed."""
    import tempfile

    import numpy as np

    try:
        import onnxruntime as ort
    except ImportError:
        return
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"| {model_name} | - | fp32 | onnxruntime-cuda | not installed | - | - |")
        return
    from dsm_export.graph.export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for spec in ("none", args.schedule):
            path = f"{tmp}/{len(paths)}.onnx"
            export_onnx(model_name, path, spec, full_last_block=spec == "none")  # baseline: timm's model
            paths.append(path)
        sessions = [ort.InferenceSession(p, providers=["CUDAExecutionProvider"]) for p in paths]
        for batch in (int(b) for b in args.batch.split(",")):
            x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
            rates = []
            for s in sessions:
                s.run(None, {"pixel_values": x})
                rates.append(timed(lambda v: s.run(None, {"pixel_values": v}), x, args.repeats, args.iters,
                                   lambda: None))
            print(f"| {model_name} | {batch} | float32 | onnxruntime-cuda | {rates[0]:.0f} | {rates[1]:.0f} | "
                  f"{rates[1] / rates[0]:.2f}x |", flush=True)


def runner(module, mode: str, example: torch.Tensor):
    """A callable running ``module`` eagerly, compiled, or replayed from a CUDA graph."""
    if mode == "eager":
        return module
    if mode == "compile":
        return torch.compile(module, mode="max-autotune-no-cudagraphs")
    if mode == "cudagraph":
        static_in = example.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(3):
                module(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_out = module(static_in)

        def replay(x):
            static_in.copy_(x)
            graph.replay()
            return static_out

        return replay
    raise ValueError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())
