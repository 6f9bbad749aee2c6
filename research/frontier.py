#!/usr/bin/env python3
"""The speed/accuracy frontier: INT8 alone, merging in fp32, merging stacked on INT8, tuned engines.

One run, on one machine: every engine is exported (and quantized), scored on the photos that
neither INT8 calibration nor tuning saw (the held-apart split of `dsm-export tune --calibration
128`), and timed with ONNX Runtime against the fp32 unmerged export in a single alternating run
(batch 32, median of --repeats; the fp32 unmerged export is timed again before every engine, so
each speed-up rests on a well-sampled baseline). Each tuned search adds its chosen engine and the
rest of its Pareto front. Writes a Markdown table (with a generated check of every tuned engine
from 1.5x up against INT8 alone and the fp32 schedules at the same or a higher speed-up), a JSON
file and a PNG plot (KL against measured speed-up, one line per family, the tuned engines'
held-apart Pareto front in red). `python research/readme_figures.py frontier` runs it and puts the
table into docs/results.md (its figures:frontier block). `--render` rewrites the table and plot from
the frontier.json of --output without measuring anything (after a change to how they are drawn or
judged).

    python research/frontier.py deit_tiny_patch16_224 \\
        --weights ../shared/models/deit_tiny_patch16_224.pth \\
        --images ../shared/data/imagenet-sample --tuned 2.0 2.5 \\
        --output docs

Never time while another CPU job runs: the figures are ratios from one run, but a busy machine
still bends them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import textwrap
import warnings

import matplotlib
import matplotlib.pyplot as plt
import onnxruntime as ort
import torch
from tqdm import tqdm

from dsm_export.check.evaluate import flops_ratio, model_logits, split_pixels
from dsm_export.core.models import create_model
from dsm_export.core.patch import input_size
from dsm_export.core.schedule import Schedule
from dsm_export.data import list_images
from dsm_export.engines.int8.quantize import QuantizeOptions, quantize_int8
from dsm_export.graph.export import export_model
from dsm_export.metrics import agreement_metrics
from dsm_export.search.candidates import Candidate, pareto_front, schedule_of
from dsm_export.search.engine_search import (PRECISIONS, SMOOTH_ALPHA, EngineSearchSettings, ort_logits,
                                             precision_options, search_engines)
from dsm_export.search.timing import cpu_name, ort_throughput

matplotlib.use("Agg")  # the plot is written to a file, never shown

# Schedules of each family (DeiT-Tiny): exact ToMe (mode=tome) and DSM schedules (delay + falling r,
# window-local merging, with the merge variants tune picks most), from ~1.3x to ~2x fewer FLOPs.
TOME = ("r=6,mode=tome", "r=8,mode=tome", "r=11,mode=tome", "r=13,mode=tome", "r=15,mode=tome")
DSM = ("r=16,r_end=8,delay=3,protect=16,merge=mlerp", "r=24,r_end=8,delay=3,protect=16,merge=mlerp",
       "r=27,r_end=9,delay=3,stride=2,protect=16,merge=mlerp",
       "r=34,r_end=0,delay=3,local=1,windows=1x2,protect=16,merge=mlerp",
       "r=32,r_end=4,delay=2,local=1,windows=1x2,protect=16,metric=heads,merge=mlerp")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--tome", nargs="*", default=list(TOME), help="ToMe constant-r schedules")
    parser.add_argument("--dsm", nargs="*", default=list(DSM), help="DSM schedules")
    parser.add_argument("--tuned", nargs="*", type=float, default=[],
                        help="speed-up targets for `tune --precision auto` engines, e.g. 2.0 2.5")
    parser.add_argument("--calibration-count", type=int, default=128, help="images held out of the evaluation")
    parser.add_argument("--quant-count", type=int, default=64, help="INT8 calibration images (of those)")
    parser.add_argument("--holdout", type=int, help="evaluate on the first N held-apart images only")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rungs", type=int, default=6, help="rungs of each tuned search")
    parser.add_argument("--output", default="frontier", help="folder for frontier.md/.json/.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rewrite frontier.md and .png from the frontier.json in --output")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    if args.render:
        return _render(args)
    os.makedirs(args.output, exist_ok=True)
    model = create_model(args.model, args.weights)
    calib, held, calib_pixels, held_pixels = split_pixels(model, list_images(args.images), args.calibration_count,
                                                          args.holdout)
    quant_pixels = calib_pixels.numpy()[:args.quant_count]
    base = model_logits(model, held_pixels)

    with tempfile.TemporaryDirectory(prefix="dsm-frontier-") as work:
        engines: list[dict] = []  # family, label, spec, precision, path, flops_ratio

        def add(family, label, schedule, precision, path, last_block=None):
            engines.append({"family": family, "label": label, "spec": schedule.spec(), "precision": precision,
                            "path": path, "flops_ratio": flops_ratio(model, schedule, last_block)})

        # The baseline every speed-up is taken against: the unmerged model as timm runs it (every
        # block on every token), in dsm-export's graph form. dsm-export's own unmerged export runs
        # the last block for the class token alone (exact); it, and everything built on it (INT8
        # alone too), is an engine measured against that baseline.
        base_path = os.path.join(work, "baseline.onnx")
        export_model(model, args.model, base_path, "none", weights=args.weights, full_last_block=True)
        add("fp32 unmerged", "fp32 unmerged (timm's model: every block on every token)", Schedule.parse("none"),
            "fp32", base_path, last_block="full")
        none_path = os.path.join(work, "none.onnx")
        export_model(model, args.model, none_path, "none", weights=args.weights)
        add("fp32 unmerged", "fp32 unmerged, last block for the class token alone (dsm-export's export, exact)",
            Schedule.parse("none"), "fp32", none_path)
        timm_path = os.path.join(work, "timm.onnx")
        _export_timm(model, timm_path)
        add("timm's graph", "fp32 unmerged, timm's own graph (plain torch.onnx.export, no dsm-export)",
            Schedule.parse("none"), "fp32", timm_path, last_block="full")
        for mode, activations, keep in (("static", "int8", None), ("static", "uint8", None),
                                        ("dynamic", "uint8", None), ("dynamic", "uint8", ())):
            path = os.path.join(work, f"none_int8_{mode}_{activations}{'_all' if keep == () else ''}.onnx")
            quantize_int8(none_path, path, quant_pixels,
                          QuantizeOptions(mode=mode, activations=activations, keep_fp32=keep,
                                          smooth_alpha=SMOOTH_ALPHA))
            label = ("INT8 static QDQ, symmetric (TensorRT-compatible)" if activations == "int8" and mode == "static"
                     else "INT8 static QDQ, U8S8 (ONNX Runtime only)" if mode == "static"
                     else "INT8 dynamic, first block fp32 (ONNX Runtime only)" if keep is None
                     else "INT8 dynamic, every layer (ONNX Runtime only)")
            precision = ("int8 static" + ("" if activations == "int8" else " u8") if mode == "static"
                         else "int8 dynamic" + ("" if keep is None else " all"))
            add("INT8 alone", label, Schedule.parse("none"), precision, path)
        specs = [("ToMe", s) for s in args.tome] + [("DSM", s) for s in args.dsm]
        for kind, spec in tqdm(specs, desc="export + quantize", leave=False):
            schedule = Schedule.parse(spec)
            fp32 = os.path.join(work, f"{len(engines)}_fp32.onnx")
            export_model(model, args.model, fp32, schedule, weights=args.weights)
            add("merge fp32", f"{kind} {spec}", schedule, "fp32", fp32)
            for precision, family in _MERGED_INT8.items():
                path = os.path.join(work, f"{len(engines)}_{precision}.onnx")
                quantize_int8(fp32, path, quant_pixels, precision_options(precision))
                add(family, f"{kind} {spec} + {family[len('merge + '):]}", schedule, _precision(precision), path)
        tuned_reports = []
        for target in args.tuned:
            folder = os.path.join(work, f"tuned_{target}")
            os.makedirs(folder)
            settings = EngineSearchSettings(target=target, model_name=args.model, weights=args.weights,
                                            precisions=PRECISIONS, rungs=args.rungs)
            result = search_engines(model, calib_pixels, folder, settings)  # median of 5
            tuned_reports.append({"target": target, "best": _strip(result.best), "pareto": [_strip(r) for r in result.pareto]})
            if result.best is None:
                print(f"frontier: tune found no engine at {target}x", file=sys.stderr)
                continue
            b = result.best
            add("tuned", f"tuned at {target:g}x ({b.precision}, {b.spec})", schedule_of(b),
                _precision(b.precision), b.path)
            # The rest of the search's Pareto front (calibration photos) is the tuned engine at other
            # speeds: scored and timed here too, so the plot shows a tuned curve, not two points.
            for row in result.pareto:
                if row is b or (row.spec == "none" and row.precision == "fp32"):
                    continue
                stride = f", stride={row.stride}" if (row.stride or 1) > 1 else ""
                add("tune's Pareto front", f"tune {target:g}x search: {row.precision} on its "
                    f"{row.rung:.2f}x-FLOP rung{stride}", schedule_of(row), _precision(row.precision),
                    row.path)

        for e in tqdm(engines, desc="held-apart photos", leave=False):
            logits = base if e["path"] == base_path else ort_logits(e["path"], held_pixels.numpy())
            e.update(agreement_metrics(logits, base, held.labels))
        rates = ort_throughput({str(i): e["path"] for i, e in enumerate(engines)}, batch=32, repeats=args.repeats,
                               reference="0")
        for i, e in enumerate(engines):
            e["images_per_s"] = rates[str(i)]
            e["speedup"] = rates[str(i)] / rates["0"]
            del e["path"]

    machine = (f"{cpu_name()}, {os.cpu_count()} logical CPUs, onnxruntime {ort.__version__} "
               f"CPUExecutionProvider, {os.cpu_count()} intra-op threads, batch 32, median of {args.repeats}, "
               f"engines alternating, the fp32 unmerged baseline timed before each; {len(held)} held-apart photos; "
               f"every INT8 engine with SmoothQuant alpha {SMOOTH_ALPHA} folded in, ranges and static scales "
               f"from {len(quant_pixels)} calibration photos; "
               f"{platform.node()}, "
               f"{datetime.date.today().isoformat()}")
    table = _table(engines, machine, args)
    with open(os.path.join(args.output, "frontier.md"), "w", encoding="utf-8") as fh:
        fh.write(table + "\n")
    with open(os.path.join(args.output, "frontier.json"), "w", encoding="utf-8") as fh:
        json.dump({"machine": machine, "engines": engines, "tuned": tuned_reports}, fh, indent=2)
    if not args.no_plot:
        _plot(engines, os.path.join(args.output, "frontier.png"), machine)
    print(table)
    return 0


def _render(args) -> int:
    """``--render``: the table and plot again from a measured frontier.json (no timing, no scoring)."""
    path = os.path.join(args.output, "frontier.json")
    if not os.path.isfile(path):
        print(f"frontier: no {path} to render (run without --render first)", file=sys.stderr)
        return 2
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    table = _table(data["engines"], data["machine"], args)
    with open(os.path.join(args.output, "frontier.md"), "w", encoding="utf-8") as fh:
        fh.write(table + "\n")
    if not args.no_plot:
        _plot(data["engines"], os.path.join(args.output, "frontier.png"), data["machine"])
    print(table)
    return 0


def _export_timm(model, path: str) -> None:
    """timm's model as a user exports it without dsm-export: ``torch.onnx.export(model, x, dynamo=True)``
    with a dynamic batch axis. The speed-ups are taken against dsm-export's unmerged export with every
    block on every token (timm's arithmetic in the graph form of every engine here); this row shows
    where that stands against the user's starting point.
    """
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (torch.randn(2, *input_size(model)),), dynamo=True,
                                    input_names=["pixel_values"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    program.save(path)


def _precision(precision: str) -> str:
    """The table's name of a tune precision (``int8-dynamic-all`` -> ``int8 dynamic all``)."""
    return {"int8": "int8 static", "int8-dynamic": "int8 dynamic",
            "int8-dynamic-all": "int8 dynamic all"}.get(precision, "fp32")


def dominance(engines, start: float = 1.5) -> list[dict]:
    """For each tuned engine (chosen or on a search's Pareto front) measuring at least ``start``x:
    the least KL of INT8 alone and of the fp32 merge schedules at the same or a higher measured
    speed-up (None where no such engine exists), and whether the tuned engine's KL is lower than both.

    An engine of tune's 1.00x-FLOP rung merges nothing: it is an INT8-alone engine itself, marked
    ``unmerged`` and not judged (``lower`` None), since it cannot beat itself.
    """
    out = []
    for e in sorted((e for e in engines if e["family"] in _TUNED and e["speedup"] >= start),
                    key=lambda e: e["speedup"]):
        rivals = {}
        for family in ("INT8 alone", "merge fp32"):
            kls = [o["kl"] for o in engines if o["family"] == family and o["speedup"] >= e["speedup"]]
            rivals[family] = min(kls) if kls else None
        known = [v for v in rivals.values() if v is not None]
        unmerged = e["spec"] == "none"
        out.append({"label": f"{e['family']}, {e['precision']}, {e['flops_ratio']:.2f}x fewer FLOPs",
                    "speedup": e["speedup"], "kl": e["kl"], "rivals": rivals, "unmerged": unmerged,
                    "lower": None if unmerged or not known else all(e["kl"] < v for v in known)})
    return out


def _dominance_text(rows) -> str:
    if not rows:
        return "No tuned engine measured 1.5x or more."
    unmerged = sum(r["unmerged"] for r in rows)
    merged = len(rows) - unmerged
    compared = [r for r in rows if r["lower"] is not None]
    lower, faster = sum(r["lower"] for r in compared), merged - len(compared)
    head = f"Tuned engines measuring 1.5x or more: {len(rows)}"
    if unmerged:
        what = "an INT8-alone engine itself" if unmerged == 1 else "INT8-alone engines themselves"
        head += f", {unmerged} of them unmerged (tune's 1.00x-FLOP rung: {what}, not judged)"
    head += ". "
    if not merged:
        head = head.rstrip()
    elif not compared:
        head += (f"{'The merged one is' if merged == 1 else 'The merged ones are all'} faster than every "
                 "INT8-alone and fp32-merge engine here.")
    else:
        head += (f"Of the {len(compared)} merged with an INT8-alone or fp32-merge engine at the same or a higher "
                 f"measured speed-up, {lower} {'has' if lower == 1 else 'have'} lower KL than all of those"
                 + (f"; the other {faster} {'is' if faster == 1 else 'are'} faster than every INT8-alone and "
                    "fp32-merge engine here." if faster else "."))
    lines = [head]
    for r in rows:
        rival = ", ".join(f"{k} {'none as fast' if v is None else f'{v:.4f}'}" for k, v in r["rivals"].items())
        verdict = ("unmerged, INT8 alone itself" if r["unmerged"] else "faster than all" if r["lower"] is None
                   else "lower KL" if r["lower"] else "NOT lower KL")
        lines.append(f"- {r['speedup']:.2f}x, KL {r['kl']:.4f} ({r['label']}): {verdict} "
                     f"(least KL at >= its speed-up: {rival})")
    return "\n".join(lines)


def _strip(row: Candidate | None) -> dict | None:
    """A search's candidate as frontier.json holds it: its JSON row without the (temporary) ``path``."""
    return None if row is None else {k: v for k, v in row.to_json().items() if k != "path"}


def _table(engines, machine, args) -> str:
    cmd = (f"python research/frontier.py {args.model} --weights {args.weights} --images {args.images}"
           + (f" --tuned {' '.join(f'{t:g}' for t in args.tuned)}" if args.tuned else "")
           + f" --output {args.output}")
    lines = [
        f"Generated by `{cmd}`",
        f"({machine}).",
        "",
        "| family | engine | FLOPs reduction | measured speed-up | top-1 | agreement | KL |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in sorted(engines, key=lambda e: (_FAMILIES.index(e["family"]), e["speedup"])):
        acc = "n/a" if e.get("top1_accuracy") is None else f"{100 * e['top1_accuracy']:.1f} %"
        lines.append(f"| {e['family']} | {e['label']} | {e['flops_ratio']:.2f}x | {e['speedup']:.2f}x | {acc} | "
                     f"{100 * e['top1_agreement']:.1f} % | {e['kl']:.4f} |")
    lines += ["", "Schedules of the Pareto rows: frontier.json (`tuned` reports).", "",
              _dominance_text(dominance(engines))]
    return "\n".join(lines)


_FAMILIES = ["timm's graph", "fp32 unmerged", "INT8 alone", "merge fp32", "merge + INT8 static", "merge + INT8 dynamic",
             "merge + INT8 dynamic, every layer", "tuned", "tune's Pareto front"]
_TUNED = ("tuned", "tune's Pareto front")
_MERGED_INT8 = {"int8": "merge + INT8 static", "int8-dynamic": "merge + INT8 dynamic",
                "int8-dynamic-all": "merge + INT8 dynamic, every layer"}  # tune precision -> family


def _plot(engines, path, machine) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"INT8 alone": ("tab:orange", "s"), "merge fp32": ("tab:blue", "o"),
              "merge + INT8 static": ("tab:green", "^"), "merge + INT8 dynamic": ("tab:purple", "v"),
              "merge + INT8 dynamic, every layer": ("tab:brown", "<"),
              "tuned": ("tab:red", "*"), "fp32 unmerged": ("black", "D"),
              "timm's graph": ("grey", "X")}
    for family in _FAMILIES[:-1]:
        rows = sorted((e for e in engines if e["family"] == family), key=lambda e: e["speedup"])
        if family == "INT8 alone":
            rows = [e for e in engines if e["family"] == "fp32 unmerged"] + rows
        if not rows:
            continue
        color, marker = styles[family]
        xs, ys = [e["speedup"] for e in rows], [max(e["kl"], 1e-4) for e in rows]
        line = "-" if family.startswith("merge") else ":" if family == "INT8 alone" else "none"
        ax.plot(xs, ys, linestyle=line, color=color, marker=marker, label=family if family != "tuned" else
                "tuned (chosen at a target)", markersize=12 if marker == "*" else 6, zorder=3 if marker == "*" else 2)
    # The tuned curve: every engine tune measured on its searches' Pareto fronts, re-scored on the
    # held-apart photos, reduced to those not beaten in both speed-up and KL.
    tuned = [e for e in engines if e["family"] in _TUNED]
    scored = [Candidate.from_json(e) for e in tuned]
    on_front = {id(c) for c in pareto_front(scored)}
    front = sorted((e for e, c in zip(tuned, scored) if id(c) in on_front), key=lambda e: e["speedup"])
    if front:
        ax.plot([e["speedup"] for e in front], [max(e["kl"], 1e-4) for e in front], "-", color="tab:red",
                linewidth=2, label="tune's engines (held-apart Pareto front)")
        others = [e for e in tuned if e not in front and e["family"] != "tuned"]
        ax.plot([e["speedup"] for e in others], [max(e["kl"], 1e-4) for e in others], ".", color="tab:red",
                alpha=0.5)
    ax.set_xlabel("measured ONNX Runtime speed-up over fp32 unmerged (batch 32)")
    ax.set_ylabel("KL to the fp32 unmerged model (nats, held-apart photos)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("DeiT-Tiny: merging stacked on INT8", fontsize=11)
    fig.text(0.01, 0.01, textwrap.fill(machine, 190), fontsize=6)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
