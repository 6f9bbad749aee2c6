"""Applying a merge schedule to a timm Vision Transformer.

:func:`apply` wraps a timm ``VisionTransformer`` (weights shared, the original left untouched) in a
:class:`MergedViT` whose forward runs the model's own modules block by block and merges tokens
between attention and MLP where the schedule says, as ToMe's ``ToMeBlock`` does (Bolya et al. 2023,
Sec. 3): keys averaged over heads as the similarity metric, bipartite soft matching, size-weighted
merge, size tracking and proportional attention (``log(size)`` added to the attention logits).
Prefix tokens (class, distillation, registers) are never merged; average pooling is weighted by
token size.

Two implementations, chosen by ``impl``:

* ``"reference"``: ToMe's scatter-based merge, one window at a time in a Python loop, attention
  through ``torch.nn.functional.scaled_dot_product_attention``. The independent check.
* ``"export"``: gather plus one-hot MatMul merges with windows as a tensor axis and explicit
  softmax attention, one head at a time on column blocks of ``qkv`` (no layout transposes, see
  :meth:`MergedViT._attention_per_head`); every shape static; this is what is exported to ONNX.
  Where only the prefix tokens' outputs reach the head (``global_pool='token'``), its last block
  runs queries, attention rows, projection and MLP for the prefix tokens alone
  (:meth:`MergedViT._last_block_prefix`): the same logits for less work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionPoolLatent
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..errors import UnsupportedModelError
from .merge import (
    bipartite_soft_matching,
    heads_metric,
    heads_metric_of,
    merge_sum_scatter,
    merge_wavg_onehot,
    merge_wavg_scatter,
    keep_tokens,
    tokens_metric,
    token_mask,
    tome_distill_order,
    top_tokens,
    window_permutation,
)
from .hf import hidden_state_output
from .schedule import BlockTokens, Schedule, resolve

IMPLS = ("reference", "export")


def check_supported(model: nn.Module, name: str | None = None) -> None:
    """Refuse models whose token mixing DSM cannot merge through.

    Supported: timm ``VisionTransformer`` (and ``VisionTransformerDistilled``) with standard
    ``Block``/``Attention`` layers, optional LayerScale, qk-norm, register tokens, class-token or
    average pooling.

    Raises:
        UnsupportedModelError: naming the model and the reason (e.g. Swin, windowed or rotary
            attention, relative position bias, parallel blocks, attention pooling).
    """
    label = name or type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"model {label!r} ({type(model).__name__}) is not supported: dsm-export merges tokens in "
            "timm VisionTransformer models with global attention only")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise UnsupportedModelError(
                f"model {label!r} is not supported: block {i} is {type(blk).__name__}, "
                "not a standard timm ViT Block")
        if type(blk.attn) is not Attention or getattr(blk.attn, "gate", None) is not None:
            raise UnsupportedModelError(
                f"model {label!r} is not supported: block {i} uses {type(blk.attn).__name__}"
                f"{' (gated)' if getattr(blk.attn, 'gate', None) is not None else ''}, "
                "not plain global multi-head attention")
    pool = getattr(model, "attn_pool", None)
    if pool is not None and (type(pool) is not AttentionPoolLatent or pool.latent_len != 1 or pool.pool != "token"
                             or pool.pos_embed is not None or model.pool_include_prefix):
        raise UnsupportedModelError(
            f"model {label!r} is not supported: attention pooling other than one latent query over the "
            "patch tokens (SigLIP's 'map' head)")
    if model.global_pool not in ("token", "avg", "map"):
        raise UnsupportedModelError(
            f"model {label!r} is not supported: global_pool={model.global_pool!r} "
            "(supported: 'token', 'avg', 'map')")
    if model.global_pool == "avg" and getattr(model, "pool_include_prefix", False):
        raise UnsupportedModelError(f"model {label!r} is not supported: pooling includes prefix tokens")
    if getattr(model, "dynamic_img_size", False):
        raise UnsupportedModelError(
            f"model {label!r} is not supported: dynamic_img_size (token counts must be static)")


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """The patch grid ``(rows, cols)`` of a timm ViT."""
    return tuple(int(g) for g in model.patch_embed.grid_size)


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """The static input size ``(channels, height, width)`` of a timm ViT."""
    h, w = (int(v) for v in model.patch_embed.img_size)
    return int(model.patch_embed.proj.in_channels), h, w


class MergedViT(nn.Module):
    """A timm ViT running a fixed DSM/ToMe merge schedule.

    Args:
        model: a timm ``VisionTransformer`` in eval mode; its parameters are shared, not copied.
        schedule: the merge schedule (see :mod:`dsm_export.core.schedule`).
        impl: ``"reference"`` or ``"export"`` (see module docstring).
        name: model name for error messages.
        full_last_block: export form only: run the last block on every token, as timm does, instead
            of on the prefix tokens alone (used for the timm-equivalent baseline).

    Input ``[B, 3, H, W]`` float32 pixels (normalised); output ``[B, num_classes]`` logits.

    Raises:
        UnsupportedModelError: for architectures DSM cannot handle.
        ScheduleError: if the schedule does not fit the model.
    """

    def __init__(self, model: nn.Module, schedule: Schedule, impl: str = "reference", name: str | None = None,
                 full_last_block: bool = False):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        check_supported(model, name)
        self.model = model
        self.schedule = schedule
        self.impl = impl
        self.grid = patch_grid(model)
        self.num_prefix = int(model.num_prefix_tokens)
        self.tome = schedule.mode == "tome"
        self.mlerp = schedule.merge == "mlerp"
        self.unit_metric = schedule.metric in ("heads", "tokens")  # their rows are unit-norm already
        self.has_class_token = getattr(model, "cls_token", None) is not None
        self.has_dist_token = getattr(model, "dist_token", None) is not None
        if self.tome and int(getattr(model, "num_reg_tokens", 0) or 0):
            raise UnsupportedModelError(
                f"model {name or type(model).__name__!r}: mode=tome reproduces ToMe, which knows class and "
                "distillation tokens only, not register tokens (use the default mode)")
        self.tokens: list[BlockTokens] = resolve(schedule, len(model.blocks), self.grid, self.num_prefix)
        self.windows = schedule.windows
        uses_local = any(t.per_window for t in self.tokens)
        perm = window_permutation(self.grid, self.windows) if uses_local else torch.arange(0)
        self.register_buffer("window_perm", perm, persistent=False)
        self.track_source = False  # reference only: record which patches each token stands for
        self.sources: list[torch.Tensor] = []
        self.hidden_states = hidden_state_output(model)
        self.prefix_only_last = (impl == "export" and not full_last_block
                                 and prefix_only_last_block(model, self.tome))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(pixel_values)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        size = None  # all ones until the first merge: no proportional-attention term needed
        in_windows = False
        if self.track_source:
            if self.impl != "reference":
                raise ValueError("track_source needs impl='reference'")
            n = x.shape[1] - self.num_prefix
            self._source = torch.eye(n, dtype=x.dtype, device=x.device).expand(x.shape[0], n, n)
            if self.tome:  # prefix tokens take part in ToMe's split: give them (empty) rows
                self._source = torch.cat([x.new_zeros(x.shape[0], self.num_prefix, n), self._source], dim=1)
            self.sources = []
        last = len(m.blocks) - 1
        for i, (blk, t) in enumerate(zip(m.blocks, self.tokens)):
            if i == last and self.prefix_only_last:
                x = self._last_block_prefix(blk, x, size)
                break
            if size is None and t.removed == 0 and self.impl == "reference":
                x = blk(x)  # dense block: the model's own code
                if self.track_source:
                    self.sources.append(self._patch_sources())
                continue
            if t.per_window and not in_windows:
                p = self.num_prefix
                x = torch.cat([x[:, :p], torch.index_select(x[:, p:], 1, self.window_perm)], dim=1)
                if self.track_source:
                    self._source = torch.index_select(self._source, 1, self.window_perm)
                in_windows = True
            x, size = self._block(blk, x, size, t)
            if self.track_source:
                self.sources.append(self._patch_sources())
        if self.hidden_states:  # Hugging Face last_hidden_state: the tokens themselves
            return m.norm(x) if m.hidden_state_norm else x
        x = m.norm(x)
        return self._head(x, size)

    # ------------------------------------------------------------------ internals
    def _patch_sources(self):
        return self._source[:, self.num_prefix:] if self.tome else self._source

    def _block(self, blk, x, size, t: BlockTokens):
        """ToMe block: attention with proportional attention, merge, MLP (on fewer tokens)."""
        needs_importance = bool(t.removed) and (t.plan.mode == "prune" or t.protect > 0)
        attn_out, keys, importance = self._attention(blk.attn, blk.norm1(x), size, needs_importance)
        x = x + blk.drop_path1(blk.ls1(attn_out))
        if t.removed:
            if size is None and (self.impl == "reference" or self.tome or t.plan.mode == "prune"):
                size = torch.ones_like(x[..., :1])
            if self.tome:
                x, size = self._merge_tome(x, size, keys, t)
            else:
                x, size = self._merge(x, size, keys, t, importance)  # export: size None means all ones
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return x, size

    def _last_block_prefix(self, blk, x, size):
        """The last block for the prefix tokens alone: ``[B, N, C]`` in, ``[B, prefix, C]`` out.

        The head reads only the prefix tokens (``global_pool='token'``) and every sub-layer but
        attention acts per token, so the other tokens' outputs, and the block's merge (which leaves
        the prefix tokens untouched), are dead work. Keys and values still cover every token; the
        queries, attention rows, projection and MLP cover the prefix tokens. Exact: the prefix
        rows are the ones the full block computes.
        """
        p = self.num_prefix
        attn_out, _, _ = self._attention_per_head(blk.attn, blk.norm1(x), size, queries=p)
        x = x[:, :p] + blk.drop_path1(blk.ls1(attn_out))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def _attention(self, attn, x, size, importance: bool = False):
        """timm ``Attention`` with ``log(size)`` added to the logits.

        Returns:
            ``(out [B, N, C], metric, importance [B, N] or None)``: the metric is the keys averaged
            over heads ``[B, N, head_dim]``, or for ``metric=heads`` each head's normalised keys
            ``[B, N, H * head_dim]`` (:func:`~dsm_export.core.merge.heads_metric`), or for
            ``metric=tokens`` the normalised input ``x`` itself, unit rows ``[B, N, C]``
            (:func:`~dsm_export.core.merge.tokens_metric`); importance is the
            class token's attention to each token (mean over heads), or for models without a class
            token the mean attention each token receives.
        """
        if self.impl == "export":
            return self._attention_per_head(attn, x, size, importance)
        _, n, _ = x.shape
        qkv = attn.qkv(x).reshape(-1, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = None if size is None else size.log()[:, None, None, :, 0]  # [B, 1, 1, N]
        imp = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if importance:  # the attention weights SDPA does not return, recomputed
            qi = q[:, :, :1] if self.has_class_token else q
            w = (qi * attn.scale) @ k.transpose(-2, -1)
            w = torch.softmax(w if bias is None else w + bias, dim=-1)
            imp = w.mean(dim=2).mean(dim=1)
        out = out.transpose(1, 2).reshape(-1, n, attn.attn_dim)
        out = attn.proj(attn.norm(out))
        return attn.proj_drop(out), self._metric(x, lambda: heads_metric(k), lambda: k.mean(dim=1)), imp

    def _attention_per_head(self, attn, x, size, importance: bool = False, queries: int | None = None):
        """The export form of :meth:`_attention`: one slice of the ``qkv`` output per head, no transposes.

        timm's layout reshapes ``qkv`` to ``[3, B, heads, N, head_dim]`` and back, which ONNX
        Runtime runs as full Transpose copies (12 % of an INT8 DeiT-Tiny's time on the CPU). Here
        ``qkv`` (``[B, N, 3 * C]``) is split along its last axis into the ``3 * heads`` column blocks
        ``[B, N, head_dim]`` that timm's reshape names, each head attends on its own
        (``k^T`` folds into ONNX Runtime's ``FusedMatMul``, and TensorRT's MatMul), and the heads'
        outputs are concatenated back in timm's order. Same arithmetic per element as the reference.
        ``queries``: attend for the first ``queries`` tokens only (``out`` ``[B, queries, C]``).
        """
        heads, d = attn.num_heads, attn.head_dim
        cols = attn.qkv(x).split(d, dim=-1)  # q of head 0..H-1, then k, then v: timm's order
        bias = None if size is None else size.log().transpose(1, 2)  # [B, 1, N]
        outs, keys, rows = [], [], []
        for h in range(heads):
            q, k, v = attn.q_norm(cols[h]), attn.k_norm(cols[heads + h]), cols[2 * heads + h]
            if queries is not None:
                q = q[:, :queries]
            logits = (q * attn.scale) @ k.transpose(-2, -1)  # [B, N, N]
            if bias is not None:
                logits = logits + bias
            probs = logits.softmax(dim=-1)
            outs.append(probs @ v)
            keys.append(k)
            if importance and self.has_class_token:
                # The class token's row recomputed on its own, as the reference does: a second
                # reader of ``probs`` stops OpenVINO fusing this head's MatMul-Softmax-MatMul into
                # its MHA kernel (the merged blocks' attention then ran unfused, in f32 between
                # layout Reorders: a quarter of an INT8 engine's time).
                row = (q[:, :1] * attn.scale) @ k.transpose(-2, -1)
                rows.append((row if bias is None else row + bias).softmax(dim=-1)[:, 0])
            elif importance:
                rows.append(probs.mean(dim=1))
        out = attn.proj(attn.norm(torch.cat(outs, dim=-1)))
        # Means over heads as Add chains: stack + ReduceMean over a leading axis costs ONNX Runtime
        # a copy and a slow reduction (ReduceMean + Concat ~4 % of a merged fp32 DeiT-Tiny).
        metric = None if queries is not None else self._metric(x, lambda: heads_metric_of(keys), lambda: _mean_of(keys))
        imp = _mean_of(rows) if importance else None
        return attn.proj_drop(out), metric, imp

    def _metric(self, x, heads, keys):
        """The matching features of the schedule's ``metric``: ``[B, N, d]`` from the normalised
        block input ``x`` (``tokens``), or from the keys (``heads()``, ``keys()``)."""
        if self.schedule.metric == "tokens":
            return tokens_metric(x)
        return heads() if self.schedule.metric == "heads" else keys()

    def _merge_tome(self, x, size, keys, t: BlockTokens):
        """ToMe's merge of the whole sequence, prefix tokens protected (``tome/merge.py``)."""
        p = self.num_prefix
        protected = torch.arange(x.shape[1], device=x.device) < p if p else None
        m = bipartite_soft_matching(keys, t.removed, protected=protected, sort_unmerged=self.has_class_token)
        if self.impl == "reference":
            if self.track_source:
                self._source = merge_sum_scatter(self._source, m)
                if self.has_dist_token:
                    self._source = tome_distill_order(self._source, m.unm_idx.shape[-1])
            x, size = merge_wavg_scatter(x, size, m)
        else:
            x, size = merge_wavg_onehot(x, size, m)
        if self.has_dist_token:
            n_unm = m.unm_idx.shape[-1]
            x, size = tome_distill_order(x, n_unm), tome_distill_order(size, n_unm)
        return x, size

    def _merge(self, x, size, keys, t: BlockTokens, importance=None):
        """Merge (or prune) the non-prefix tokens of ``x`` ``[B, N, C]`` as block ``t`` says.

        ``size`` may be None (all ones) in the export implementation only."""
        p = self.num_prefix
        protected = None
        if t.protect:  # the most-attended tokens neither merge away nor receive merges
            protected = token_mask(top_tokens(importance[:, p:], t.protect, ascending=False), x.shape[1] - p)
        plain = t.plan.mode != "prune" and not t.per_window
        if plain and self.impl == "export":  # prefix tokens pass through in place
            m = bipartite_soft_matching(keys, t.removed, protected=protected, unit=self.unit_metric, prefix=p)
            return merge_wavg_onehot(x, size, m, prefix=p, mlerp=self.mlerp)
        kt = keys[:, p:]
        xp, xt = x[:, :p], x[:, p:]
        sp = torch.ones_like(xp[..., :1]) if size is None else size[:, :p]
        st = None if size is None else size[:, p:]
        if t.plan.mode == "prune":
            keep = top_tokens(importance[:, p:], xt.shape[1] - t.removed)
            if self.track_source:
                self._source = keep_tokens(self._source, keep)
            xt, st = keep_tokens(xt, keep), keep_tokens(st, keep)
        elif t.per_window:
            xt, st = self._merge_local(xt, st, kt, t.windows)
        else:  # reference form
            m = bipartite_soft_matching(kt, t.removed, protected=protected, unit=self.unit_metric)
            if self.track_source:
                self._source = merge_sum_scatter(self._source, m)
            xt, st = merge_wavg_scatter(xt, st, m, mlerp=self.mlerp)
        return torch.cat([xp, xt], dim=1), torch.cat([sp, st], dim=1)

    def _merge_local(self, x, size, keys, groups):
        """Merge inside each window. ``groups`` is :attr:`BlockTokens.windows`: ``(count, tokens, r)``
        per group of equal windows, contiguous in that order; each window merges its own ``r``."""
        c, d = x.shape[2], keys.shape[-1]
        if self.impl == "reference":  # one window at a time, ToMe's scatter merge
            xs, ss, srcs = [], [], []
            start = 0
            for count, n_w, r_w in groups:
                for _ in range(count):
                    sl = slice(start, start + n_w)
                    mw = bipartite_soft_matching(keys[:, sl], r_w, unit=self.unit_metric)
                    xw, sw = merge_wavg_scatter(x[:, sl], size[:, sl], mw, mlerp=self.mlerp)
                    xs.append(xw)
                    ss.append(sw)
                    if self.track_source:
                        srcs.append(merge_sum_scatter(self._source[:, sl], mw))
                    start += n_w
            if self.track_source:
                self._source = torch.cat(srcs, dim=1)
            return torch.cat(xs, dim=1), torch.cat(ss, dim=1)
        xs, ss = [], []
        lengths = [count * n_w for count, n_w, _ in groups]
        if len(groups) == 1:
            x_g, k_g, s_g = [x], [keys], [size]
        else:  # one Split per tensor: the groups are contiguous
            x_g, k_g = torch.split(x, lengths, dim=1), torch.split(keys, lengths, dim=1)
            s_g = [None] * len(groups) if size is None else torch.split(size, lengths, dim=1)
        for (count, n_w, r_w), xg, kg, sg in zip(groups, x_g, k_g, s_g):
            # the windows of a group on their own axis: [B, count, n_w, C]
            mw = bipartite_soft_matching(kg.reshape(-1, count, n_w, d), r_w, unit=self.unit_metric)
            sw = None if sg is None else sg.reshape(-1, count, n_w, 1)  # None: all ones
            xw, sw = merge_wavg_onehot(xg.reshape(-1, count, n_w, c), sw, mw, mlerp=self.mlerp)
            n_out = count * (n_w - r_w)
            xs.append(xw.reshape(-1, n_out, c))
            ss.append(sw.reshape(-1, n_out, 1))
        if len(groups) == 1:
            return xs[0], ss[0]
        return torch.cat(xs, dim=1), torch.cat(ss, dim=1)

    def _head(self, x, size):
        m = self.model
        if m.attn_pool is not None:  # SigLIP's MAP head: merged tokens weigh by their size
            p = self.num_prefix
            xt = x[:, p:]
            bias = None if size is None else size[:, p:].log().transpose(1, 2)  # [B, 1, N]
            if self.impl == "reference":
                pooled = m.attn_pool(xt, attn_mask=None if bias is None else bias[:, None])
            else:
                pooled = _attention_pool(m.attn_pool, xt, bias)
            return m.head(m.head_drop(m.fc_norm(pooled)))
        if m.global_pool == "avg":
            p = self.num_prefix
            xt = x[:, p:]
            if size is None:
                pooled = xt.mean(dim=1)
            else:
                st = size[:, p:]
                pooled = (xt * st).sum(dim=1) / st.sum(dim=1)
            return m.head(m.head_drop(m.fc_norm(pooled)))
        return m.forward_head(x)


def prefix_only_last_block(model: nn.Module, tome: bool = False) -> bool:
    """Whether only the prefix tokens of ``model``'s last block reach its head.

    True for timm's ``global_pool='token'`` (the class token, and the distillation token of
    distilled DeiT, feed the head(s)), except under ``mode=tome`` with a distillation token, where
    ToMe reorders tokens and the distillation token's row moves.
    """
    if getattr(model, "global_pool", None) != "token" or getattr(model, "attn_pool", None) is not None:
        return False
    if hidden_state_output(model):  # every token is an output
        return False
    has_dist = getattr(model, "dist_token", None) is not None
    return getattr(model, "cls_token", None) is not None and not (tome and has_dist)


def last_block_form(model: nn.Module, schedule: Schedule) -> str:
    """How an export of ``schedule`` runs ``model``'s last block by default: ``"prefix"`` (for the
    prefix tokens alone, :func:`prefix_only_last_block`) or ``"full"``."""
    return "prefix" if prefix_only_last_block(model, schedule.mode == "tome") else "full"


def _attention_pool(pool: AttentionPoolLatent, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """timm's ``AttentionPoolLatent`` (one latent query, no position embedding) as explicit per-head
    MatMul-Softmax-MatMul with ``bias`` ``[B, 1, N]`` (``log(size)``) added to the logits, the export form
    of its SDPA call: ``x`` ``[B, N, C]`` -> ``[B, C]``."""
    heads, d = pool.num_heads, pool.head_dim
    q = pool.q(pool.latent).split(d, dim=-1)  # [1, 1, d] per head
    kv = pool.kv(x).split(d, dim=-1)  # k of head 0..H-1, then v: timm's reshape order
    outs = []
    for h in range(heads):
        k, v = pool.k_norm(kv[h]), kv[heads + h]
        logits = (pool.q_norm(q[h]) * pool.scale) @ k.transpose(-2, -1)  # [B, 1, N]
        if bias is not None:
            logits = logits + bias
        outs.append(logits.softmax(dim=-1) @ v)
    out = pool.proj_drop(pool.proj(torch.cat(outs, dim=-1)))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    return out[:, 0]


def _mean_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise mean of equal-shaped tensors, summed left to right (as torch's mean over 3 heads)."""
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total / len(tensors) if len(tensors) > 1 else total


def apply(model: nn.Module, schedule: Schedule | str, impl: str = "reference", name: str | None = None,
          full_last_block: bool = False) -> MergedViT:
    """Apply a merge schedule to a timm ViT (DSM, Heo et al. arXiv 2303.02331; ToMe, Bolya et al. 2023).

    Args:
        model: timm ``VisionTransformer``; put it in eval mode first for inference.
        schedule: a :class:`Schedule` or its text form (``"r=13,delay=2,local=4,windows=2x2"``).
        impl: ``"reference"`` (eager PyTorch check) or ``"export"`` (ONNX-friendly ops).
        name: model name, for error messages.
        full_last_block: see :class:`MergedViT`.

    Returns:
        A :class:`MergedViT` sharing ``model``'s parameters: ``[B, 3, H, W]`` -> ``[B, classes]``.

    Raises:
        UnsupportedModelError, ScheduleError: see :class:`MergedViT`.
    """
    if isinstance(schedule, str):
        schedule = Schedule.parse(schedule)
    return MergedViT(model, schedule, impl=impl, name=name,
                     full_last_block=full_last_block).train(model.training)
