#!/usr/bin/env python3
"""The OpenVINO frontier: unmerged and merged engines in OpenVINO's default precision and NNCF INT8, and a tuned one.

One run, on one machine. The unmerged model and each ``--schedules`` schedule are exported
(:func:`dsm_export.graph.export.export_model`), and each export is built as two OpenVINO IRs with
:func:`dsm_export.engines.openvino.build_openvino`, as ``dsm-export build --backend openvino``
builds them:

* ``bf16``: OpenVINO's default compile. It runs bf16 on a CPU with AVX-512 BF16 or AMX and f32
  elsewhere (the table's "runs" column says which, read back from the compiled model);
* ``int8``: NNCF post-training quantization on the first ``--calibration-count`` photos (sorted by
  name, through the model's timm eval transform, as ``build --calibration-count`` takes them), the
  matching path and the attention MatMuls kept out, SmoothQuant's strength chosen per engine by KL
  on a quarter of those photos (``--smooth-alpha`` fixes it).

The ``--tuned`` schedule is built once, at ``--tuned-precision``. Its default is the engine
``dsm-export tune --backend openvino --target-speedup 1.6`` chose on a 2-core AMD EPYC with AVX-512
BF16 and VNNI (int8): tune picked it on its own 128 calibration photos (a seeded shuffle), so some of the photos
scored here were among them; the table says how many.

Every engine, and both baselines, are scored on the held-apart photos (those after the first
``--calibration-count``; ``--holdout N`` keeps the first N of them) against timm's fp32 unmerged
PyTorch model: KL, top-1 agreement, top-1 accuracy (the folder's labels.csv). All IRs are then
timed in ONE alternating run (:meth:`dsm_export.search.runtimes.OpenVINOEngines.throughput`:
batch ``--batch``, ``--threads`` threads, median of ``--repeats``), against both baselines: ONNX
Runtime fp32 on timm's unmerged model (every block on every token) and OpenVINO's default compile
of that same ONNX file (timed again before every engine). Each speed-up is given against both.

Writes to ``--output``: openvino_frontier.json, openvino_frontier.png (KL and agreement against
the speed-up over ONNX Runtime fp32, one marker per family, both baselines as vertical lines) and
the table inside the ``figures:openvino-frontier`` block of ``--output``/results.md (the page's
text outside the block is kept; a page without the block is refused before anything is measured;
no page: one holding only the block is written). ``python research/readme_figures.py
openvino-frontier`` runs it with ``--output docs``. ``--render`` redraws the block and the plot
from the JSON; ``--quick`` is a smoke run (one schedule, 16 calibration and 16 held-apart photos,
batch 8, 3 repeats), not a measurement.

    python research/openvino_frontier.py deit_tiny_patch16_224 \\
        --weights ../shared/models/deit_tiny_patch16_224.pth \\
        --images ../shared/data/imagenet-sample --output docs

Never time while another CPU job runs: the figures are ratios from one run, but a busy machine
still bends them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import sys
import tempfile
import textwrap

SCHEDULES = ("r=16,r_end=8,delay=3,protect=16,merge=mlerp", "r=20,r_end=8,delay=3,protect=16,merge=mlerp",
             "r=24,r_end=8,delay=3,protect=16,merge=mlerp")
TUNED = json.dumps({"blocks": ["none", "none", "none", "local 21", "global 21", "global 19", "global 18", "global 16",
                               "global 15", "global 14", "prune 13", "prune 12"],
                    "windows": "1x2", "protect": 32, "metric": "heads", "merge": "mlerp"}, separators=(",", ":"))
TUNED_PRECISION = "int8"
TUNED_ORIGIN = ("chosen by `tune --backend openvino --target-speedup 1.6` on a 2-core AMD EPYC "
                "with AVX-512 BF16 and VNNI, as int8")
QUICK = {"schedules": SCHEDULES[:1], "calibration_count": 16, "holdout": 16, "repeats": 3, "batch": 8}
DEFAULTS = {"calibration_count": 64, "holdout": None, "repeats": 7, "batch": 32}

# family -> (legend, colour, marker); the order of the table and the legend
FAMILIES = {
    "baseline": ("unmerged baselines (timm's model)", "black", "D"),
    "unmerged default": ("unmerged, OpenVINO default (bf16 IR)", "tab:orange", "s"),
    "unmerged int8": ("unmerged, NNCF INT8", "tab:brown", "P"),
    "merged default": ("merged, OpenVINO default (bf16 IR)", "tab:blue", "o"),
    "merged int8": ("merged, NNCF INT8", "tab:green", "^"),
    "tuned": ("tuned", "tab:red", "*"),
}
BLOCK = re.compile(r"(<!-- figures:openvino-frontier -->\n)(.*?)(<!-- /figures:openvino-frontier -->)", re.S)
KL_FLOOR = 1e-5  # the plot's floor (an f32 engine's KL to PyTorch is ~1e-7)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", required=True, help="photo folder with labels.csv")
    parser.add_argument("--schedules", nargs="+", help=f"DSM schedules (default: {' '.join(SCHEDULES)})")
    parser.add_argument("--tuned", default=TUNED, help=f"the tuned schedule (default: {TUNED}, {TUNED_ORIGIN}); "
                        "'' for none")
    parser.add_argument("--tuned-precision", default=TUNED_PRECISION, choices=("fp32", "bf16", "int8"),
                        help="the tuned engine's precision (default fp32)")
    parser.add_argument("--calibration-count", type=int,
                        help="INT8 calibration photos: the first N of --images; the rest are scored (default 64)")
    parser.add_argument("--holdout", type=int, help="score the first N held-apart photos only (default: all)")
    parser.add_argument("--smooth-alpha", type=float, help="SmoothQuant strength of every int8 engine "
                        "(default: chosen per engine, as `build` does)")
    parser.add_argument("--repeats", type=int, help="timing repetitions, median taken (default 7)")
    parser.add_argument("--batch", type=int, help="images per timed run (default 32)")
    parser.add_argument("--threads", type=int, help="OpenVINO and ONNX Runtime threads (default: all cores)")
    parser.add_argument("--output", default="openvino_frontier",
                        help="folder for openvino_frontier.json/.png and results.md's block")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 schedule, 16 calibration and 16 held-apart photos, batch 8, 3 repeats")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite the block and the plot from the openvino_frontier.json of --output")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    page = os.path.join(args.output, "results.md")
    if os.path.isfile(page) and not BLOCK.search(_read(page)):
        print(f"openvino_frontier: {page} has no <!-- figures:openvino-frontier --> block: add the two markers "
              "where the table goes (nothing measured)", file=sys.stderr)
        return 2
    if args.render:
        return _render(args)
    command = shlex.join(["python", "research/openvino_frontier.py", *(sys.argv[1:] if argv is None else argv)])
    for key, value in (QUICK if args.quick else {**DEFAULTS, "schedules": SCHEDULES}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < (3 if args.quick else 5):
        parser.error("--repeats must be at least 5 (3 with --quick)")
    if args.calibration_count < 8:
        parser.error("--calibration-count must be at least 8 (the SmoothQuant choice holds a quarter apart)")
    os.makedirs(args.output, exist_ok=True)
    data = measure(args)
    data["command"] = command
    data["quick"] = args.quick
    with open(os.path.join(args.output, "openvino_frontier.json"), "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    print(write_outputs(data, args.output, plot=not args.no_plot))
    return 0


def measure(args) -> dict:
    import nncf
    import numpy as np
    import onnxruntime as ort
    from tqdm import tqdm

    from dsm_export.check.evaluate import flops_ratio, load_pixels, model_logits
    from dsm_export.core.models import create_model
    from dsm_export.core.schedule import Schedule
    from dsm_export.data import list_images, split_calibration
    from dsm_export.engines.openvino import OpenVINOOptions, build_openvino
    from dsm_export.graph.export import export_model
    from dsm_export.metrics import agreement_metrics
    from dsm_export.search.runtimes import OpenVINOEngines, ort_logits
    from dsm_export.search.timing import cpu_name

    threads = args.threads or os.cpu_count()
    runtime = OpenVINOEngines(threads=threads, batch=args.batch, repeats=args.repeats)
    ov, core = runtime.ov, runtime.core
    model = create_model(args.model, args.weights)
    images = list_images(args.images)
    n_cal = args.calibration_count
    if len(images) <= n_cal:
        raise SystemExit(f"openvino_frontier: {args.images} holds {len(images)} photos: none left after "
                         f"--calibration-count {n_cal}")
    calib = images.subset(range(n_cal))
    held = images.subset(range(n_cal, len(images) if args.holdout is None else min(len(images), n_cal + args.holdout)))
    calib_pixels = load_pixels(calib, model).numpy()
    held_pixels = load_pixels(held, model)
    base = model_logits(model, held_pixels)  # timm's fp32 unmerged PyTorch model: the reference
    held_np = held_pixels.numpy()
    calib_files = [calib.path(i) for i in range(len(calib))]
    tune_seen = set(split_calibration(images, 128)[0].files) & set(held.files)

    engines: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dsm-openvino-frontier-") as work:
        # The baselines: timm's model (every block on every token) in dsm-export's graph form.
        base_onnx = os.path.join(work, "baseline.onnx")
        export_model(model, args.model, base_onnx, "none", weights=args.weights, full_last_block=True)
        config = {"INFERENCE_NUM_THREADS": int(threads)}
        ov_base = core.compile_model(ov.convert_model(base_onnx), "CPU", config)
        ov_base_runs = ov_base.get_property("INFERENCE_PRECISION_HINT").to_string()
        none = Schedule.parse("none")
        full_ratio = flops_ratio(model, none, "full")
        ort_row = {"family": "baseline", "key": "onnxruntime", "label": "ONNX Runtime fp32, unmerged (timm's model)",
                   "spec": "none", "precision": "fp32", "runs": "f32", "flops_ratio": full_ratio}
        ort_row.update(agreement_metrics(ort_logits(base_onnx, held_np, args.batch), base, held.labels))
        request = ov_base.create_infer_request()
        ov_logits = np.concatenate([request.infer({0: held_np[i:i + args.batch]})[0].copy()
                                    for i in range(0, len(held_np), args.batch)])
        ov_row = {"family": "baseline", "key": "baseline", "label": "OpenVINO default compile, unmerged (timm's model)",
                  "spec": "none", "precision": "default", "runs": ov_base_runs, "flops_ratio": full_ratio}
        ov_row.update(agreement_metrics(ov_logits, base, held.labels))
        del request, ov_base

        builds = [("unmerged", "none", ("bf16", "int8"))]
        builds += [("merged", spec, ("bf16", "int8")) for spec in args.schedules]
        if args.tuned:
            builds.append(("tuned", args.tuned, (args.tuned_precision,)))
        bar = tqdm(total=sum(len(p) for _, _, p in builds), desc="export + build", leave=False)
        for kind, spec, precisions in builds:
            schedule = Schedule.parse(spec)
            onnx_path = os.path.join(work, f"fp32_{len(engines)}.onnx")
            export_model(model, args.model, onnx_path, schedule, weights=args.weights)
            for precision in precisions:
                xml = os.path.join(work, f"ov_{precision}_{len(engines)}.xml")
                log: list[str] = []
                with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout is the table's
                    rec = build_openvino(onnx_path, xml, OpenVINOOptions(precision, smooth_alpha=args.smooth_alpha),
                                         pixels=calib_pixels if precision == "int8" else None,
                                         files=calib_files if precision == "int8" else None, log=log.append)
                family = "tuned" if kind == "tuned" else f"{kind} {'int8' if precision == 'int8' else 'default'}"
                row = {"family": family, "key": str(len(engines)), "spec": spec, "precision": precision,
                       "flops_ratio": flops_ratio(model, schedule), "path": xml}
                if precision == "int8":
                    row["smooth_alpha"] = rec["smooth_alpha"]
                    row["smooth_trials"] = rec["smooth_trials"]
                engines.append(row)
                bar.update()
        bar.close()

        for e in tqdm(engines, desc="held-apart photos", leave=False):
            e.update(agreement_metrics(runtime.outputs(e["path"], held_np), base, held.labels))
            runs = runtime._runner(e["path"]).inference_precision
            e["runs"] = f"int8 + {runs}" if e["precision"] == "int8" else runs
        rates = runtime.throughput({e["key"]: e["path"] for e in engines}, base_onnx)
        runtime.release()
        for e in engines:
            del e["path"]

    rows = [ort_row, ov_row, *engines]
    for e in rows:
        e["images_per_s"] = rates[e["key"]]
        e["speedup_ort"] = rates[e["key"]] / rates["onnxruntime"]
        e["speedup_openvino"] = rates[e["key"]] / rates["baseline"]
    info = runtime.machine()
    return {
        "machine": {**info, "nncf": nncf.__version__, "onnxruntime": ort.__version__, "cpu": cpu_name(),
                    "logical_cpus": os.cpu_count(), "baseline_runs": ov_base_runs,
                    "timing": runtime.timings[-1] if runtime.timings else None,
                    "date": datetime.date.today().isoformat()},
        "photos": {"calibration": len(calib), "held_apart": len(held), "first_held": n_cal,
                   "seen_by_tune": len(tune_seen)},
        "tuned": {"spec": args.tuned, "precision": args.tuned_precision,
                  "origin": TUNED_ORIGIN if args.tuned == TUNED else "given by --tuned"},
        "engines": rows,
    }


def header(data: dict) -> str:
    m, p = data["machine"], data["photos"]
    bf16 = ("with BF16 (AVX-512 BF16 or AMX): the default compile runs bf16" if m["cpu_bf16"] else
            "without BF16 (no AVX-512 BF16 or AMX): OpenVINO's default compile, and the bf16 IRs, run f32")
    return (f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {bf16}; {m['threads']} threads, batch {m['batch']}, "
            f"median of {m['repeats']}, every IR and ONNX Runtime fp32 in one alternating run, OpenVINO's "
            f"default unmerged compile timed before each IR{_quiet(m)}; openvino {m['openvino']}, nncf {m['nncf']}, "
            f"onnxruntime {m['onnxruntime']}; {p['held_apart']} held-apart photos (from photo {p['first_held'] + 1} "
            f"of the folder, sorted by name), int8 calibrated on the first {p['calibration']}; {m['date']}")


def _quiet(m: dict) -> str:
    """How the pairs were kept (OpenVINOEngines' quiet filter), for the header; empty for older JSON."""
    t = m.get("timing")
    if not t or not t.get("kept"):
        return ""
    kept = min(t["kept"].values())
    if t.get("fallback"):
        return (f"; no repetition of {t['repetitions']} ran at full speed ({m['quiet']:.0%} of the baseline's), so "
                f"every pair counted")
    return (f", counting the pairs where that baseline ran at {m['quiet']:.0%} or more of its full speed "
            f"({t['full_speed']:.1f} images/s; at least {kept} per engine, of {t['repetitions']} repetitions)")


def table(data: dict) -> str:
    lines = [f"Generated by `{data['command']}`", f"({header(data)}).", ""]
    if data.get("quick"):
        lines += ["**`--quick` smoke run: few photos and repeats, not a measurement.**", ""]
    lines += ["| family | engine | runs | FLOPs reduction | images/s | vs ONNX Runtime fp32 | vs OpenVINO default "
              "| top-1 | agreement | KL |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = list(FAMILIES)
    for e in sorted(data["engines"], key=lambda e: (order.index(e["family"]), e["key"] != "onnxruntime",
                                                   e["flops_ratio"], e["speedup_ort"])):
        acc = "n/a" if e.get("top1_accuracy") is None else f"{100 * e['top1_accuracy']:.1f} %"
        lines.append(f"| {e['family']} | {_label(e)} | {e['runs']} | {e['flops_ratio']:.2f}x | {e['images_per_s']:.1f} | "
                     f"{e['speedup_ort']:.2f}x | {e['speedup_openvino']:.2f}x | {acc} | "
                     f"{100 * e['top1_agreement']:.1f} % | {e['kl']:.4f} |")
    t, p = data["tuned"], data["photos"]
    notes = ["KL and agreement are to timm's fp32 unmerged PyTorch model on the same photos. The unmerged "
             "engines are dsm-export's unmerged export (the last block for the class token alone, exact), the "
             "baselines timm's model (every block on every token)."]
    if t["spec"]:
        origin = TUNED_ORIGIN if t["spec"] == TUNED else t["origin"]
        notes.append(f"The tuned engine ({t['precision']}) was {origin}; tune chose it on its own 128 "
                     f"calibration photos (a seeded shuffle of the folder), {p['seen_by_tune']} of the "
                     f"{p['held_apart']} photos scored here among them.")
    if any("smooth_alpha" in e for e in data["engines"]):
        notes.append("SmoothQuant strength of the int8 engines: " + ", ".join(
            f"{_label(e)}: {e['smooth_alpha']:g}" for e in data["engines"] if "smooth_alpha" in e) + ".")
    return "\n".join(lines + ["", " ".join(notes)])


def _label(e: dict) -> str:
    if e["family"] == "baseline":
        return e["label"]
    what = "unmerged" if e["spec"] == "none" else e["spec"]
    return f"{what} ({e['precision']} IR)"


def write_outputs(data: dict, output: str, plot: bool = True) -> str:
    """The block into ``output``/results.md (the page around it kept) and the plot; returns the block's body."""
    body = table(data)
    path = os.path.join(output, "results.md")
    text = _read(path) if os.path.isfile(path) else None
    if text and BLOCK.search(text):
        text = BLOCK.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text, count=1)
    elif text:
        raise SystemExit(f"openvino_frontier: {path} has no <!-- figures:openvino-frontier --> block")
    else:
        text = "# OpenVINO frontier\n\n<!-- figures:openvino-frontier -->\n" + body + "\n<!-- /figures:openvino-frontier -->\n"
    from dsm_export.fileio import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    if plot:
        _plot(data, os.path.join(output, "openvino_frontier.png"))
    return body


def _render(args) -> int:
    path = os.path.join(args.output, "openvino_frontier.json")
    if not os.path.isfile(path):
        print(f"openvino_frontier: no {path} to render (run without --render first)", file=sys.stderr)
        return 2
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    print(write_outputs(data, args.output, plot=not args.no_plot))
    return 0


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = data["engines"]
    ov_base = next(e for e in engines if e["key"] == "baseline")
    m = data["machine"]
    fig, (ax_kl, ax_agree) = plt.subplots(1, 2, figsize=(12, 5.6))
    for ax, key, scale in ((ax_kl, "kl", 1.0), (ax_agree, "top1_agreement", 100.0)):
        for family, (legend, color, marker) in FAMILIES.items():
            if family == "baseline":
                continue
            rows = sorted((e for e in engines if e["family"] == family), key=lambda e: e["speedup_ort"])
            if not rows:
                continue
            ys = [max(e[key], KL_FLOOR) if key == "kl" else scale * e[key] for e in rows]
            ax.plot([e["speedup_ort"] for e in rows], ys, linestyle="-" if family.startswith("merged") else "none",
                    color=color, marker=marker, markersize=13 if marker == "*" else 7, label=legend, zorder=3)
        for x, color, text in ((1.0, "black", "ONNX Runtime fp32 unmerged"),
                               (ov_base["speedup_ort"], "grey", f"OpenVINO default unmerged ({m['baseline_runs']})")):
            ax.axvline(x, color=color, linestyle="--", linewidth=1, zorder=1)
            ax.text(x, 0.98, f" {text}", transform=ax.get_xaxis_transform(), rotation=90, va="top", ha="right",
                    fontsize=7, color=color)
        ax.set_xlabel("speed-up over ONNX Runtime fp32 unmerged (timm's model, same run)")
        ax.grid(True, which="both", alpha=0.3)
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel(f"KL to timm's fp32 model (nats; floor {KL_FLOOR:g})")
    ax_agree.set_ylabel("top-1 agreement with timm's fp32 model (%)")
    handles, labels = ax_kl.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, bbox_to_anchor=(0.5, 0.045),
               frameon=False)
    title = "DeiT-Tiny in OpenVINO: merging, NNCF INT8, tuned" + (" (--quick smoke run)" if data.get("quick") else "")
    fig.suptitle(title, fontsize=11)
    fig.text(0.01, 0.01, textwrap.fill(header(data), 230), fontsize=6)
    fig.tight_layout(rect=(0, 0.1, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
