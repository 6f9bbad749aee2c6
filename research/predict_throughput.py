#!/usr/bin/env python3
"""``dsm-export predict`` images/s on this machine: the plain loop against a local Ray instance with
``--ray-actors`` actors, the same engine, and the per-image costs that bound a cluster's throughput.

The photo folder is linked ``--copies`` times into a temporary folder (every link a new image to
``predict``), then each repetition runs, in alternation, ``dsm-export predict ENGINE`` (the plain loop:
the engine on all cores, the next batch decoded in a thread) and ``dsm-export predict ENGINE --ray
--ray-actors N`` (a Ray Data pipeline: N actors of one CPU each, each decoding and running its batches),
each into a fresh output folder, each as its own process. Images/s is the run's own figure (images over
the seconds from loading the engine, or starting Ray, to the last row); ``startup`` is the seconds to
the first rows. Median of ``--repeats``.

Then, in this process on one thread: decode + preprocess (PIL, the model's timm eval transform) per
image, and the engine per image (ONNX Runtime, batch 32), which bound what one core does.

    python research/predict_throughput.py deit_tiny_patch16_224 \\
        --weights ../shared/models/deit_tiny_patch16_224.pth --images ../shared/data/imagenet-sample

Never time while another CPU job runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from dsm_export.data import IMAGE_EXTENSIONS, load_image
from dsm_export.engines.registry import RunnerOptions, open_runner
from dsm_export.graph.export import export_onnx
from dsm_export.search.timing import cpu_name
from dsm_export.serving.predict import model_transform

SCHEDULE = "r=34,r_end=0,delay=3,local=1"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--weights", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--schedule", default=SCHEDULE)
    p.add_argument("--copies", type=int, default=4, help="links of the photo folder (default 4: 2000 images)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    return p.parse_args(argv)


def link_copies(images: str, folder: str, copies: int) -> int:
    """``copies`` subfolders of links to every image of ``images``; the number of images."""
    files = sorted(f for f in os.listdir(images) if f.lower().endswith(IMAGE_EXTENSIONS))
    for c in range(copies):
        os.makedirs(os.path.join(folder, f"copy{c}"))
        for f in files:
            os.symlink(os.path.abspath(os.path.join(images, f)), os.path.join(folder, f"copy{c}", f))
    return copies * len(files)


def run_predict(engine: str, folder: str, output: str, batch: int, extra: list[str]) -> dict:
    """One ``dsm-export predict`` process; its ``_SUCCESS.json`` summary."""
    cmd = [sys.executable, "-m", "dsm_export", "predict", engine, "--images", folder, "--output", output,
           "--batch-size", str(batch), "--no-progress", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    with open(os.path.join(output, "_SUCCESS.json"), encoding="utf-8") as fh:
        return json.load(fh)


def per_image_costs(engine: str, images: str, batch: int) -> tuple[float, float]:
    """(decode + preprocess ms per image, engine ms per image) on one thread."""
    import torch

    torch.set_num_threads(1)
    runner = open_runner(engine, RunnerOptions(threads=1))
    transform = model_transform(runner.engine_file.info)
    files = sorted(f for f in os.listdir(images) if f.lower().endswith(IMAGE_EXTENSIONS))[:2 * batch]
    t = time.perf_counter()
    pixels = torch.stack([transform(load_image(os.path.join(images, f))) for f in files]).numpy()
    decode_ms = 1000 * (time.perf_counter() - t) / len(files)
    runner(pixels[:batch])  # warm-up
    times = []
    for _ in range(3):
        t = time.perf_counter()
        runner(pixels[:batch])
        times.append(time.perf_counter() - t)
    runner.close()
    return decode_ms, 1000 * statistics.median(times) / batch


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        engine = os.path.join(tmp, "dsm.onnx")
        export_onnx(args.model, engine, args.schedule, weights=args.weights)
        folder = os.path.join(tmp, "photos")
        count = link_copies(args.images, folder, args.copies)
        runs: dict[str, list[dict]] = {"local": [], "ray": []}
        for i in range(args.repeats):
            runs["local"].append(run_predict(engine, folder, os.path.join(tmp, f"local{i}.parquet"), args.batch, []))
            runs["ray"].append(run_predict(engine, folder, os.path.join(tmp, f"ray{i}.parquet"), args.batch,
                                           ["--ray", "--ray-actors", str(args.actors)]))
        decode_ms, engine_ms = per_image_costs(engine, args.images, args.batch)
    rate = {k: statistics.median(r["images_per_s"] for r in v) for k, v in runs.items()}
    startup = {k: statistics.median(r["startup_s"] for r in v) for k, v in runs.items()}
    # after the first rows: the pipeline's own rate, without the engine load and Ray's start
    steady = {k: statistics.median(r["written"] / (r["seconds"] - r["startup_s"]) for r in v) for k, v in runs.items()}
    ratio = statistics.median(b["images_per_s"] / a["images_per_s"] for a, b in zip(runs["local"], runs["ray"]))
    print(f"{args.model}, schedule {args.schedule}; {count} images ({args.copies} links to each shared photo), "
          f"batch {args.batch}; {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} "
          f"{platform.release()}; median of {args.repeats} runs, the two alternating, each its own process.\n")
    print("| run | images/s | seconds to the first rows | images/s after them | written |")
    print("|---|---|---|---|---|")
    for key, label in (("local", f"plain loop (ONNX Runtime on {os.cpu_count()} threads, decoding in a thread)"),
                       ("ray", f"`--ray --ray-actors {args.actors}` (local Ray, 1 CPU per actor)")):
        print(f"| {label} | {rate[key]:.1f} | {startup[key]:.1f} | {steady[key]:.1f} | {runs[key][0]['written']} rows |")
    print(f"\nRay over the plain loop: {ratio:.2f}x (median of paired ratios).\n")
    per_core = 1000 / (decode_ms + engine_ms)
    print(f"One core, one image: decode + preprocess {decode_ms:.1f} ms, the engine {engine_ms:.1f} ms "
          f"(batch {args.batch}): at most {per_core:.0f} images/s per core, "
          f"{np.round(100 * decode_ms / (decode_ms + engine_ms)):.0f} % of it decoding.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
