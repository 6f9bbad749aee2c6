"""The merge maths against brute-force loops written independently of dsm_export.core.merge."""

import numpy as np
import pytest
import torch

from dsm_export.core.merge import (
    bipartite_soft_matching,
    merge_wavg_onehot,
    merge_wavg_scatter,
    window_permutation,
)


def brute_matching(metric: np.ndarray, r: int):
    """Per image: A = even tokens, B = odd; best B per A (first on ties); A ranked by score, ties by index."""
    n = metric.shape[0]
    unit = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    a_ids, b_ids = list(range(0, n, 2)), list(range(1, n, 2))
    best = []
    for i, ai in enumerate(a_ids):
        scores = [float(unit[ai] @ unit[bj]) for bj in b_ids]
        j = scores.index(max(scores))
        best.append((max(scores), i, j))
    ranked = sorted(best, key=lambda t: (-t[0], t[1]))
    src = [(i, j) for _, i, j in ranked[:r]]
    unm = sorted(i for _, i, _ in ranked[r:])  # unmerged A tokens keep their order
    return unm, src


def brute_merge(x: np.ndarray, size: np.ndarray, unm, src):
    """Unmerged A tokens then B tokens, each B the size-weighted mean of itself and its merged A tokens."""
    a, b = x[0::2], x[1::2]
    sa, sb = size[0::2, 0], size[1::2, 0]
    out, out_size = [a[i] for i in unm], [sa[i] for i in unm]
    for j in range(len(b)):
        members = [(b[j], sb[j])] + [(a[i], sa[i]) for i, jj in src if jj == j]
        total = sum(s for _, s in members)
        out.append(sum(v * s for v, s in members) / total)
        out_size.append(total)
    return np.stack(out), np.array(out_size)[:, None]


@pytest.mark.parametrize("n, r", [(16, 5), (17, 8), (196, 13), (49, 4)])
def test_matching_and_merges_match_brute_force(n, r):
    g = torch.Generator().manual_seed(n * 100 + r)
    metric = torch.randn(3, n, 8, generator=g)
    x = torch.randn(3, n, 5, generator=g)
    size = torch.randint(1, 4, (3, n, 1), generator=g).float()
    for use_topk in (None, True):
        m = bipartite_soft_matching(metric, r, use_topk=use_topk)
        for form in (merge_wavg_onehot, merge_wavg_scatter):
            out, out_size = form(x, size, m)
            assert out.shape == (3, n - r, 5) and out_size.shape == (3, n - r, 1)
            for k in range(3):
                unm, src = brute_matching(metric[k].double().numpy(), r)
                assert m.unm_idx[k].tolist() == unm
                assert list(zip(m.src_idx[k].tolist(), m.dst_idx[k].tolist())) == src
                exp, exp_size = brute_merge(x[k].double().numpy(), size[k].double().numpy(), unm, src)
                np.testing.assert_allclose(out[k].numpy(), exp, rtol=1e-5, atol=1e-5)
                np.testing.assert_array_equal(out_size[k].numpy(), exp_size)


def test_merge_conserves_size_and_weighted_sum():
    g = torch.Generator().manual_seed(1)
    metric, x = torch.randn(2, 40, 4, generator=g), torch.randn(2, 40, 6, generator=g)
    size = torch.randint(1, 5, (2, 40, 1), generator=g).float()
    out, out_size = merge_wavg_onehot(x, size, bipartite_soft_matching(metric, 20))
    torch.testing.assert_close(out_size.sum(1), size.sum(1))
    torch.testing.assert_close((out * out_size).sum(1), (x * size).sum(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("unit_size", [False, True])
def test_export_form_passes_prefix_through_and_takes_unit_size_as_none(prefix, unit_size):
    g = torch.Generator().manual_seed(3 + prefix)
    n, r = 50, 17
    metric, x = torch.randn(2, n, 8, generator=g), torch.randn(2, prefix + n, 6, generator=g)
    size = torch.ones(2, prefix + n, 1) if unit_size else torch.randint(1, 5, (2, prefix + n, 1), generator=g).float()
    m = bipartite_soft_matching(metric, r)
    out, out_size = merge_wavg_onehot(x, None if unit_size else size, m, prefix=prefix)
    exp, exp_size = merge_wavg_scatter(x[:, prefix:], size[:, prefix:], m)
    assert out.shape == (2, prefix + n - r, 6) and out_size.shape == (2, prefix + n - r, 1)
    torch.testing.assert_close(out[:, :prefix], x[:, :prefix], rtol=0, atol=0)
    torch.testing.assert_close(out_size[:, :prefix], size[:, :prefix], rtol=0, atol=0)
    torch.testing.assert_close(out[:, prefix:], exp)
    torch.testing.assert_close(out_size[:, prefix:], exp_size, rtol=0, atol=0)


def test_leading_window_axis_equals_window_by_window():
    g = torch.Generator().manual_seed(2)
    metric, x = torch.randn(2, 4, 49, 8, generator=g), torch.randn(2, 4, 49, 6, generator=g)
    size = torch.ones(2, 4, 49, 1)
    out, out_size = merge_wavg_onehot(x, size, bipartite_soft_matching(metric, 4))
    for w in range(4):
        ow, sw = merge_wavg_scatter(x[:, w], size[:, w], bipartite_soft_matching(metric[:, w], 4))
        torch.testing.assert_close(out[:, w], ow)
        torch.testing.assert_close(out_size[:, w], sw)


def test_ties_go_to_the_lowest_index():
    # Tokens 0..7: A = 0,2,4,6, B = 1,3,5,7. All A identical and equal to B 3 and B 5: every A
    # ties with B indices 1 and 2 (tokens 3, 5); the first (1) must win, and the A tokens
    # (equal scores) must rank 0, 1, 2, 3.
    v, w = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    metric = torch.stack([v, w, v, v, v, v, v, w])[None]
    # (eager torch.topk does not order ties by index; the ONNX test below covers the exported TopK)
    for m in (bipartite_soft_matching(metric, 2), bipartite_soft_matching(metric, 2, use_topk=False)):
        assert m.src_idx.tolist() == [[0, 1]]
        assert m.dst_idx.tolist() == [[1, 1]]
        assert m.unm_idx.tolist() == [[2, 3]]
    metric = torch.stack([v, w, w, v, w, w, w, w])[None]  # A = v, w, w, w; B = w, v, w, w
    m = bipartite_soft_matching(metric, 1)
    assert m.src_idx.tolist() == [[0]] and m.dst_idx.tolist() == [[1]]  # first of the tied A (score 1)
    assert m.unm_idx.tolist() == [[1, 2, 3]]


def test_onnx_runtime_breaks_ties_like_pytorch(tmp_path):
    """Export the matching alone and run it in ONNX Runtime on inputs full of exact ties."""
    import onnxruntime as ort

    class Match(torch.nn.Module):
        def forward(self, metric):
            m = bipartite_soft_matching(metric, 6, use_topk=True)
            return m.unm_idx, m.src_idx, m.dst_idx

    g = torch.Generator().manual_seed(3)
    metric = torch.randint(0, 2, (4, 24, 3), generator=g).float() + 0.5  # few distinct keys: many ties
    path = str(tmp_path / "match.onnx")
    torch.onnx.export(Match().eval(), (metric,), path, dynamo=True, verbose=False, opset_version=18)
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {
        ort.InferenceSession(path).get_inputs()[0].name: metric.numpy()})
    ref = bipartite_soft_matching(metric, 6, use_topk=False)
    for g_idx, r_idx in zip(got, ref):
        np.testing.assert_array_equal(g_idx, r_idx.numpy())


def test_window_permutation_groups_windows():
    perm = window_permutation((4, 6), (2, 3))  # windows of 2x2 tokens
    grid = torch.arange(24).view(4, 6)
    expected = []
    for wy in range(2):
        for wx in range(3):
            expected += grid[2 * wy:2 * wy + 2, 2 * wx:2 * wx + 2].reshape(-1).tolist()
    assert perm.tolist() == expected
    # 7x7 in 2x2 windows: 4/3 rows by 4/3 columns, grouped by size (16, then the two of 12, then 9)
    perm = window_permutation((7, 7), (2, 2))
    grid = torch.arange(49).view(7, 7)
    windows = [grid[:4, :4], grid[:4, 4:], grid[4:, :4], grid[4:, 4:]]
    assert perm.tolist() == sum((w.reshape(-1).tolist() for w in windows), [])
    assert sorted(perm.tolist()) == list(range(49))
    with pytest.raises(ValueError, match="cannot split 7 patch rows or columns into 8 windows"):
        window_permutation((7, 7), (8, 1))
