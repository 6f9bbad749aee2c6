"""Per-block token counts and analytic GFLOPs of a schedule on a model."""

from __future__ import annotations

from ..core.flops import schedule_flops
from ..core.models import create_model
from ..core.patch import apply, last_block_form
from ..core.schedule import Schedule
from ..graph.facts import precision_of  # noqa: F401  (inspect reports it; here before graph/facts.py)


def plan_label(t) -> str:
    """A block's plan with the tokens it really removes: ``global 13``, or for a local block
    ``local 36 (9/window x 4, r=34)`` (each of the W windows merges ``ceil(r / W)``, so the block
    can remove more than the r asked for); uneven windows list each size's share,
    ``local 9 (3/window x 1 + 2/window x 3, r=8)``."""
    if not t.per_window:
        return str(t.plan)
    asked = f", r={t.plan.r}" if t.plan.r != t.removed else ""
    # per group of equal windows: 3/window x 1 + 2/window x 3 for uneven windows
    per_r: dict[int, int] = {}
    for count, _, r_w in t.windows:
        per_r[r_w] = per_r.get(r_w, 0) + count
    parts = " + ".join(f"{r_w}/window x {count}" for r_w, count in per_r.items())
    return f"local {t.removed} ({parts}{asked})"


def inspect_schedule(model_name: str, schedule: Schedule | str, last_block: str | None = None) -> dict:
    """Token counts and FLOPs per block for ``model_name`` under ``schedule`` (random weights).

    ``last_block``: ``"prefix"``, ``"full"`` or None (as an export of ``schedule`` runs it), see
    :func:`dsm_export.core.flops.schedule_flops`. The unmerged FLOPs are timm's model's.

    Returns:
        ``{"model", "schedule", "blocks": [{"block", "plan", "tokens_in", "tokens_out",
        "attention_gflops", "merge_gflops", "mlp_gflops", "gflops"}], "gflops",
        "baseline_gflops", "flops_ratio"}``. GFLOPs count one multiply-add as one FLOP.

    Raises:
        DSMError: unknown model, unsupported architecture or impossible schedule.
    """
    if isinstance(schedule, str):
        schedule = Schedule.parse(schedule)
    model = create_model(model_name, warn_random=False)
    merged = apply(model, schedule, name=model_name)
    last_block = last_block or last_block_form(model, schedule)
    total, base, blocks = schedule_flops(model, schedule, last_block)
    rows = []
    for t, f in zip(merged.tokens, blocks):
        rows.append({
            "block": t.index,
            "plan": (f"prefix tokens only{' (r skipped)' if t.removed else ''}"
                     if t.index == len(blocks) - 1 and last_block == "prefix" else plan_label(t)),
            "tokens_in": t.tokens_in,
            "tokens_out": f.tokens_out,
            "attention_gflops": f.attention / 1e9,
            "merge_gflops": f.merge / 1e9,
            "mlp_gflops": f.mlp / 1e9,
            "gflops": f.total / 1e9,
        })
    return {
        "model": model_name,
        "schedule": schedule.spec(),
        "blocks": rows,
        "gflops": total / 1e9,
        "baseline_gflops": base / 1e9,
        "flops_ratio": base / total,
        "last_block": last_block,
    }


def _precision_line(report: dict) -> str:
    q = report.get("quantization")
    if not q:
        return report["precision"]
    parts = [q.get("mode", "static")]
    if q.get("mode") == "static":
        parts.append(f"{q.get('calibration_method')} calibration on {q.get('calibration_count')} images")
    parts.append(f"activations {q.get('activations')}")
    if q.get("smooth_alpha") is not None:
        parts.append(f"SmoothQuant alpha {q['smooth_alpha']} on {len(q.get('smoothed_layers', []))} layers")
    quantized = ", ".join(f"{v} {k}" for k, v in q.get("quantized", {}).items())
    parts.append(f"quantized {quantized}")
    if q.get("keep_fp32"):
        parts.append(f"kept fp32: {','.join(q['keep_fp32'])}")
    return f"{report['precision']} ({'; '.join(parts)})"


def format_inspection(report: dict) -> str:
    """A plain-text table of :func:`inspect_schedule`'s report (with the precision line of
    :func:`precision_of` when the report came from a file)."""
    lines = [
        f"model    {report['model']}",
        f"schedule {report['schedule']}",
    ]
    if "precision" in report:
        lines.append(f"precision {_precision_line(report)}")
    w = max([30] + [len(r["plan"]) for r in report["blocks"]])  # the plan column fits its longest entry
    lines += [
        "",
        f"{'block':>5}  {'plan':<{w}} {'tokens in':>9} {'out':>5} {'attn':>8} {'merge':>8} {'mlp':>8} {'GFLOPs':>8}",
    ]
    for r in report["blocks"]:
        lines.append(
            f"{r['block']:>5}  {r['plan']:<{w}} {r['tokens_in']:>9} {r['tokens_out']:>5} "
            f"{r['attention_gflops']:>8.4f} {r['merge_gflops']:>8.4f} {r['mlp_gflops']:>8.4f} {r['gflops']:>8.4f}")
    lines += [
        "",
        f"total {report['gflops']:.4f} GFLOPs (unmerged {report['baseline_gflops']:.4f}); "
        f"{report['flops_ratio']:.2f}x fewer FLOPs (one multiply-add = one FLOP)",
    ]
    if report.get("last_block") == "prefix":
        lines.append("the last block runs for the prefix tokens alone (only they reach the head); "
                     "unmerged = timm's model, every block on every token")
    return "\n".join(lines)
