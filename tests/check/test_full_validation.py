"""The main job on all 500 shared photos: export DSM DeiT-Tiny at >= 1.7x fewer FLOPs and validate it."""

import pytest

from dsm_export.graph.export import export_onnx
from dsm_export.check.validate import validate

from conftest import DEIT, DSM_17


@pytest.fixture(scope="module")
def report(tmp_path_factory, weights, images_dir):
    path = str(tmp_path_factory.mktemp("full") / "deit_dsm.onnx")
    export_onnx(DEIT, path, DSM_17, weights)
    return validate(path, images_dir, progress=False)


def test_parity_on_every_image(report):
    assert report["images"] == 500
    assert report["max_abs_diff"] <= 1e-4
    assert report["top1_match_pytorch"] == 1.0
    assert report["passed"]


def test_dsm_schedule_keeps_accuracy_at_1_7x_fewer_flops(report):
    assert report["flops_ratio"] >= 1.7
    assert report["baseline_top1_accuracy"] == pytest.approx(0.792)  # shared/models/README.md
    assert report["top1_accuracy"] >= report["baseline_top1_accuracy"] - 0.010 - 1e-9
    assert report["top1_agreement"] >= 0.9
    assert report["kl"] < 0.06
