#!/usr/bin/env python3
"""Regenerate the README's quoted output: rerun the quoted commands, rewrite the marked blocks.

A block between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->`` is the output of the
generator registered as NAME, followed by a line saying on which machine and when it was made. The
blocks live in README.md and the docs/*.md pages; each is rewritten in place, in whichever of those
files holds it (``--file`` names other files). Run from the repository root (the quoted commands use
``../shared`` and ``out/``):

    python research/readme_figures.py                 # every generator
    python research/readme_figures.py validate inspect
    python research/readme_figures.py --list

Adding a block takes a few lines: a function that returns the Markdown to put between the markers,
registered with :func:`figure`, and the two markers in the README or a docs/ page::

    @figure("frontier", "INT8 frontier table (research/frontier.py)")
    def frontier(ctx: Context) -> str:
        return ctx.run("python", "research/frontier.py", "--markdown")

Generators run in the order given on the command line (default: registration order); a command
that fails stops the script with its output and leaves every file unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from dsm_export.search.timing import cpu_flags, cpu_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("DSM_SHARED", "../shared")
WEIGHTS = f"{SHARED}/models/deit_tiny_patch16_224.pth"
IMAGES = f"{SHARED}/data/imagenet-sample"
DSM = "r=34,r_end=0,delay=3,local=1"


@dataclass
class Figure:
    """A registered generator: ``make(ctx)`` returns the Markdown between the markers."""

    name: str
    description: str
    make: Callable[["Context"], str]


FIGURES: dict[str, Figure] = {}


def figure(name: str, description: str):
    """Register a generator for the README block ``NAME`` (decorator)."""

    def register(fn):
        FIGURES[name] = Figure(name, description, fn)
        return fn

    return register


@dataclass
class Context:
    """What generators share: the repository root, a log of the commands run, and helpers."""

    root: str = ROOT
    commands: list[str] = field(default_factory=list)
    load_seconds: float = 60.0
    load_clients: int = 8

    def run(self, *cmd: str, timeout: float = 3600) -> str:
        """Run ``cmd`` in the repository root (``dsm-export`` and ``python`` from this interpreter's
        environment); returns stdout.

        Raises:
            RuntimeError: if it exits non-zero (with the end of its output).
        """
        self.commands.append(" ".join(shlex.quote(c) for c in cmd))
        argv = list(cmd)
        if argv[0] == "dsm-export":
            argv = [sys.executable, "-m", "dsm_export", *argv[1:]]
        elif argv[0] == "python":
            argv[0] = sys.executable
        proc = subprocess.run(argv, cwd=self.root, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return proc.stdout

    def ensure_exports(self) -> None:
        """The README's two exports, ``out/deit_tiny_dsm.onnx`` and ``out/deit_tiny_none.onnx``."""
        os.makedirs(os.path.join(self.root, "out"), exist_ok=True)
        for schedule, path in ((DSM, "out/deit_tiny_dsm.onnx"), ("none", "out/deit_tiny_none.onnx")):
            if not os.path.isfile(os.path.join(self.root, path)):
                self.run("dsm-export", "export", "deit_tiny_patch16_224", "--weights", WEIGHTS,
                         "--schedule", schedule, "--output", path)


def machine() -> str:
    """One line naming this machine: CPU model and its vector extensions, cores, OS, Python."""
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def code_block(text: str, lang: str = "") -> str:
    return f"```{lang}\n{text.rstrip()}\n```"


# ------------------------------------------------------------------ generators
@figure("validate", "dsm-export validate on the 500 shared photos")
def validate_block(ctx: Context) -> str:
    ctx.ensure_exports()
    out = ctx.run("dsm-export", "validate", "out/deit_tiny_dsm.onnx", "--images", IMAGES, "--json",
                  "out/report.json", "--no-progress")
    return code_block(out)


@figure("inspect", "dsm-export inspect of the recommended export")
def inspect_block(ctx: Context) -> str:
    ctx.ensure_exports()
    return code_block(ctx.run("dsm-export", "inspect", "out/deit_tiny_dsm.onnx"))


def on_deit(ctx: Context, script: str, *args: str, **kw) -> str:
    """Run ``research/<script>`` on the shared DeiT-Tiny weights and photos; its stdout."""
    return ctx.run("python", f"research/{script}", "deit_tiny_patch16_224", "--weights", WEIGHTS,
                   "--images", IMAGES, *args, **kw)


@figure("int8-choices", "INT8 calibration x activation choices, scored on calibration-split photos")
def int8_choices_block(ctx: Context) -> str:
    return on_deit(ctx, "int8_choices.py").strip()


@figure("frontier", "INT8 / merge / stacked frontier on held-apart photos (research/frontier.py; ~25 min)")
def frontier_block(ctx: Context) -> str:
    on_deit(ctx, "frontier.py", "--tuned", "2.0", "2.5", "--output", "docs", timeout=7200)
    with open(os.path.join(ctx.root, "docs", "frontier.md"), encoding="utf-8") as fh:
        return fh.read().strip()


@figure("frontier-summary", "the README's result table, from docs/frontier.json (times nothing)")
def frontier_summary_block(ctx: Context) -> str:
    return ctx.run("python", "research/frontier_summary.py", "docs/frontier.json").strip()


@figure("openvino-frontier", "OpenVINO frontier: unmerged and merged engines in the default precision and NNCF "
                             "INT8, and the tuned one, against ONNX Runtime fp32 and OpenVINO's default "
                             "(research/openvino_frontier.py; ~15 min, the openvino extra)")
def openvino_frontier_block(ctx: Context) -> str:
    on_deit(ctx, "openvino_frontier.py", "--output", "docs", timeout=7200)  # writes the block of docs/results.md
    with open(os.path.join(ctx.root, "docs", "results.md"), encoding="utf-8") as fh:
        text = fh.read()
    block = next((m for m in MARKER.finditer(text) if m.group("name") == "openvino-frontier"), None)
    if block is None:
        raise RuntimeError("research/openvino_frontier.py wrote no figures:openvino-frontier block into docs/results.md")
    return block.group("body").strip()


@figure("tome-parity", "mode=tome ONNX against the official ToMe patch (needs DSM_TOME_SRC)")
def tome_parity_block(ctx: Context) -> str:
    src = os.environ.get("DSM_TOME_SRC")
    if not src:
        raise RuntimeError("set DSM_TOME_SRC to a folder holding the official `tome` package "
                           "(a checkout of facebookresearch/ToMe)")
    return ctx.run("python", "research/tome_parity.py", "deit_tiny_patch16_224", "--tome-src", src,
                   "--weights", WEIGHTS, "--images", IMAGES).strip()


@figure("tie-flips", "photos on which a near-tie flips a merge between ONNX Runtime and PyTorch (~8 min)")
def tie_flips_block(ctx: Context) -> str:
    return on_deit(ctx, "tie_flips.py").strip()


@figure("openvino-tune", "tune --backend openvino --target-speedup 1.6 timed end to end, its engine timed "
                         "again and its held-apart scores (research/openvino_tune.py; ~10 min, the openvino extra)")
def openvino_tune_block(ctx: Context) -> str:
    return on_deit(ctx, "openvino_tune.py", "--json", "docs/openvino_tune.json", timeout=3600).strip()


@figure("huge-model", "ViT-H/14 (2.5 GB) with external data through export, inspect, validate, ONNX Runtime "
                      "fp32/fp16 engines, INT8 and triton-repo (research/huge_model.py; ~12-20 min, 13.5 GiB peak "
                      "RSS, 12 GB of disk)")
def huge_model_block(ctx: Context) -> str:
    return ctx.run("python", "research/huge_model.py", "--images", IMAGES, "--output", "docs", timeout=3 * 3600).strip()


@figure("merge-variants", "merge variants at 1.5-2.3x fewer FLOPs on held-apart photos (~75 min)")
def merge_variants_block(ctx: Context) -> str:
    ctx.run("python", "research/merge_variants.py", "deit_tiny_patch16_224", "--weights", WEIGHTS,
            "--images", IMAGES, "--output", "docs", "--repeats", "11", timeout=7200)
    with open(os.path.join(ctx.root, "docs", "merge_variants.md"), encoding="utf-8") as fh:
        return fh.read().strip()


PREVIOUS_VARIANTS = "9ad4f5e"  # the last merge-variants run before tune scored mirror images


@figure("held-apart-ci", "bootstrap intervals of the merge-variants table's exact ToMe and tuned rows, and "
                        "its tuned rows paired with those of commit " + PREVIOUS_VARIANTS + " (research/held_apart_ci.py; ~4 min)")
def held_apart_ci_block(ctx: Context) -> str:
    os.makedirs(os.path.join(ctx.root, "out"), exist_ok=True)
    previous = f"out/merge_variants_{PREVIOUS_VARIANTS}.json"
    text = ctx.run("git", "show", f"{PREVIOUS_VARIANTS}:docs/merge_variants.json")
    with open(os.path.join(ctx.root, previous), "w", encoding="utf-8") as fh:
        fh.write(text)
    return ctx.run("python", "research/held_apart_ci.py", "deit_tiny_patch16_224", "--weights", WEIGHTS,
                   "--images", IMAGES, "--json", "docs/merge_variants.json", "--previous", previous).strip()


@figure("merge-overhead", "merged graphs against their token-count twins (research/merge_overhead.py; ~7 min)")
def merge_overhead_block(ctx: Context) -> str:
    return ctx.run("python", "research/merge_overhead.py", "deit_tiny_patch16_224", "--weights", WEIGHTS,
                   "--repeats", "21").strip()


@figure("engine-quotient", "each schedule against the same runtime's unmerged engine, OpenVINO and ONNX Runtime, with token-count twins (research/engine_quotient.py; ~30 min)")
def engine_quotient_block(ctx: Context) -> str:
    return ctx.run("python", "research/engine_quotient.py", "deit_tiny_patch16_224", "--weights", WEIGHTS,
                   "--images", IMAGES).strip()


@figure("engine-quotient-small", "the engine-quotient schedules on DeiT-Small (random weights: times only), OpenVINO INT8 and bf16 (research/engine_quotient.py; ~13 min)")
def engine_quotient_small_block(ctx: Context) -> str:
    return ctx.run("python", "research/engine_quotient.py", "deit_small_patch16_224", "--engines", "openvino-int8",
                   "openvino-bf16", "--images", IMAGES).strip()


@figure("engine-quotient-avx2", "the engine-quotient table on a CPU without AVX-512 (no VNNI, no BF16: OpenVINO runs bf16 builds in f32); refuses elsewhere (research/engine_quotient.py; ~30 min)")
def engine_quotient_avx2_block(ctx: Context) -> str:
    if "avx512f" in cpu_flags():
        raise RuntimeError("engine-quotient-avx2 is the table of a CPU without AVX-512; this one has it "
                           "(its table is the engine-quotient block)")
    return engine_quotient_block(ctx)


@figure("hf-deit", "the shared DeiT-Tiny as Hugging Face ViTForImageClassification beside the timm path (research/hf_deit.py; ~4 min)")
def hf_deit_block(ctx: Context) -> str:
    return on_deit(ctx, "hf_deit.py").strip()


@figure("predict-throughput", "dsm-export predict images/s, plain loop against local Ray with 2 actors (research/predict_throughput.py; ~6 min)")
def predict_throughput_block(ctx: Context) -> str:
    return on_deit(ctx, "predict_throughput.py").strip()


@figure("scale", "ToMe and DSM speed-ups across five model sizes, random-init weights (research/scale.py --budget-minutes 4; ~75 min)")
def scale_block(ctx: Context) -> str:
    ctx.run("python", "research/scale.py", "--budget-minutes", "4", "--output", "docs", timeout=6 * 3600)
    with open(os.path.join(ctx.root, "docs", "scale.md"), encoding="utf-8") as fh:
        text = fh.read()
    block = next((m for m in MARKER.finditer(text) if m.group("name") == "scale"), None)  # scale.py's table
    if block is None:
        raise RuntimeError("research/scale.py wrote no figures:scale block into docs/scale.md")
    return block.group("body").strip()


@figure("tensorrt", "TensorRT builds of the README's engines, with no GPU (needs the tensorrt-rtx extra; ~2 min)")
def tensorrt_block(ctx: Context) -> str:
    ctx.ensure_exports()
    int8 = "out/deit_tiny_dsm_int8.onnx"
    if not os.path.isfile(os.path.join(ctx.root, int8)):
        ctx.run("dsm-export", "build", "out/deit_tiny_dsm.onnx", "--backend", "onnxruntime", "--precision", "int8",
                "--calibration", IMAGES, "--calibration-count", "64", "--output", int8)
    rows = []
    for source, precision, label in (("out/deit_tiny_none.onnx", "fp32", "unmerged"),
                                     ("out/deit_tiny_dsm.onnx", "fp32", "DSM"),
                                     ("out/deit_tiny_dsm.onnx", "fp16", "DSM"),
                                     (int8, "int8", "DSM, static QDQ")):
        plan = f"out/deit_tiny_{label.split(',')[0].lower()}_{precision}.plan"
        if os.path.exists(os.path.join(ctx.root, plan)):
            os.remove(os.path.join(ctx.root, plan))
            os.remove(os.path.join(ctx.root, plan + ".json"))
        ctx.run("dsm-export", "build", source, "--backend", "tensorrt", "--precision", precision, "--output", plan)
        with open(os.path.join(ctx.root, plan + ".json"), encoding="utf-8") as fh:
            info = json.load(fh)
        rows.append((label, precision, info))
    first = rows[0][2]
    name = "TensorRT-RTX" if first["flavour"] == "rtx" else "TensorRT"
    where = "no GPU (CPU-only ahead-of-time build)" if first["gpu"] is None else first["gpu"]
    lines = [f"{name} {first['tensorrt_version']} (`{first['tensorrt_module']}`), built on {where}; targets "
             f"{', '.join(first['engine_targets'] or []) or 'the GPU it was built on'}.", "",
             "| engine | precision | layers | build (s) | plan (MB) | errors / warnings logged |",
             "|---|---|---|---|---|---|"]
    for label, precision, info in rows:
        lines.append(f"| DeiT-Tiny {label} | {precision} | {info['layers']} | {info['build_seconds']:.1f} | "
                     f"{info['plan_bytes'] / 2**20:.1f} | {info['log']['error_count']} / {info['log']['warning_count']} |")
    return "\n".join(lines)


@figure("tests", "test count and wall time of the whole suite")
def tests_block(ctx: Context) -> str:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=ctx.root,
                          capture_output=True, text=True, timeout=5400)  # CI's own limit: on a slow 2-core VM the suite passed 60 min
    minutes = (time.monotonic() - start) / 60
    ctx.commands.append("python -m pytest -q")
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0:
        raise RuntimeError(f"the test suite failed: {summary}\n{proc.stdout[-4000:]}")
    counts = dict((k, int(v)) for v, k in re.findall(r"(\d+) (passed|skipped|failed|deselected)", summary))
    total = sum(counts.values())
    start = time.monotonic()
    fast = subprocess.run([sys.executable, "-m", "pytest", "-m", "fast", "-q", "-p", "no:cacheprovider"],
                          cwd=ctx.root, capture_output=True, text=True, timeout=600)
    fast_s = time.monotonic() - start
    ctx.commands.append("python -m pytest -m fast -q")
    fast_summary = fast.stdout.strip().splitlines()[-1] if fast.stdout.strip() else ""
    if fast.returncode != 0:
        raise RuntimeError(f"the fast tier failed: {fast_summary}\n{fast.stdout[-4000:]}")
    fast_passed = int(re.search(r"(\d+) passed", fast_summary).group(1))
    return (f"On {os.cpu_count()} CPU cores the suite ({total} tests: {counts.get('passed', 0)} pass, "
            f"{counts.get('skipped', 0)} skip) took {minutes:.1f} minutes; the fast tier "
            f"(`pytest -m fast`, {fast_passed} tests) took {fast_s:.0f} s.")


@contextlib.contextmanager
def served(ctx: Context, files: list[str], names: list[str]):
    """A ``dsm-export serve`` of ``files`` on free loopback ports until the block ends; yields host:port."""
    import tritonclient.http as httpclient

    from dsm_export.checks import free_ports

    http, grpc, metrics = free_ports(3)
    args = [sys.executable, "-m", "dsm_export", "serve", *files, *sum((["--name", n] for n in names), []),
            "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    ctx.commands.append(" ".join(args[1:]).replace(sys.executable, "python"))
    with open(os.devnull, "w") as devnull:
        proc = subprocess.Popen(args, cwd=ctx.root, stdout=devnull, stderr=devnull)
        try:
            client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
            deadline = time.monotonic() + 300
            models = names + [f"{n}_image" for n in names]
            while True:
                with contextlib.suppress(Exception):
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start")
                time.sleep(1)
            client.close()
            yield f"127.0.0.1:{http}"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@figure("load-test", "scripts/load_test.py against dsm-export serve, with bad requests interleaved")
def load_test_block(ctx: Context) -> str:
    ctx.ensure_exports()
    with served(ctx, ["out/deit_tiny_dsm.onnx", "out/deit_tiny_none.onnx"], ["dsm", "none"]) as url:
        out = ctx.run("python", "scripts/load_test.py", "--url", url, "--models", "dsm,none", "--clients",
                      str(ctx.load_clients), "--seconds", f"{ctx.load_seconds:g}", "--bad-every", "10")
    lines = [line for line in out.splitlines() if line.strip()]
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("dsm", "none"):
            rows[cells[0]] = cells
    table = [line for line in lines if line.startswith("|")]
    prose = [line for line in lines if not line.startswith("|")]
    text = "\n\n".join([prose[0] + ".", "\n".join(table), *(line + "." for line in prose[1:])])
    if len(rows) == 2:  # good requests, p50 latency: columns 1 and 7 of the --bad-every table
        more = float(rows["dsm"][1]) / float(rows["none"][1])
        faster = float(rows["dsm"][7]) / float(rows["none"][7])
        text += (f"\n\nThe served DSM model answers {more:.2f}x the good requests of the unmerged one at "
                 f"{faster:.2f}x the median latency.")
    return text


# ------------------------------------------------------------------ README rewriting
MARKER = re.compile(r"(<!-- figures:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /figures:(?P=name) -->)", re.S)


def default_documents() -> list[str]:
    """The files the blocks live in: README.md, then every docs/*.md page."""
    return [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]


def find_blocks(paths: list[str]) -> dict[str, str]:
    """Which of ``paths`` holds each ``figures:NAME`` block: ``{name: path}``.

    Raises:
        ValueError: a name with two blocks (in one file or in two).
    """
    where: dict[str, str] = {}
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        for m in MARKER.finditer(text):
            name = m.group("name")
            if name in where:
                raise ValueError(f"two <!-- figures:{name} --> blocks: in {where[name]} and {path}")
            where[name] = path
    return where


def rewrite(readme: str, blocks: dict[str, str]) -> str:
    """Replace the body of each ``figures:NAME`` block named in ``blocks``.

    Raises:
        ValueError: a name in ``blocks`` with no marker pair in the README.
    """
    found = {m.group("name") for m in MARKER.finditer(readme)}
    missing = sorted(set(blocks) - found)
    if missing:
        raise ValueError(f"README has no <!-- figures:NAME --> block for {', '.join(missing)}")
    return MARKER.sub(lambda m: m.group(1) + blocks[m.group("name")].rstrip() + "\n" + m.group(4)
                      if m.group("name") in blocks else m.group(0), readme)


def build_parser() -> argparse.ArgumentParser:
    """The script's argparse parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="generators to run (default: all); see --list")
    parser.add_argument("--list", action="store_true", help="list the generators and exit")
    parser.add_argument("--file", "--readme", dest="files", action="append", metavar="FILE",
                        help="a Markdown file to find the blocks in (repeatable; default: README.md and docs/*.md)")
    parser.add_argument("--load-seconds", type=float, default=60.0, help="load-test time per model")
    parser.add_argument("--load-clients", type=int, default=8, help="load-test concurrent clients")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for f in FIGURES.values():
            print(f"{f.name:<12} {f.description}")
        return 0
    unknown = [n for n in args.names if n not in FIGURES]
    if unknown:
        print(f"readme_figures: error: unknown generator {unknown[0]!r} (see --list)", file=sys.stderr)
        return 2
    paths = args.files or default_documents()
    try:
        where = find_blocks(paths)
    except (OSError, ValueError) as exc:
        print(f"readme_figures: error: {exc}", file=sys.stderr)
        return 2
    names = args.names or list(FIGURES)
    missing = [n for n in names if n not in where]
    if missing:
        print(f"readme_figures: error: no block for {', '.join(missing)} in {', '.join(paths)}", file=sys.stderr)
        return 2
    ctx = Context(load_seconds=args.load_seconds, load_clients=args.load_clients)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks = {}
    for name in names:
        ctx.commands.clear()
        print(f"{name}: running", file=sys.stderr, flush=True)
        load = os.getloadavg()[0]  # other work on the machine skews timed figures: say so
        try:
            body = FIGURES[name].make(ctx)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"readme_figures: error: {name}: {exc}", file=sys.stderr)
            return 1
        blocks[name] = f"{body.rstrip()}\n\n<sub>Generated by `python research/readme_figures.py {name}` on {machine()}, {stamp}, load average {load:.1f} at the start.</sub>\n"
    updated = {}
    for path in dict.fromkeys(where[name] for name in blocks):
        with open(path, encoding="utf-8") as fh:  # again: it may have been edited meanwhile
            text = fh.read()
        updated[path] = rewrite(text, {n: body for n, body in blocks.items() if where[n] == path})
    for path, text in updated.items():  # every file rewritten, or (on an error above) none
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
        print(f"rewrote {', '.join(n for n in blocks if where[n] == path)} in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
