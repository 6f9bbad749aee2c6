"""Exact ToMe mode and the merge variants (protect, prune, metric=heads/tokens, merge=mlerp): schedule semantics, reference
against export form and ONNX Runtime on real weights and photos, FLOPs, and tune's variant stage."""

import copy
import os
import sys

import numpy as np
import onnx
import pytest
import torch

from dsm_export.errors import ScheduleError, UnsupportedModelError
from dsm_export.graph.export import export_model
from dsm_export.core.flops import schedule_flops
from dsm_export.core.merge import bipartite_soft_matching, token_mask, tome_distill_order, top_tokens
from dsm_export.graph.onnx_graph import graph_problems
from dsm_export.core.patch import apply
from dsm_export.core.schedule import Schedule, resolve, tome_parse_r
from dsm_export.search.schedule_search import ScheduleSearchSettings, search_schedules, variant_label

from conftest import DEIT
from families import build
from trt_checks import build_and_check

GRID = (14, 14)
VARIANTS = ["r=13,mode=tome", "r=24,r_end=8,delay=1,local=2,protect=16",
            "r=24,r_end=8,delay=1,local=2,prune=3",
            "r=24,r_end=8,delay=1,local=2,protect=16,metric=heads,merge=mlerp",
            "r=20,r_end=6,delay=1,local=2,stride=2,protect=16,metric=tokens,merge=mlerp"]


# ----------------------------------------------------------------------------- schedule semantics
def test_tome_parse_r_is_tomes():
    # tome.utils.parse_r: min = int(r (1 - inflect)), max = 2r - min, int() of the linear ramp
    assert tome_parse_r(12, 13) == [13] * 12
    assert tome_parse_r(12, 16, -0.5) == [int(24 + (8 - 24) / 11 * i) for i in range(12)]
    assert tome_parse_r(12, 16, -0.5)[:3] == [24, 22, 21]
    assert tome_parse_r(4, 10, 1.0) == [0, 6, 13, 20]
    plan = Schedule.parse('{"mode": "tome", "r": [30, 30, 20]}').plan(12)
    assert [b.r for b in plan] == [30, 30, 20] + [0] * 9  # padded with zeros, as ToMe does


def test_tome_mode_clips_r_as_tome():
    # r = min(r, (tokens - protected) // 2) in every block, prefix tokens counted in the split
    tokens = resolve(Schedule.parse("r=60,mode=tome"), 12, GRID, 1)
    removed, t = [], 197
    for _ in range(12):
        r = min(60, (t - 1) // 2)
        removed.append(r)
        t -= r
    assert [b.removed for b in tokens] == removed
    assert removed[:4] == [60, 60, 38, 19]
    assert tokens[0].matched == 197  # the class token is in the matching
    # the default mode keeps prefix tokens out of the split and refuses what it cannot do
    with pytest.raises(ScheduleError, match="more than half"):
        resolve(Schedule.parse("r=60"), 12, GRID, 1)


@pytest.mark.parametrize("text, message", [
    ("r=13,delay=2,mode=tome", "takes r, inflect or an r list only"),
    ("r=13,protect=8,mode=tome", "takes r, inflect or an r list only"),
    ("r=13,inflect=-0.5", "use it with mode=tome"),
    ("r=13,inflect=2,mode=tome", r"\[-1, 1\]"),
    ("r=13,mode=fast", "expected one of dsm, tome"),
    ("r=13,match=energy", "unknown key 'match'"),
    ("r=13,delay=10,prune=3", "prune=3 exceeds"),
    ("r=13,metric=heads,mode=tome", "takes r, inflect or an r list only"),
    ("r=13,merge=mlerp,mode=tome", "takes r, inflect or an r list only"),
    ("r=13,metric=values", "expected one of keys, heads, tokens"),
    ("r=13,merge=slerp", "expected one of mean, mlerp"),
])
def test_bad_variant_specs_are_refused(text, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule.parse(text).plan(12)


@pytest.mark.parametrize("text", ["r=13,mode=tome", "r=16,inflect=-0.5,mode=tome",
                                  "r=24,r_end=8,delay=3,protect=16", "r=24,r_end=8,delay=3,prune=2",
                                  "r=24,r_end=8,delay=3,protect=16,metric=tokens,merge=mlerp"])
def test_variant_specs_round_trip(text):
    s = Schedule.parse(text)
    assert s.spec() == text
    assert Schedule.from_dict(s.to_dict(12)).same_as(s, 12)
    assert Schedule.parse(s.spec()).same_as(s, 12)


def test_prune_blocks_are_the_last_merging_blocks():
    plan = Schedule.parse("r=20,r_end=8,delay=3,prune=2").plan(12)
    assert [b.mode for b in plan] == ["none"] * 3 + ["global"] * 7 + ["prune"] * 2
    assert variant_label(Schedule.parse("r=20,r_end=8,delay=3,prune=2,protect=8")) == "protect=8,prune=2"


def test_variant_flops():
    import timm

    model = timm.create_model(DEIT, pretrained=False)
    plain, base, blocks = schedule_flops(model, Schedule.parse("r=24,r_end=8,delay=3"))
    pruned, _, pblocks = schedule_flops(model, Schedule.parse("r=24,r_end=8,delay=3,prune=2"))
    # a prune block has no matching: only the importance mean over heads
    assert pblocks[-2].merge == (blocks[-2].tokens_in - 1) * 3
    # the exported last block runs for the class token alone: keys and values of every token,
    # one query row, no merge; timm's model (the baseline) runs every block on every token
    n = blocks[-1].tokens_in
    assert (blocks[-1].tokens_out, blocks[-1].merge) == (1, 0)
    assert blocks[-1].attention == n * 192 * 576 + 192 * 192 + 2 * n * 192
    assert blocks[-1].mlp == 2 * 192 * 768
    full, full_base, fblocks = schedule_flops(model, Schedule.parse("r=24,r_end=8,delay=3"), "full")
    assert full_base == base and fblocks[-1].tokens_out == n - 8 and full - plain == fblocks[-1].total - blocks[-1].total
    unmerged, _, _ = schedule_flops(model, Schedule())
    assert 1.06 < base / unmerged < 1.08
    assert pruned < plain
    tome, _, tblocks = schedule_flops(model, Schedule.parse("r=13,mode=tome"), "full")  # as ToMe runs it
    dsm, _, dblocks = schedule_flops(model, Schedule.parse("r=13"))
    assert tblocks[0].merge > dblocks[0].merge  # ToMe matches the class token too
    assert 1.69 < base / tome < 1.71
    heads, _, hblocks = schedule_flops(model, Schedule.parse("r=24,r_end=8,delay=3,metric=heads"))
    mlerp, _, mblocks = schedule_flops(model, Schedule.parse("r=24,r_end=8,delay=3,merge=mlerp"))
    # the similarity runs over all 3 heads' 64 features instead of their 64-wide mean
    n, r = blocks[3].tokens_in - 1, 24
    assert hblocks[3].merge - blocks[3].merge == (n // 2) * (n // 2) * (192 - 64)
    assert mblocks[3].merge - blocks[3].merge == n * 192 + r * (n // 2)  # norms + masked max
    assert plain < mlerp < heads < plain * 1.02
    # metric=tokens: the token norms instead of the key mean, the similarity over the 192 features
    tokens, _, tkblocks = schedule_flops(model, Schedule.parse("r=24,r_end=8,delay=3,metric=tokens"))
    assert tkblocks[3].merge - blocks[3].merge == n * (192 - 3 * 64) + (n // 2) * (n // 2) * (192 - 64)
    assert tokens == heads


# ----------------------------------------------------------------------------- merge maths
def test_protected_tokens_never_merge():
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 40, 16, generator=g)
    protected = torch.zeros(3, 40, dtype=torch.bool)
    protected[:, [0, 1, 6, 9, 21]] = True
    for use_topk in (False, True):
        m = bipartite_soft_matching(metric, 15, use_topk=use_topk, protected=protected)
        a_prot = protected[:, 0::2]
        b_prot = protected[:, 1::2]
        assert not torch.gather(a_prot, 1, m.src_idx).any()  # never merged away
        assert not torch.gather(b_prot, 1, m.dst_idx).any()  # never merged into
    # the protected set does not depend on the order top_tokens returns it in
    importance = torch.rand(3, 40, generator=g)
    for use_topk in (False, True):
        mask = token_mask(top_tokens(importance, 5, use_topk=use_topk, ascending=False), 40)
        assert torch.equal(mask, token_mask(top_tokens(importance, 5, use_topk=use_topk), 40))
        assert torch.equal(mask, importance >= importance.topk(5, dim=-1).values[:, -1:])


def test_mlerp_keeps_direction_and_takes_the_largest_norm():
    from dsm_export.core.merge import Matching, heads_metric, merge_wavg_onehot, merge_wavg_scatter

    # A = tokens 0, 2, 4; B = tokens 1, 3. A0 and A2 merge into B0 (sizes 1, 2, 1); A1 stays.
    x = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [0.0, 5.0], [2.0, 2.0], [1.0, 1.0]]])
    size = torch.tensor([[[1.0], [1.0], [1.0], [3.0], [2.0]]])
    m = Matching(unm_idx=torch.tensor([[1]]), src_idx=torch.tensor([[0, 2]]), dst_idx=torch.tensor([[0, 0]]))
    for merged, new_size in (merge_wavg_scatter(x, size, m, mlerp=True), merge_wavg_onehot(x, size, m, mlerp=True)):
        mean = (x[0, 1] * 1 + x[0, 0] * 1 + x[0, 4] * 2) / 4  # B0 with A0 (size 1) and A2 (size 2)
        dst = merged[0, 1]
        assert torch.allclose(dst / dst.norm(), mean / mean.norm())
        assert torch.allclose(dst.norm(), torch.tensor(3.0))  # the largest contributor's norm
        assert torch.equal(merged[0, 0], x[0, 2])  # unmerged A token untouched
        assert torch.allclose(merged[0, 2], x[0, 3])  # B token nothing merged into keeps itself
        assert new_size[0, :, 0].tolist() == [1.0, 4.0, 3.0]
    # heads metric: unit rows whose dot product is the mean over heads of per-head key cosines,
    # in both forms (the export form takes the heads one by one)
    from dsm_export.core.merge import heads_metric_of, l2_norm

    k = torch.randn(2, 3, 7, 8)
    f = heads_metric(k)
    assert torch.allclose(f.norm(dim=-1), torch.ones(2, 7), atol=1e-6)
    assert torch.allclose(l2_norm(k), k.norm(dim=-1, keepdim=True), rtol=1e-6)
    assert torch.allclose(heads_metric_of(k.unbind(1)), f, atol=1e-7)
    per_head = torch.nn.functional.cosine_similarity(k[:, :, 0:1], k[:, :, 1:2], dim=-1).mean(1)[:, 0]
    assert torch.allclose((f[:, 0] * f[:, 1]).sum(-1), per_head, atol=1e-6)
    # tokens metric: unit rows whose dot products are the tokens' cosine similarities
    from dsm_export.core.merge import tokens_metric

    t = torch.randn(2, 7, 12)
    u = tokens_metric(t)
    assert torch.allclose(u.norm(dim=-1), torch.ones(2, 7), atol=1e-6)
    cos = torch.nn.functional.cosine_similarity(t[:, 0], t[:, 1], dim=-1)
    assert torch.allclose((u[:, 0] * u[:, 1]).sum(-1), cos, atol=1e-6)


def test_tome_distill_order_keeps_prefix_in_front():
    x = torch.arange(10.0).view(1, 10, 1)  # unmerged A: [0, 1, 2, 3], B: [4 (dist), 5, ...]
    assert tome_distill_order(x, 4).flatten().tolist() == [0, 4, 1, 2, 3, 5, 6, 7, 8, 9]


# ----------------------------------------------------------------------------- real weights
def _official_tome():
    """The official ToMe package from ``$DSM_TOME_SRC`` (a folder holding ``tome/``), or None."""
    src = os.environ.get("DSM_TOME_SRC")
    if not src or not os.path.isdir(os.path.join(src, "tome")):
        return None
    sys.path.insert(0, src)
    try:
        import tome
    finally:
        sys.path.remove(src)
    return tome


def test_tome_mode_equals_official_tome(deit, pixels):
    tome = _official_tome()
    if tome is None:
        pytest.skip("set DSM_TOME_SRC to a checkout of facebookresearch/ToMe (CC-BY-NC, not vendored); "
                    "research/tome_parity.py runs the same check on all 500 photos")
    for r, spec in ((13, "r=13,mode=tome"), ((16, -0.5), "r=16,inflect=-0.5,mode=tome"), (60, "r=60,mode=tome")):
        official = copy.deepcopy(deit)
        tome.patch.timm(official)
        official.r = r
        with torch.inference_mode():
            expected = official(pixels)
            for impl in ("reference", "export"):
                got = apply(deit, spec, impl)(pixels)
                assert (got - expected).abs().max() <= 1e-4, (spec, impl)
                assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("spec", VARIANTS)
def test_variant_onnx_parity_on_deit_tiny(tmp_path, deit, pixels, spec):
    """Reference (scatter merges, SDPA) against the ONNX Runtime graph of the export form."""
    import onnxruntime as ort

    path = str(tmp_path / "v.onnx")
    export_model(deit, DEIT, path, spec)
    assert graph_problems(onnx.load(path)) == []
    build_and_check(path, tmp_path)  # TensorRT builds it (TensorRT-RTX: on this machine, no GPU needed)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: pixels.numpy()})[0]
    with torch.inference_mode():
        ref = apply(deit, spec, "reference")(pixels).numpy()
        dense = deit(pixels).numpy()
    assert np.abs(got - ref).max() <= 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(ref - dense).max() > 1e-2  # the variant changed the computation
    if "metric=tokens" in spec:  # the tokens, not the keys, chose the merges (in both forms)
        with torch.inference_mode():
            keys = apply(deit, spec.replace("metric=tokens", "metric=keys"), "reference")(pixels).numpy()
        assert np.abs(ref - keys).max() > 1e-2


def test_tome_mode_distilled_keeps_both_heads_tokens(pixels):
    model = build("deit_distilled")
    x = pixels[:4]
    with torch.inference_mode():
        ref = apply(model, "r=30,mode=tome", "reference")
        exp = apply(model, "r=30,mode=tome", "export")
        a, b = ref(x), exp(x)
    assert (a - b).abs().max() <= 1e-4
    assert [t.removed for t in ref.tokens] == [30, 30, 30, 30]


def test_tome_mode_refuses_register_tokens():
    with pytest.raises(UnsupportedModelError, match="register tokens"):
        apply(build("registers_cls"), "r=8,mode=tome")


def test_sources_follow_every_variant(deit, pixels):
    for spec in VARIANTS:
        merged = apply(deit, spec, "reference")
        merged.track_source = True
        with torch.inference_mode():
            merged(pixels[:2])
        last = merged.sources[-1]
        assert last.shape[1] == merged.tokens[-1].tokens_out - 1
        # every patch is in exactly one token unless pruned away
        per_patch = last.sum(dim=1)
        assert ((per_patch == 0) | (per_patch == 1)).all()
        if "prune" not in spec:
            assert (per_patch == 1).all()


def test_tune_tries_the_variants(deit, pixels):
    result = search_schedules(deit, pixels[:8], ScheduleSearchSettings(1.6, max_grid=3, refine_steps=0, progress=False))
    labels = [r.variant for r in result.variants]
    assert labels[0] == "plain"
    assert {"protect=8", "prune=1", "metric=heads", "metric=tokens", "merge=mlerp",
            "metric=heads,merge=mlerp", "metric=tokens,merge=mlerp"} <= set(labels)
    assert all(r.flops_ratio >= 1.6 for r in result.variants)  # reach_target made up the matching cost
    best = min(result.variants, key=lambda r: (r.divergence, -r.agreement))
    # the best variant, or better still: the grid again with its keys (and the variants once more)
    assert result.best_metrics.divergence <= best.divergence
    assert min(r.divergence for r in result.evaluated) == result.best_metrics.divergence
    if best.variant != "plain":
        keys = set(best.variant.split(","))
        regrid = [r for r in result.evaluated if r not in result.variants and keys <= set(
            variant_label(Schedule.parse(r.spec)).split(","))]
        assert regrid  # the grid was searched again with the winning variant
    assert all(r.flops_ratio >= 1.6 for r in result.evaluated)
