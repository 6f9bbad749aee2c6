"""Per-block statistics behind DSM's delay (Heo et al., arXiv 2303.02331, Sec. 3).

On calibration images and the unmerged model, for each block:

* ``attention_entropy``: mean entropy (nats) of the attention rows, over heads and queries;
* ``key_match_similarity``: mean cosine similarity of the best bipartite matches of the keys
  (the score ToMe merges by; sets A and B as in the merge);
* ``outlier_ratio``: max |activation| over the median |activation| of the block's output;
* ``merge_cost`` / ``merge_agreement``: KL to, and top-1 agreement with, the unmerged model when this
  block alone merges ``r`` tokens (globally); for embedding models (timm ``num_classes=0``) mean
  1 - cosine similarity to, and retrieval overlap@k with, the unmerged model's embeddings
  (``merge_cost_metric`` says which). Classifier reports also carry the cost as ``merge_kl``.

The recommended delay is the number of leading blocks whose merge-alone cost exceeds a fraction
(10 %) of the largest merge-alone cost: merging there costs the most.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from .evaluate import divergence_name, model_logits
from .visualize import pyplot
from ..core.merge import split_ab
from ..core.patch import apply
from ..core.schedule import BlockPlan, Schedule
from ..core.models import is_embedding_model
from ..fileio import atomic_path
from ..metrics import output_metrics


@torch.inference_mode()
def block_statistics(model: nn.Module, pixels: torch.Tensor, batch_size: int = 16) -> dict[str, list[float]]:
    """Attention entropy, key-match similarity and outlier ratio per block (see module docstring)."""
    depth = len(model.blocks)
    prefix = int(model.num_prefix_tokens)
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    hooks = []
    for i, blk in enumerate(model.blocks):
        hooks.append(blk.norm1.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, o)))
        hooks.append(blk.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)))
    sums = {k: np.zeros(depth) for k in ("attention_entropy", "key_match_similarity", "outlier_ratio")}
    count = 0
    try:
        for start in range(0, len(pixels), batch_size):
            x = pixels[start:start + batch_size]
            model(x)
            n_img = len(x)
            for i, blk in enumerate(model.blocks):
                attn = blk.attn
                h = inputs[i]
                b, n, _ = h.shape
                qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
                q, k, _ = qkv.unbind(0)
                q, k = attn.q_norm(q), attn.k_norm(k)
                p = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
                entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean(dim=(1, 2))  # [b]
                keys = k.mean(1)[:, prefix:]
                keys = keys / keys.norm(dim=-1, keepdim=True)
                a, bb = split_ab(keys)
                best = (a @ bb.transpose(-1, -2)).max(-1).values.mean(-1)  # [b]
                act = outputs[i].abs().flatten(1)
                ratio = act.max(-1).values / act.median(-1).values
                sums["attention_entropy"][i] += entropy.sum().item()
                sums["key_match_similarity"][i] += best.sum().item()
                sums["outlier_ratio"][i] += ratio.sum().item()
            count += n_img
    finally:
        for hk in hooks:
            hk.remove()
    return {k: (v / count).tolist() for k, v in sums.items()}


def merge_cost(model: nn.Module, pixels: torch.Tensor, r: int, base_logits: np.ndarray | None = None) -> dict[str, list[float]]:
    """Divergence (KL, or 1 - cosine for embedding models) and agreement when each block alone merges
    ``r`` tokens globally: ``{"merge_cost": [depth], "merge_agreement": [depth]}``."""
    depth = len(model.blocks)
    base = model_logits(model, pixels) if base_logits is None else base_logits
    kls, agree = [], []
    for i in range(depth):
        plan = [BlockPlan("global", r) if j == i else BlockPlan() for j in range(depth)]
        logits = model_logits(apply(model, Schedule(blocks=tuple(plan))).eval(), pixels)
        m = output_metrics(logits, base, embeddings=is_embedding_model(model))
        kls.append(m["divergence"])
        agree.append(m["agreement"])
    return {"merge_cost": kls, "merge_agreement": agree}


def recommend_delay(merge_kl: list[float], fraction: float = 0.1, metric: str = "KL") -> tuple[int, str]:
    """Leading blocks whose merge-alone cost (``metric``: KL, or 1 - cosine) exceeds ``fraction`` of
    the largest merge-alone cost.

    Merge cost falls with depth in any ViT (later blocks leave fewer blocks to spread an error), so
    the rule looks for where it stops being of the same order as the worst block.

    Returns:
        ``(delay, reason)``.
    """
    worst = max(merge_kl)
    limit = fraction * worst
    delay = 0
    while delay < len(merge_kl) and merge_kl[delay] > limit:
        delay += 1
    if delay == 0:
        return 0, (f"block 0 merged alone costs {metric} {merge_kl[0]:.4f}, not above {fraction:.0%} of the "
                   f"largest merge cost ({worst:.4f}): no delay needed")
    costs = ", ".join(f"{v:.4f}" for v in merge_kl[:delay])
    after = f"; block {delay} costs {merge_kl[delay]:.4f}" if delay < len(merge_kl) else ""
    return delay, (f"blocks 0-{delay - 1} merged alone cost {metric} {costs}, each above {fraction:.0%} of the "
                   f"largest merge cost ({worst:.4f}){after}")


def analyze(model: nn.Module, pixels: torch.Tensor, r: int = 16, fraction: float = 0.1) -> dict:
    """All statistics, per block, with the recommended delay (see module docstring)."""
    stats = block_statistics(model, pixels)
    cost = merge_cost(model, pixels, r)
    metric = divergence_name(model)
    delay, reason = recommend_delay(cost["merge_cost"], fraction, metric)
    if metric == "KL":
        cost["merge_kl"] = cost["merge_cost"]
    return {"images": len(pixels), "r": r, **stats, **cost, "merge_cost_metric": metric,
            "recommended_delay": delay, "reason": reason}


PLOTS = {
    "attention_entropy": "attention entropy (nats)",
    "key_match_similarity": "mean best-match key cosine similarity",
    "outlier_ratio": "activation outlier ratio (max / median |x|)",
    "merge_cost": "{metric} to unmerged, this block alone merging r",
}


def plot_analysis(report: dict, folder: str, model_name: str) -> list[str]:
    """One PNG per statistic in ``folder``; returns the paths."""
    plt = pyplot()
    paths = []
    for key, label in PLOTS.items():
        values = report[key]
        label = label.format(metric=report.get("merge_cost_metric", "KL"))
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.bar(range(len(values)), values, color=["tab:red" if i < report["recommended_delay"] else "tab:blue"
                                                  for i in range(len(values))])
        ax.set_xlabel("block")
        ax.set_ylabel(label)
        ax.set_xticks(range(len(values)))
        ax.set_title(f"{model_name}: {label}\n(red: recommended delay)", fontsize=9)
        fig.tight_layout()
        path = os.path.join(folder, f"{key}.png")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
