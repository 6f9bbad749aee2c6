"""Per-block token counts and analytic GFLOPs of a schedule on a model."""

from __future__ import annotations

from .flops import schedule_flops
from .models import create_model
from .patch import apply
from .schedule import Schedule


def plan_label(t) -> str:
    """A block's plan with the tokens it really removes: ``global 13``, or for a local block
    ``local 36 (9/window x 4, r=34)`` (each of the W windows merges ``ceil(r / W)``, so the block
    can remove more than the r asked for)."""
    if not t.per_window:
        return str(t.plan)
    windows = t.removed // t.per_window
    asked = f", r={t.plan.r}" if t.plan.r != t.removed else ""
    return f"local {t.removed} ({t.per_window}/window x {windows}{asked})"


def inspect_schedule(model_name: str, schedule: Schedule | str) -> dict:
    """Token counts and FLOPs per block for ``model_name`` under ``schedule`` (random weights).

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
    total, base, blocks = schedule_flops(model, schedule)
    rows = []
    for t, f in zip(merged.tokens, blocks):
        rows.append({
            "block": t.index,
            "plan": plan_label(t),
            "tokens_in": t.tokens_in,
            "tokens_out": t.tokens_out,
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
    }


def format_inspection(report: dict) -> str:
    """A plain-text table of :func:`inspect_schedule`'s report."""
    lines = [
        f"model    {report['model']}",
        f"schedule {report['schedule']}",
        "",
        f"{'block':>5}  {'plan':<30} {'tokens in':>9} {'out':>5} {'attn':>8} {'merge':>8} {'mlp':>8} {'GFLOPs':>8}",
    ]
    for r in report["blocks"]:
        lines.append(
            f"{r['block']:>5}  {r['plan']:<30} {r['tokens_in']:>9} {r['tokens_out']:>5} "
            f"{r['attention_gflops']:>8.4f} {r['merge_gflops']:>8.4f} {r['mlp_gflops']:>8.4f} {r['gflops']:>8.4f}")
    lines += [
        "",
        f"total {report['gflops']:.4f} GFLOPs (unmerged {report['baseline_gflops']:.4f}); "
        f"{report['flops_ratio']:.2f}x fewer FLOPs (one multiply-add = one FLOP)",
    ]
    return "\n".join(lines)
