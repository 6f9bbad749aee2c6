#!/usr/bin/env python3
"""A model over protobuf's 2 GB limit, end to end: ViT-H/14 (fp32, 2.5 GB) with external data.

Random-init ``deit3_huge_patch14_224`` (DeiT III ViT-H/14, 632 M parameters, a 1000-class head:
timm's ``vit_huge_patch14_224`` has none, and its weights file would lose a head added by
``--num-classes``, timm dropping a classifier whose size differs from the pretrained config's;
seed 0; its state dict saved with ``torch.save`` first, so
that ``validate`` rebuilds the same model from ``--weights``) under a DSM schedule goes through
every step a user runs, each as its own ``dsm-export`` subprocess, wall time and peak RSS recorded
per step (the child's own ``ru_maxrss``, through research/child_rss.py):

1. ``export`` (over 2 GB: ``vit_h.onnx`` plus ``vit_h.onnx.data``, automatically),
2. ``inspect`` of the file (the graph is read without its weights),
3. ``validate`` against PyTorch in fp32 on ``--images`` photos (max |dlogit| <= 1e-4; the
   LayerScale gammas set to trained-like values, 0.2-1.0, so that every block moves the logits),
4. ``build --precision fp32`` and ``--precision fp16`` with ONNX Runtime (graph optimizations
   saved, the engine's weights in its own data file),
5. ``build --precision int8 --quantization dynamic`` (ONNX Runtime's quantizer, external data),
6. ``triton-repo`` (the data file copied beside ``model.onnx``), and an ONNX Runtime session
   loaded from the repository's version folder, run on one image.

    python research/huge_model.py --images ../shared/data/imagenet-sample --output docs

writes docs/huge_model.json and docs/huge_model.md and prints the short table of the
``huge-model`` block of README.md. Needs about 12 GB of free disk (the files are written
to a temporary folder under ``--work``, removed at the end) and 14 GB of memory (INT8 peaks at 13.3 GiB);
about 12-20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("DSM_SHARED", os.path.join(ROOT, "..", "shared"))
MODEL = "deit3_huge_patch14_224"
SCHEDULE = "r=8,r_end=4,delay=3,protect=16,merge=mlerp"

# LayerScale (DeiT III) starts at 1e-6 in a random init: the blocks would add next to nothing to the
# residual stream, the logits would barely depend on them, and parity would check little. The scales
# get trained-like magnitudes, as in the tests' model families (tests/families.py).
SAVE_WEIGHTS = """
import sys, timm, torch
torch.manual_seed(0)
model = timm.create_model(sys.argv[1], pretrained=False)
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, timm.layers.LayerScale):
            m.gamma.uniform_(0.2, 1.0)
torch.save(model.state_dict(), sys.argv[2])
"""

LOAD_REPO = """
import sys, numpy as np
from dsm_export.engines.providers import create_session
session = create_session(sys.argv[1], "cpu")
out = session.run(None, {session.get_inputs()[0].name: np.zeros((1, 3, 224, 224), np.float32)})[0]
print("ran", sys.argv[1], "->", list(out.shape))
"""


def run_step(name: str, argv: list[str], log) -> dict:
    """Run ``argv`` (``dsm-export ...`` or ``python ...``) in the repository root; its wall time
    (s) and peak RSS (GiB) of that child alone.

    Raises:
        RuntimeError: if it exits non-zero (with the end of its output).
    """
    cmd = list(argv)
    if cmd[0] == "dsm-export":
        cmd = [sys.executable, "-m", "dsm_export", *cmd[1:]]
    elif cmd[0] == "python":
        cmd[0] = sys.executable
    log(f"$ {' '.join(shlex.quote(c) for c in argv)}")
    from child_rss import run_measured

    run = run_measured(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text, seconds = run["output"], run["seconds"]
    if run["returncode"] != 0:
        raise RuntimeError(f"{name} exited {run['returncode']}:\n{text[-3000:]}")
    log(text.strip()[-1500:])
    return {"step": name, "command": " ".join(shlex.quote(c) for c in argv), "seconds": round(seconds, 1),
            "peak_rss_gib": round(run["peak_rss_bytes"] / 2 ** 30, 2), "output_tail": text.strip()[-600:]}


def sizes(folder: str) -> dict[str, int]:
    """Bytes of every file under ``folder`` (relative names)."""
    out = {}
    for base, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(base, f)
            out[os.path.relpath(path, folder)] = os.path.getsize(path)
    return dict(sorted(out.items()))


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=MODEL, help=f"timm model name (default {MODEL})")
    parser.add_argument("--schedule", default=SCHEDULE, help=f"DSM schedule (default {SCHEDULE})")
    parser.add_argument("--images", default=os.path.join(SHARED, "data", "imagenet-sample"),
                        help="photo folder for validate (default: the shared photos)")
    parser.add_argument("--limit", type=int, default=4, help="photos validated (default 4)")
    parser.add_argument("--output", default=None, help="folder for huge_model.json and .md (default: print only)")
    parser.add_argument("--work", default=tempfile.gettempdir(), help="where the large files go (removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the large files (their folder is printed)")
    args = parser.parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = datetime.now(timezone.utc)
    work = tempfile.mkdtemp(prefix="dsm-huge-", dir=args.work)
    steps, files = [], {}
    try:
        weights = os.path.join(work, "vit_h_random.pth")
        onnx_path = os.path.join(work, "vit_h.onnx")
        int8 = os.path.join(work, "vit_h_int8.onnx")
        repo = os.path.join(work, "repo")
        report_json = os.path.join(work, "validate.json")
        steps.append(run_step("save random-init weights", ["python", "-c", SAVE_WEIGHTS, args.model, weights], log))
        steps.append(run_step("export", ["dsm-export", "export", args.model, "--weights", weights,
                                         "--schedule", args.schedule, "--output", onnx_path], log))
        steps.append(run_step("inspect", ["dsm-export", "inspect", onnx_path], log))
        steps.append(run_step("validate", ["dsm-export", "validate", onnx_path, "--images", args.images,
                                           "--limit", str(args.limit), "--json", report_json], log))
        for precision in ("fp32", "fp16"):
            steps.append(run_step(f"ONNX Runtime {precision} engine",
                                  ["dsm-export", "build", onnx_path, "--backend", "onnxruntime", "--precision",
                                   precision, "--output", os.path.join(work, f"vit_h_ort_{precision}.onnx")], log))
        steps.append(run_step("INT8 (dynamic)", ["dsm-export", "build", onnx_path, "--backend", "onnxruntime",
                                                 "--precision", "int8", "--quantization", "dynamic",
                                                 "--output", int8], log))
        steps.append(run_step("triton-repo", ["dsm-export", "triton-repo", onnx_path, "--output", repo], log))
        steps.append(run_step("load the repo in ONNX Runtime",
                              ["python", "-c", LOAD_REPO, os.path.join(repo, "vit_h", "1", "model.onnx")], log))
        with open(report_json, encoding="utf-8") as fh:
            report = json.load(fh)
        files = sizes(work)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    parity = {k: report.get(k) for k in ("passed", "criterion", "max_abs_diff", "top1_match_pytorch", "images",
                                         "logit_std")}
    result = {"model": args.model, "schedule": args.schedule, "machine": machine(),
              "date": started.strftime("%Y-%m-%d %H:%M UTC"), "steps": steps, "files": files,
              "validate": parity}
    rows = ["| step | wall time | peak RSS |", "|---|---|---|"]
    rows += [f"| {s['step']} | {s['seconds']:.0f} s | {s['peak_rss_gib']:.1f} GiB |" for s in steps]
    model_bytes = files.get("vit_h.onnx", 0)
    data_bytes = files.get("vit_h.onnx.data", 0)
    int8_bytes = files.get("vit_h_int8.onnx", 0) + files.get("vit_h_int8.onnx.data", 0)
    diff, scale = parity.get("max_abs_diff"), parity.get("logit_std")
    engines = ", ".join(f"ONNX Runtime {p} {gb(files.get(f'vit_h_ort_{p}.onnx', 0) + files.get(f'vit_h_ort_{p}.onnx.data', 0))}"
                        for p in ("fp32", "fp16"))
    summary = (f"{args.model} (random init, LayerScale 0.2-1.0), `{args.schedule}`: `vit_h.onnx` {gb(model_bytes)} + "
               f"`vit_h.onnx.data` {gb(data_bytes)} (external data, written automatically); engines: {engines}, "
               f"INT8 {gb(int8_bytes)}; validate on {args.limit} photos: {'PASS' if parity.get('passed') else 'FAIL'}, "
               f"max |dlogit| {diff if diff is None else f'{diff:.1e}'}"
               + (f" (PyTorch's logits: std {scale:.2f})." if scale is not None else "."))
    block = "\n".join([summary, "", *rows])
    note = (f"<sub>{machine()}, {result['date']}; each step a separate process, peak RSS of that process "
            "(its own `ru_maxrss`, research/child_rss.py).</sub>")
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "huge_model.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
            fh.write("\n")
        table = ["| file | size |", "|---|---|"] + [f"| `{k}` | {gb(v)} |" for k, v in files.items()]
        with open(os.path.join(args.output, "huge_model.md"), "w", encoding="utf-8") as fh:
            fh.write(f"# ViT-H/14 over 2 GB, end to end\n\nGenerated by `python research/huge_model.py "
                     f"--output {args.output}`.\n\n{block}\n\n{note}\n\nFiles written:\n\n" + "\n".join(table) + "\n")
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
