"""Token-merging maths: bipartite soft matching and size-weighted merges.

Small pure functions in the manner of ToMe's ``tome/merge.py`` (Bolya et al., "Token Merging: Your
ViT But Faster", ICLR 2023, Sec. 3), in two independent forms that must agree:

* the *reference* form (:func:`merge_wavg_scatter`), ToMe's own: gather the unmerged tokens and
  ``scatter_reduce`` the merged ones into their partners. Eager PyTorch only.
* the *export* form (:func:`merge_wavg_onehot`): row gathers plus a one-hot assignment MatMul,
  built only from ops TensorRT's ONNX parser supports natively (Gather(Elements), Equal, Cast,
  MatMul, Div, Concat; the export turns the row gathers into GatherND). It takes any number of
  leading batch dimensions, so local (windowed) merging runs all windows at once as
  ``[B, W, n_w, C]``.

Both take tokens with the prefix tokens (class, distillation, registers) split off; the export form
can also pass them through in place (``prefix``).

Tie-breaking is deterministic and the same in PyTorch and ONNX: a B token with equal similarity to
several A tokens goes to the lowest index (PyTorch ``max`` and ONNX ``ArgMax`` pick the first), and
A tokens with equal scores are ranked by lower index first (a stable descending sort; ONNX ``TopK``
breaks ties by lower index).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .schedule import window_groups, window_sizes


class Matching(NamedTuple):
    """Result of bipartite soft matching over tokens split alternately into sets A and B.

    Attributes:
        unm_idx: ``[..., na - r]`` int64 indices into A of the tokens left unmerged, ascending
            (in score order when matching with ``sort_unmerged=False``, as ToMe without a class token).
        src_idx: ``[..., r]`` int64 indices into A of the tokens merged away.
        dst_idx: ``[..., r]`` int64 indices into B of their partners.
    """

    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor


def split_ab(x: torch.Tensor, prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split tokens alternately after ``prefix`` leading rows: set A is rows ``prefix, prefix + 2,
    ...``, set B rows ``prefix + 1, prefix + 3, ...``.

    Two row Gathers of constant indices (``index_select``), which ONNX Runtime runs as row copies;
    step-2 Slices (``x[..., 0::2, :]``) run slower there, and the prefix rows need no sliced copy.

    Args:
        x: ``[..., prefix + n, c]``; the first ``prefix`` rows are left out.

    Returns:
        ``([..., ceil(n/2), c], [..., floor(n/2), c])``.
    """
    end = x.shape[-2]
    return (torch.index_select(x, -2, torch.arange(prefix, end, 2, device=x.device)),
            torch.index_select(x, -2, torch.arange(prefix + 1, end, 2, device=x.device)))


def bipartite_soft_matching(metric: torch.Tensor, r: int, use_topk: bool | None = None,
                            protected: torch.Tensor | None = None, sort_unmerged: bool = True,
                            unit: bool = False, prefix: int = 0) -> Matching:
    """ToMe's bipartite soft matching (Bolya et al. 2023, Sec. 3.1).

    Scores every A token against every B token by cosine similarity of ``metric`` (the attention
    keys averaged over heads), keeps each A token's best B partner and picks the ``r`` A tokens with
    the highest best score.

    Args:
        metric: ``[..., n, d]`` keys of the mergeable tokens (any leading dims).
        r: tokens to merge, ``0 <= r <= n // 2``.
        use_topk: rank with ``torch.topk`` over all A tokens, which exports to ONNX ``TopK``
            (ties to the lower index, as the ONNX spec says), instead of a stable descending
            ``torch.sort`` (``aten.sort.stable`` has no ONNX export). Eager ``torch.topk`` does not
            break ties by index, so the default (None) uses ``topk`` only while
            ``torch.compiler.is_exporting()``; exported graph and eager model then rank alike.
        protected: optional ``[n]`` or ``[..., n]`` bool, tokens that are neither merged away nor
            merged into: their scores are ``-inf``, as ToMe protects the class token (its A row)
            and the distillation token (its B column). Protected A tokens rank last, by index.
        sort_unmerged: return the unmerged A tokens in their original order (True, as ToMe does
            with a class token); False keeps them in score order (ToMe without a class token).
        unit: the rows of ``metric`` are already unit-norm (as :func:`heads_metric` returns them),
            so the scores are their dot products and the normalisation is skipped.
        prefix: leading rows of ``metric`` (prefix tokens) that take no part: the A/B row gathers
            start after them, so the caller need not slice them off (a copy of every row).
            Indices, ``protected`` and ``n`` below refer to the other rows.

    Returns:
        A :class:`Matching` with static shapes ``[..., na - r]``, ``[..., r]``, ``[..., r]``.

    Raises:
        ValueError: if ``r`` is out of range.
    """
    n = metric.shape[-2] - prefix
    if not 0 <= r <= n // 2:
        raise ValueError(f"r={r} out of range for {n} tokens (0..{n // 2})")
    if not unit:  # every row at once, before the split (as ToMe does): one norm, one division
        metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = split_ab(metric, prefix)
    if use_topk is None:
        use_topk = torch.compiler.is_exporting()
    pb = None if protected is None else protected[..., 1::2]
    if use_topk:
        # Exported transposed, B rows by A columns, and reduced over the rows: OpenVINO runs ArgMax
        # as a TopK of 1, which over the last axis took 7 % of a merged bf16 DeiT-Tiny's time.
        # The same dot products; the first (lowest) B index on ties, as below.
        scores_t = b @ a.transpose(-1, -2)  # [..., nb, na]
        if pb is not None:
            scores_t = scores_t.masked_fill(pb.unsqueeze(-1), float("-inf"))  # never a destination
        node_max, node_idx = scores_t.max(dim=-2)
    else:
        scores = a @ b.transpose(-1, -2)  # [..., na, nb]
        if pb is not None:
            scores = scores.masked_fill(pb.unsqueeze(-2), float("-inf"))
        node_max, node_idx = scores.max(dim=-1)  # first index on ties
    if protected is not None:
        node_max = node_max.masked_fill(protected[..., 0::2], float("-inf"))  # never merged away: rank last
    # Unmerged A tokens keep their original order, as ToMe's timm patch does with a class token.
    # The next block's alternating split then stays spatially even, and the token order no longer
    # depends on the ranking of near-equal scores, which float noise between frameworks can swap:
    # only the boundary between the r merged tokens and the rest does.
    if use_topk and sort_unmerged and r:
        src_idx = torch.topk(node_max, r, dim=-1, largest=True, sorted=True).indices
        unm_idx = ascending_subset(src_idx, node_max.shape[-1], complement=True)
    else:
        if use_topk:
            edge_idx = torch.topk(node_max, node_max.shape[-1], dim=-1, largest=True, sorted=True).indices
        else:
            edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices  # [..., na]
        unm_idx = torch.sort(edge_idx[..., r:], dim=-1).values if sort_unmerged else edge_idx[..., r:]
        src_idx = edge_idx[..., :r]
    dst_idx = torch.gather(node_idx, -1, src_idx)
    return Matching(unm_idx, src_idx, dst_idx)


def top_tokens(importance: torch.Tensor, k: int, use_topk: bool | None = None,
               ascending: bool = True) -> torch.Tensor:
    """Indices of the ``k`` most important tokens, ascending (original order kept).

    Used by prune-then-merge (keep the ``n - r`` tokens with the most class attention, drop the
    rest; DiffRate, Chen et al. ICCV 2023, Sec. 3.2; EViT, Liang et al. ICLR 2022, Sec. 3.1) and by
    importance-protected matching (the ``k`` tokens that must not merge). Ties go to the lower index
    in both forms (stable sort eagerly, ONNX ``TopK`` when exporting; see
    :func:`bipartite_soft_matching`).

    Args:
        importance: ``[..., n]`` scores (e.g. class-token attention, mean over heads).
        k: tokens to return, ``0 <= k <= n``.
        ascending: sort the indices into token order; False leaves them in importance order, for
            callers that need only the set (:func:`token_mask`), which saves a TopK and two Casts
            in the export.

    Returns:
        ``[..., k]`` int64 indices, ascending (or most important first).
    """
    if use_topk is None:
        use_topk = torch.compiler.is_exporting()
    if use_topk:
        idx = torch.topk(importance, k, dim=-1, largest=True, sorted=True).indices
    else:
        idx = torch.sort(importance, dim=-1, descending=True, stable=True).indices[..., :k]
    return _ascending(idx, use_topk, importance.shape[-1]) if ascending else idx


def token_mask(idx: torch.Tensor, n: int) -> torch.Tensor:
    """``[..., n]`` bool, True at the ``[..., k]`` indices ``idx`` (one-hot Equal plus ReduceMax, no
    Scatter, no comparison op beyond Equal)."""
    positions = torch.arange(n, device=idx.device, dtype=idx.dtype)
    return (idx.unsqueeze(-1) == positions).to(torch.float32).amax(dim=-2).to(torch.bool)


def keep_tokens(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Prune: keep the rows of ``x`` at ``keep_idx`` and drop the rest (DiffRate's pruning, Chen et
    al. ICCV 2023, Sec. 3.2). Applied to tokens and to their sizes alike, so proportional attention
    then counts only the patches the kept tokens stand for.

    Args:
        x: ``[B, n, c]`` tokens (or ``[B, n, 1]`` sizes); keep_idx: ``[B, k]`` ascending indices.

    Returns:
        ``[B, k, c]``.
    """
    return _gather_tokens(x, keep_idx)


def tome_distill_order(x: torch.Tensor, n_unm: int) -> torch.Tensor:
    """ToMe's token order with a distillation token: ``[cls, dist, other unmerged A, other B]``.

    After a merge of the whole sequence ``[cls, dist, patches...]`` the class token leads the
    unmerged A tokens and the distillation token (B's first) leads B; ToMe's ``merge`` moves the
    latter to position 1 (``tome/merge.py``).

    Args:
        x: ``[B, n, c]`` merged tokens, unmerged A first (``n_unm`` of them), then B.
    """
    return torch.cat([x[:, :1], x[:, n_unm:n_unm + 1], x[:, 1:n_unm], x[:, n_unm + 1:]], dim=1)


def _ascending(idx: torch.Tensor, use_topk: bool, n: int) -> torch.Tensor:
    """Sort distinct int64 indices of ``0..n-1`` ascending (:func:`ascending_subset` when exporting)."""
    return ascending_subset(idx, n) if use_topk else torch.sort(idx, dim=-1).values


def ascending_subset(idx: torch.Tensor, n: int, complement: bool = False) -> torch.Tensor:
    """The indices ``idx`` (``[..., k]``, distinct, in ``0..n-1``), or with ``complement`` the
    ``n - k`` others, in ascending order, from ONNX-exportable ops.

    A ``TopK`` of the ``k`` (or ``n - k``) smallest keys whose *indices* output is the answer: index
    ``i`` keys :func:`rank_keys` ``[i]`` where wanted, a larger constant where not (the membership
    mask by one-hot ``Equal`` and ``ReduceMax``, then ``Where``). Exact whatever float precision a
    runtime runs the keys in: every key is distinct and exactly representable in bf16 and fp16, so
    no rounding or tie-breaking order matters. (The indices' own values sorted by a float ``TopK``,
    as before, came back rounded in OpenVINO's bf16: odd indices above 256 came back even; keys
    ``i`` tied after rounding, and OpenVINO's ``TopK`` does not break ties by index.)

    Returns:
        ``[..., k]`` int64, or ``[..., n - k]`` with ``complement``.
    """
    positions = torch.arange(n, device=idx.device)
    if idx.shape[-1] == 0:
        return positions.expand(*idx.shape[:-1], n) if complement else idx
    hit = token_mask(idx, n)  # [..., n]: in idx
    keys = rank_keys(n, idx.device)
    big = keys.new_tensor(math.ldexp(1.0, n // 128 + 1))  # above every key
    keys = torch.where(hit, big, keys) if complement else torch.where(hit, keys, big)
    count = n - idx.shape[-1] if complement else idx.shape[-1]
    return torch.topk(keys, count, dim=-1, largest=False, sorted=True).indices


def rank_keys(n: int, device=None) -> torch.Tensor:
    """``[n]`` float32 constants, strictly increasing, each exactly representable in bf16 (8
    significant bits) and in fp16 up to ``n = 1920``: ``2^(i // 128) * (1 + (i % 128) / 128)``,
    128 steps per octave, all below ``2^(n // 128 + 1)``."""
    return torch.tensor([math.ldexp(1.0 + (i % 128) / 128.0, i // 128) for i in range(n)],
                        dtype=torch.float32, device=device)


def _assignment(dst_idx: torch.Tensor, nb: int, dtype: torch.dtype) -> torch.Tensor:
    """One-hot assignment ``[..., r, nb]`` of each merged token to its destination (Equal + Where).

    ``Where`` of the constants 1 and 0, not a ``Cast`` of the Equal's booleans: with a Cast from
    bool feeding the assignment MatMul, OpenVINO's CPU plugin ran the whole residual stream (every
    block's Add, from the first) in f32 under a bf16 or INT8 engine, with a Reorder on each side.
    """
    positions = torch.arange(nb, device=dst_idx.device, dtype=dst_idx.dtype)
    one = torch.ones((), dtype=dtype, device=dst_idx.device)
    return torch.where(dst_idx.unsqueeze(-1) == positions, one, torch.zeros_like(one))


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[..., idx, :]`` per leading index: ``x`` ``[..., n, c]``, ``idx`` ``[..., k]`` -> ``[..., k, c]``."""
    return torch.gather(x, -2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def merge_wavg_onehot(x: torch.Tensor, size: torch.Tensor | None, m: Matching,
                      prefix: int = 0, mlerp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge, export form: row gathers plus a one-hot assignment MatMul.

    Each merged A token is averaged into its B partner weighted by token size, and sizes add
    (ToMe's ``merge_wavg``). The scatter-add of ToMe becomes ``onehot(dst_idx)^T @ src``, an exact
    sum in which every A token contributes once.

    Written for few passes over the tokens (each one costs about as much on the CPU as the
    matching itself): unmerged A tokens are copied as they are (a size-weighted average of one
    token is the token), only the ``r`` merged and the B tokens are weighted by size, rows are
    gathered from ``x`` itself, features and sizes stay apart (no ``C + 1`` wide tensor) and prefix
    tokens are passed through in place. (The row gathers export as ``GatherElements`` over an
    expanded index; :func:`dsm_export.graph.export.gathers_as_gathernd` turns them into row copies.)

    Args:
        x: ``[..., prefix + n, c]`` tokens; the first ``prefix`` are never merged.
        size: ``[..., prefix + n, 1]`` token sizes (how many patches each token stands for), or
            None for all ones (before the first merge).
        m: the :class:`Matching` of the ``n`` mergeable tokens.
        prefix: leading tokens passed through unchanged (class, distillation, registers).
        mlerp: rescale each B token to the largest norm among the tokens merged into it
            (:func:`mlerp_rescale`); the largest source norm per B token is a masked ReduceMax
            over the one-hot assignment.

    Returns:
        ``(x, size)`` of shapes ``[..., prefix + n - r, c]`` and ``[..., prefix + n - r, 1]``:
        prefix tokens, unmerged A tokens (in ``m.unm_idx`` order), then all B tokens.
    """
    unm_pos = prefix + 2 * m.unm_idx  # A token i is token prefix + 2i, B token j is prefix + 2j + 1
    src_pos = prefix + 2 * m.src_idx
    unm = _gather_tokens(x, unm_pos)
    src = _gather_tokens(x, src_pos)
    # B tokens as a Gather of constant rows (row copies; a step-2 Slice is slower in ONNX Runtime)
    b_pos = torch.arange(prefix + 1, x.shape[-2], 2, device=x.device)
    b = torch.index_select(x, -2, b_pos)
    assign = _assignment(m.dst_idx, b.shape[-2], x.dtype)  # [..., r, nb]
    assign_t = assign.transpose(-1, -2)
    if size is None:
        dst_size = 1.0 + assign.sum(dim=-2).unsqueeze(-1)
        dst_sum = b + assign_t @ src
        ones = torch.ones(*unm.shape[:-2], prefix + unm.shape[-2], 1, dtype=x.dtype, device=x.device)
        sizes = [ones, dst_size]
    else:
        src_size = _gather_tokens(size, src_pos)
        b_size = torch.index_select(size, -2, b_pos)
        dst_size = b_size + assign_t @ src_size
        dst_sum = b * b_size + assign_t @ (src * src_size)
        sizes = [size[..., :prefix, :], _gather_tokens(size, unm_pos), dst_size]
    if mlerp:  # norms are >= 0, so a 0/1 mask times the source norms keeps each B token's max
        src_top = (assign * l2_norm(src)).amax(dim=-2).unsqueeze(-1)  # [..., nb, 1]
        # The size-weighted sum has the mean's direction, so it is rescaled as it is: the division
        # by the size cancels and is skipped (one pass over the B tokens fewer).
        dst = mlerp_rescale(dst_sum, torch.maximum(l2_norm(b), src_top))
    else:
        dst = dst_sum / dst_size
    return torch.cat([x[..., :prefix, :], unm, dst], dim=-2), torch.cat(sizes, dim=-2)


def merge_wavg_scatter(x: torch.Tensor, size: torch.Tensor, m: Matching,
                       mlerp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge, reference form (ToMe's ``merge_wavg`` with ``scatter_reduce``).

    Args:
        x: ``[B, n, c]`` tokens (no prefix tokens).
        size: ``[B, n, 1]`` token sizes.
        m: the :class:`Matching` of these tokens (``[B, k]`` indices).
        mlerp: rescale each B token to the largest norm among the tokens merged into it
            (:func:`mlerp_rescale`; the maximum by ``scatter_reduce(amax)``).

    Returns:
        ``(x, size)``, shapes ``[B, n - r, c]`` and ``[B, n - r, 1]``, in the same token order as
        :func:`merge_wavg_onehot`.
    """

    def merge(t: torch.Tensor) -> torch.Tensor:
        a, b = split_ab(t)
        unm = _gather_tokens(a, m.unm_idx)
        src = _gather_tokens(a, m.src_idx)
        idx = m.dst_idx.unsqueeze(-1).expand(*m.dst_idx.shape, t.shape[-1])
        dst = b.scatter_reduce(-2, idx, src, reduce="sum")
        return torch.cat([unm, dst], dim=-2)

    merged = merge(x * size)
    new_size = merge(size)
    out = merged / new_size
    if mlerp:
        a_norm, b_norm = split_ab(l2_norm(x))
        top = b_norm.scatter_reduce(-2, m.dst_idx.unsqueeze(-1), _gather_tokens(a_norm, m.src_idx), reduce="amax")
        n_unm = m.unm_idx.shape[-1]
        out = torch.cat([out[..., :n_unm, :], mlerp_rescale(out[..., n_unm:, :], top)], dim=-2)
    return out, new_size


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """``[..., c]`` -> ``[..., 1]`` L2 norm of each row, as ``sqrt(sum(x * x))``.

    The export then runs Mul, ReduceSum and Sqrt, which ONNX Runtime's CPU provider computes faster
    than its ReduceL2 (what ``Tensor.norm`` exports to) on token-sized rows
    (``research/norm_op_speed.py`` times both). The
    variants' norms (``metric=heads``, ``merge=mlerp``) use it in both forms; ToMe's cosine
    similarity keeps ``Tensor.norm``, as ToMe writes it.
    """
    return (x * x).sum(dim=-1, keepdim=True).sqrt()


def mlerp_rescale(merged: torch.Tensor, norm: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Norm-preserving merge (MLERP of ToFu: Kim et al., "Token Fusion: Bridging the Gap between
    Token Pruning and Token Merging", WACV 2024): a merged token keeps the direction of the
    size-weighted mean and takes the largest norm among the tokens merged into it, so averaging
    tokens that point apart does not shrink it (an average of unit vectors is shorter than one).
    A token nothing merged into keeps its own norm, i.e. stays as it is.

    Args:
        merged: ``[..., k, c]`` size-weighted means (or sums: only their direction counts).
        norm: ``[..., k, 1]`` the largest L2 norm among each mean's contributors.
        eps: floor on the norm of ``merged`` (zero stays zero).

    Returns:
        ``[..., k, c]``: ``merged * norm / max(||merged||, eps)``.
    """
    return merged * (norm / l2_norm(merged).clamp_min(eps))


def heads_metric(k: torch.Tensor) -> torch.Tensor:
    """The ``metric=heads`` similarity features: each head's keys L2-normalised and scaled by
    ``1 / sqrt(H)``, heads concatenated, so each row has unit norm.

    The dot product of two such rows is the mean over heads of the per-head cosine similarity of
    the keys (bipartite matching takes it as is, ``unit=True``), where ToMe's metric (keys averaged
    over heads, Bolya et al. 2023, Sec. 3) takes the cosine of the averages and lets heads with
    large keys dominate.

    Args:
        k: ``[B, H, N, d]`` keys.

    Returns:
        ``[B, N, H * d]``.
    """
    b, h, n, d = k.shape
    return _unit_heads(k.transpose(1, 2)).reshape(b, n, h * d)


def heads_metric_of(keys) -> torch.Tensor:
    """:func:`heads_metric` from the heads' keys given one by one (``H`` tensors ``[B, N, d]``):
    concatenated once, then normalised per head as ``[B, N, H, d]`` (one ReduceL2 and one Div
    for all heads, no ``[B, H, N, d]`` stack or transpose).

    Returns:
        ``[B, N, H * d]``.
    """
    k = torch.cat(keys, dim=-1)
    return _unit_heads(k.unflatten(-1, (len(keys), -1))).flatten(-2)


def tokens_metric(x: torch.Tensor) -> torch.Tensor:
    """The ``metric=tokens`` similarity features: each token's row L2-normalised (floored at 1e-6),
    so bipartite matching takes dot products as cosine similarities (``unit=True``).

    The tokens are the block's input after its first LayerNorm, the feature that attention's
    projections read ("X" in ToMe's feature-choice ablation, Bolya et al. 2023, Sec. 4.1, where
    the keys won after fine-tuning). Norm as :func:`l2_norm` (Mul, ReduceSum, Sqrt).

    Args:
        x: ``[B, N, C]`` normalised tokens.

    Returns:
        ``[B, N, C]`` unit rows.
    """
    return x / l2_norm(x).clamp_min(1e-6)


def _unit_heads(k: torch.Tensor) -> torch.Tensor:
    """``[..., H, d]`` keys, each head's row divided by its L2 norm (floored at 1e-6) times ``sqrt(H)``."""
    return k / (l2_norm(k).clamp_min(1e-6) * math.sqrt(k.shape[-2]))


def merge_sum_scatter(x: torch.Tensor, m: Matching) -> torch.Tensor:
    """Plain sum merge (no size weighting), e.g. of one-hot source rows, to track which patches
    each token stands for (ToMe's ``merge_source``).

    Args:
        x: ``[B, n, c]``.
        m: the :class:`Matching`.

    Returns:
        ``[B, n - r, c]`` in the token order of :func:`merge_wavg_scatter`.
    """
    a, b = split_ab(x)
    idx = m.dst_idx.unsqueeze(-1).expand(*m.dst_idx.shape, x.shape[-1])
    dst = b.scatter_reduce(-2, idx, _gather_tokens(a, m.src_idx), reduce="sum")
    return torch.cat([_gather_tokens(a, m.unm_idx), dst], dim=-2)


def window_permutation(grid: tuple[int, int], windows: tuple[int, int]) -> torch.Tensor:
    """Permutation that reorders raster-order patch tokens window by window.

    After ``x[:, perm]`` the tokens of each window are contiguous, in raster order within the
    window, and the windows come group by group (:func:`window_groups`), raster order within a
    group. Where the windows divide the grid this is raster order of windows, and the tokens of
    window ``w`` are ``x[:, w * n_w:(w + 1) * n_w]``, so ``x.view(B, W, n_w, C)`` puts windows on
    their own axis; otherwise each group's slice views as ``[B, count, tokens, C]``.

    Args:
        grid: patch grid ``(rows, cols)``.
        windows: window grid ``(rows, cols)``; at most one window per patch row and column.

    Returns:
        ``[rows * cols]`` int64 permutation.

    Raises:
        ValueError: if a window would have no row or column.
    """
    (gh, gw), (wh, ww) = grid, windows
    rows, cols = window_sizes(gh, wh), window_sizes(gw, ww)
    row0 = [sum(rows[:i]) for i in range(wh)]
    col0 = [sum(cols[:i]) for i in range(ww)]
    idx = torch.arange(gh * gw).view(gh, gw)
    parts = []
    for group in window_groups(grid, windows):
        for w in group.windows:
            wy, wx = divmod(w, ww)
            parts.append(idx[row0[wy]:row0[wy] + rows[wy], col0[wx]:col0[wx] + cols[wx]].reshape(-1))
    return torch.cat(parts)
