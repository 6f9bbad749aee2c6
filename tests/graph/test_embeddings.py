"""Embedding models (identity head, timm ``num_classes=0``): the ``embeddings`` output, cosine and
retrieval metrics, and tune/analyze ranking by 1 - cosine. Random-init DINOv2-style models
(registers, LayerScale, patch 14) for parity; the real DeiT-Tiny with ``num_classes=0`` for the rest."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dsm_export.check.analyze import merge_cost
from dsm_export.cli import main
from dsm_export.check.evaluate import model_logits, schedule_metrics
from dsm_export.graph.export import export_model, read_metadata
from dsm_export.core.models import create_model, is_embedding_model
from dsm_export.core.patch import apply
from dsm_export.core.schedule import Schedule
from dsm_export.search.schedule_search import ScheduleSearchSettings, search_schedules
from dsm_export.check.validate import cosine_similarity, embedding_metrics, knn_overlap, onnx_runner

from conftest import DEIT
from families import FAMILIES, build


def test_cosine_and_knn_overlap_by_hand():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert np.allclose(cosine_similarity(a, a), 1)
    assert np.allclose(cosine_similarity(a, a[:, ::-1]), [0, 0, 1])
    # Points on a line: each one's nearest neighbour is its neighbour on the line.
    x = np.stack([np.cos(np.linspace(0, 1.5, 6)), np.sin(np.linspace(0, 1.5, 6))], 1)
    assert knn_overlap(x, x, k=2) == 1.0
    assert knn_overlap(x, x[::-1], k=1) < 1.0
    m = embedding_metrics(x, x)
    assert m["divergence"] == m["cosine_distance"] < 1e-12 and m["agreement"] == 1.0


@pytest.fixture(scope="module")
def dinov2():
    """A DINOv2-style ViT (4 registers, LayerScale, patch 14), random init, identity head."""
    model = build("registers_cls")
    assert is_embedding_model(model) and model.patch_embed.patch_size == (14, 14)
    assert model.num_prefix_tokens == 5
    return model


@pytest.mark.heavy  # random-init exports or a subprocess: no data, but seconds
def test_dinov2_style_exports_embeddings_with_parity(dinov2, tmp_path):
    name, _, spec = FAMILIES["registers_cls"]
    path = str(tmp_path / "dinov2.onnx")
    info = export_model(dinov2, name, path, spec)
    model = onnx.load(path)
    assert [o.name for o in model.graph.output] == ["embeddings"] and info.embeddings
    dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", dinov2.num_features]
    assert read_metadata(model).output == "embeddings"
    torch.manual_seed(1)
    x = torch.randn(6, 3, 224, 224)
    with torch.inference_mode():
        ref = apply(dinov2, Schedule.parse(spec), impl="reference").eval()(x).numpy()
    got = onnx_runner(path)(x.numpy())
    assert got.shape == (6, dinov2.num_features)
    assert (1 - cosine_similarity(got, ref)).max() <= 1e-5
    assert knn_overlap(got, ref, k=3) == 1.0


@pytest.mark.heavy  # random-init exports or a subprocess: no data, but seconds
def test_dinov2_style_tune_and_merge_cost_use_cosine(dinov2):
    torch.manual_seed(2)
    pixels = torch.randn(8, 3, 224, 224)
    base = model_logits(dinov2, pixels)
    m = schedule_metrics(dinov2, Schedule(r=20), pixels, base)
    assert "kl" not in m and m["divergence"] == m["cosine_distance"] > 0
    assert 0 <= m["knn_overlap"] <= 1 and m["agreement"] == m["knn_overlap"]
    cost = merge_cost(dinov2, pixels, r=20, base_logits=base)
    # A merge in the last block changes only patch tokens, after that block's attention; the class
    # token the embedding is read from never sees it, so that cost is zero up to float rounding (its
    # sign is the rounding's: -2.8e-17 with torch 2.14.1 on 2 cores).
    assert len(cost["merge_cost"]) == 4 and all(c > 0 for c in cost["merge_cost"][:3])
    assert abs(cost["merge_cost"][3]) < 1e-9
    result = search_schedules(dinov2, pixels, ScheduleSearchSettings(1.3, max_grid=3, refine_steps=2, progress=False))
    assert result.best_metrics.divergence == min(r.divergence for r in result.evaluated)
    assert result.best_metrics.flops_ratio >= 1.3


def test_real_deit_num_classes_0_validate_tune_analyze(weights, images_dir, tmp_path, capsys):
    path = str(tmp_path / "deit_emb.onnx")
    assert main(["export", DEIT, "--weights", weights, "--num-classes", "0", "--schedule", "r=13",
                 "-o", path]) == 0
    assert [o.name for o in onnx.load(path).graph.output] == ["embeddings"]
    report_path = str(tmp_path / "r.json")
    assert main(["validate", path, "--images", images_dir, "--limit", "32", "--no-progress",
                 "--json", report_path]) == 0
    out = capsys.readouterr().out
    assert "cosine min" in out and "retrieval overlap@5" in out and "PASS" in out
    report = json.loads(Path(report_path).read_text())
    assert report["cosine"]["pytorch"]["min"] >= 1 - 1e-5
    # Merging 1.7x fewer FLOPs keeps trained DeiT-Tiny features close to the unmerged ones.
    assert report["cosine"]["unmerged"]["mean"] > 0.9
    assert main(["tune", DEIT, "--weights", weights, "--num-classes", "0", "--images", images_dir,
                 "--target-flops-ratio", "1.5", "--calibration-count", "12", "--holdout", "12",
                 "--max-grid", "3", "--refine-steps", "2", "--no-progress",
                 "--report", str(tmp_path / "tune.json")]) == 0
    out = capsys.readouterr().out
    assert "1 - cosine" in out and "KL" not in out
    assert json.loads(Path(tmp_path / "tune.json").read_text())["divergence"] == "1 - cosine"
    assert main(["analyze", DEIT, "--weights", weights, "--num-classes", "0", "--images", images_dir,
                 "--limit", "6", "-o", str(tmp_path / "an")]) == 0
    an = json.loads(Path(tmp_path / "an" / "analysis.json").read_text())
    assert an["merge_cost_metric"] == "1 - cosine" and "merge_kl" not in an
    assert an["merge_cost"][0] > an["merge_cost"][-1]


def test_embedding_graph_needs_the_same_head(weights, images_dir, tmp_path, capsys):
    path = str(tmp_path / "deit_emb.onnx")
    assert main(["export", DEIT, "--weights", weights, "--num-classes", "0", "-o", path]) == 0
    capsys.readouterr()
    assert main(["validate", path, "--images", images_dir, "--limit", "2", "--no-progress",
                 "--model", "deit_tiny_patch16_224", "--weights", weights]) == 0  # num_classes from metadata
    model = create_model(DEIT, weights, num_classes=0)
    assert model.num_classes == 0
