"""Per-block token counts and analytic GFLOPs of a schedule on a model."""

from __future__ import annotations

from .flops import schedule_flops
from .models import create_model
from .patch import apply
from .schedule import Schedule


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
            "plan": str(t.plan) + (f" ({t.per_window}/window)" if t.per_window else ""),
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
        f"{'block':>5}  {'plan':<22} {'tokens in':>9} {'out':>5} {'attn':>8} {'merge':>8} {'mlp':>8} {'GFLOPs':>8}",
    ]
    for r in report["blocks"]:
        lines.append(
            f"{r['block']:>5}  {r['plan']:<22} {r['tokens_in']:>9} {r['tokens_out']:>5} "
            f"{r['attention_gflops']:>8.4f} {r['merge_gflops']:>8.4f} {r['mlp_gflops']:>8.4f} {r['gflops']:>8.4f}")
    lines += [
        "",
        f"total {report['gflops']:.4f} GFLOPs (unmerged {report['baseline_gflops']:.4f}); "
        f"{report['flops_ratio']:.2f}x fewer FLOPs (one multiply-add = one FLOP)",
    ]
    return "\n".join(lines)
