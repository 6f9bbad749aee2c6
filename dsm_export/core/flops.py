"""Analytic FLOP counts of a ViT under a merge schedule.

Counted in the fvcore convention used by ToMe and DSM: one multiply-add is one FLOP (so DeiT-Tiny
at 224 px is about 1.26 GFLOPs). Counted per block, from the token counts of the schedule:

* attention on the tokens entering the block: QKV and output projections, ``QK^T`` and
  ``attn @ V``;
* merge: key mean over heads (token norms for ``metric=tokens``), cosine similarity of sets A and B, the one-hot assignment MatMul;
  the class-attention mean over heads for ``protect`` and ``prune`` blocks (a prune block has no
  similarity and no assignment; its gather moves data and counts nothing);
* MLP on the tokens leaving the block (every ``nn.Linear`` in ``blk.mlp``);

plus the patch embedding and the classifier head(s). A last block that runs for the prefix tokens
alone (``prefix_only_last``, :meth:`dsm_export.core.patch.MergedViT._last_block_prefix`) counts ``qkv``
on every token, ``QK^T``, ``attn @ V``, the output projection and the MLP on the prefix tokens,
and no merge. FLOP ratios compare with timm's model (every block on every token). Norms, softmax, GELU and adds are left out,
as fvcore leaves them out.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

from torch import nn

from .patch import last_block_form
from .schedule import BlockTokens, Schedule, resolve


@dataclass(frozen=True)
class BlockFlops:
    """FLOPs (multiply-adds) of one block, split by part."""

    index: int
    tokens_in: int
    tokens_out: int
    attention: int
    merge: int
    mlp: int

    @property
    def total(self) -> int:
        return self.attention + self.merge + self.mlp


# Multiply-adds per token of every nn.Linear under a module, by module. A search counts the FLOPs
# of tens of thousands of candidate schedules, and walking the module tree for each one cost more
# than the search's own model runs. Weak keys: an entry goes with its module. A module's linears
# are read once: replacing them afterwards (nothing in dsm-export does) would keep the old count.
_MACS_PER_TOKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_UNMERGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> timm's FLOPs (every block on every token)


def _linear_macs(module: nn.Module, tokens: int) -> int:
    """Multiply-adds of every ``nn.Linear`` under ``module`` on ``tokens`` tokens."""
    per_token = _MACS_PER_TOKEN.get(module)
    if per_token is None:
        per_token = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
        _MACS_PER_TOKEN[module] = per_token
    return tokens * per_token


def count_flops(model: nn.Module, tokens: list[BlockTokens], windows: tuple[int, int] = (2, 2),
                metric: str = "keys", merge_form: str = "mean",
                prefix_only_last: bool = False) -> tuple[int, list[BlockFlops]]:
    """Count FLOPs of a timm ViT running the given per-block token counts.

    Args:
        model: timm ``VisionTransformer``.
        tokens: from :func:`dsm_export.core.schedule.resolve`.
        windows: window grid used by local blocks (unused: the token counts carry the windows).
        metric: ``"heads"`` matches on all ``H * head_dim`` key features (normalised per head)
            instead of the ``head_dim`` of the head-averaged keys; ``"tokens"`` on the ``C``
            features of the normalised tokens (their norms counted, no key mean).
        merge_form: ``"mlerp"`` adds the token norms and the masked maximum over the assignment.
        prefix_only_last: the last block runs for the prefix tokens alone (its ``tokens_out`` is
            the prefix count).

    Returns:
        ``(total, per_block)``: total FLOPs (multiply-adds) for one image, and per-block detail.
    """
    prefix = int(model.num_prefix_tokens)
    pe = model.patch_embed.proj
    num_patches = int(math.prod(model.patch_embed.grid_size))
    k = pe.kernel_size
    total = num_patches * pe.in_channels * k[0] * k[1] * pe.out_channels
    per_block = []
    for i, (blk, t) in enumerate(zip(model.blocks, tokens)):
        attn = blk.attn
        n_in, n_out = t.tokens_in, t.tokens_out
        if prefix_only_last and i == len(model.blocks) - 1:
            # qkv on every token (the keys and values; the queries come with them), the other
            # linears (proj) and the prefix tokens' attention rows over every token
            others = _linear_macs(attn, prefix) - _linear_macs(attn.qkv, prefix)
            a = _linear_macs(attn.qkv, n_in) + others + 2 * prefix * n_in * attn.attn_dim
            mlp = _linear_macs(blk.mlp, prefix)
            per_block.append(BlockFlops(t.index, n_in, prefix, a, 0, mlp))
            total += a + mlp
            continue
        a = _linear_macs(attn, n_in) + 2 * n_in * n_in * attn.attn_dim
        merge = 0
        if t.removed and t.plan.mode == "prune":
            merge += (n_in - prefix) * attn.num_heads  # importance: class attention, mean over heads
        elif t.removed:
            hd = attn.head_dim
            n = t.matched or (n_in - prefix)  # mode=tome matches the prefix tokens too
            c = blk.norm1.normalized_shape[0] if hasattr(blk.norm1, "normalized_shape") else attn.attn_dim
            if metric == "tokens":  # token norms, then the similarity over the C token features
                merge += n * c
                hd = c
            else:
                merge += n * attn.num_heads * hd  # mean of keys over heads (or per-head norms)
            if metric == "heads":
                hd = attn.num_heads * attn.head_dim  # similarity over every head's features
            if t.protect:
                merge += n * attn.num_heads  # importance: class attention, mean over heads
            # (windows, tokens, r) per group of equal windows; one group of all tokens if global
            groups = t.windows if t.per_window else ((1, n, t.removed),)
            for count, n_g, r_g in groups:
                na, nb = math.ceil(n_g / 2), n_g // 2
                merge += count * (na * nb * hd + r_g * nb * (c + 1))  # similarity + assignment MatMul
                if merge_form == "mlerp":
                    merge += count * r_g * nb  # masked max over the assignment
            if merge_form == "mlerp":
                merge += n * c  # token norms
        mlp = _linear_macs(blk.mlp, n_out)
        per_block.append(BlockFlops(t.index, n_in, n_out, a, merge, mlp))
        total += a + merge + mlp
    head_macs = _linear_macs(model.head, 1) if isinstance(model.head, nn.Linear) else 0
    if isinstance(getattr(model, "head_dist", None), nn.Linear):
        head_macs += _linear_macs(model.head_dist, 1)
    return total + head_macs, per_block


def schedule_flops(model: nn.Module, schedule: Schedule, last_block: str | None = None) -> tuple[int, int, list[BlockFlops]]:
    """FLOPs of ``model`` under ``schedule`` and of timm's unmerged model.

    Args:
        last_block: ``"prefix"`` or ``"full"`` (see :class:`dsm_export.graph.export.ExportInfo`); None:
            as :func:`dsm_export.graph.export.export_model` exports ``schedule`` by default.

    Returns:
        ``(merged_total, unmerged_total, merged_per_block)``, multiply-adds for one image; the
        unmerged total runs every block on every token, as timm's model does.

    Raises:
        ScheduleError: if the schedule does not fit the model.
    """
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    depth, prefix = len(model.blocks), int(model.num_prefix_tokens)
    if last_block is None:
        last_block = last_block_form(model, schedule)
    merged, per_block = count_flops(model, resolve(schedule, depth, grid, prefix), schedule.windows,
                                    schedule.metric, schedule.merge,
                                    prefix_only_last=last_block == "prefix")
    base = _UNMERGED.get(model)
    if base is None:
        base, _ = count_flops(model, resolve(Schedule(), depth, grid, prefix))
        _UNMERGED[model] = base
    return merged, base, per_block
