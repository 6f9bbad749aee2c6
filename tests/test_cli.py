"""The dsm-export command line: export, validate, inspect, and every bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from dsm_export.cli import main

from conftest import DEIT, DSM_17


@pytest.fixture(scope="module")
def exported(tmp_path_factory, weights):
    path = str(tmp_path_factory.mktemp("cli") / "deit_dsm.onnx")
    assert main(["export", DEIT, "--weights", weights, "--schedule", DSM_17, "--output", path]) == 0
    return path


def test_validate_passes_and_writes_json(exported, images_dir, tmp_path, capsys):
    report_path = str(tmp_path / "report.json")
    code = main(["validate", exported, "--images", images_dir, "--limit", "24", "--json", report_path,
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "PASS" in out
    with open(report_path) as fh:
        report = json.load(fh)
    for key in ("max_abs_diff", "top1_match_pytorch", "top1_agreement", "kl", "top1_accuracy",
                "baseline_top1_accuracy", "flops_ratio", "images"):
        assert key in report
    assert report["images"] == 24 and report["max_abs_diff"] <= 1e-4
    assert report["top1_match_pytorch"] == 1.0 and report["flops_ratio"] >= 1.7
    assert 0 <= report["top1_accuracy"] <= 1 and report["kl"] > 0


def test_validate_outside_tolerance_exits_1(exported, images_dir, capsys):
    code = main(["validate", exported, "--images", images_dir, "--limit", "4", "--atol", "1e-12",
                 "--no-progress"])
    assert code == 1 and "FAIL" in capsys.readouterr().out


def test_validate_without_labels(exported, images_dir, tmp_path, capsys):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for name in sorted(os.listdir(images_dir))[:3]:
        if name.endswith(".JPEG"):
            shutil.copy(os.path.join(images_dir, name), folder)
    assert main(["validate", exported, "--images", str(folder), "--no-progress"]) == 0
    assert "top-1 accuracy:           n/a" in capsys.readouterr().out


def test_inspect_model_and_file(exported, capsys):
    assert main(["inspect", DEIT, "--schedule", "r=13"]) == 0
    out = capsys.readouterr().out
    assert "1.74x fewer FLOPs" in out and "global 13" in out
    # the last block runs for the class token alone; the unmerged FLOPs are timm's model's
    assert "prefix tokens only (r skipped)" in out and "(unmerged 1.2537)" in out
    assert main(["inspect", exported]) == 0
    out = capsys.readouterr().out
    assert "local 36 (9/window x 4, r=34)" in out  # the tokens it really removes: 4 windows x 9
    assert "\n   11  prefix tokens only " in out  # read from the file's metadata (dsm.last_block)
    assert "\nprecision fp32\n" in out


def _bad(args, capsys, match, output=None):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("dsm-export: error:"), err
    assert match in err, err
    if output:
        folder = os.path.dirname(output)
        assert os.listdir(folder) == [], "output or temporary file left behind"


@pytest.fixture
def out_path(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    return str(folder / "model.onnx")


def test_unknown_model(capsys, out_path):
    _bad(["export", "no_such_vit", "-o", out_path], capsys, "unknown timm model 'no_such_vit'", out_path)


def test_unsupported_architecture(capsys, out_path):
    _bad(["export", "swin_tiny_patch4_window7_224", "-o", out_path, "--schedule", "r=8"], capsys,
         "SwinTransformer", out_path)


def test_impossible_schedule(capsys, out_path, weights):
    _bad(["export", DEIT, "--weights", weights, "-o", out_path, "--schedule", "r=16"], capsys,
         "block 11: global r=16", out_path)


def test_missing_weights(capsys, out_path):
    _bad(["export", DEIT, "--weights", "/nonexistent/w.pth", "-o", out_path], capsys,
         "does not exist", out_path)


def test_weights_of_another_model(capsys, out_path, weights):
    _bad(["export", "deit_small_patch16_224", "--weights", weights, "-o", out_path], capsys,
         "do not fit deit_small_patch16_224", out_path)


def test_input_size_other_than_the_models(capsys, out_path, weights):
    _bad(["export", DEIT, "--weights", weights, "-o", out_path, "--input-size", "256"], capsys,
         "differs from deit_tiny_patch16_224's 224x224", out_path)


def test_image_folder_without_images(exported, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    report = str(tmp_path / "r.json")
    _bad(["validate", exported, "--images", str(empty), "--json", report], capsys, "holds no images")
    assert not os.path.exists(report)


def test_corrupt_onnx(tmp_path, images_dir, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model" * 10)
    _bad(["validate", str(bad), "--images", images_dir], capsys, "is not a valid ONNX model")
    _bad(["inspect", str(bad)], capsys, "is not a valid ONNX model")


@pytest.mark.heavy  # random-init exports or a subprocess: no data, but seconds
def test_console_script_exit_code(tmp_path):
    """The installed entry point itself: one line on stderr, status 2."""
    proc = subprocess.run([sys.executable, "-m", "dsm_export", "export", "no_such_vit", "-o",
                           str(tmp_path / "x.onnx")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["dsm-export: error: unknown timm model 'no_such_vit' "
                                                "(see timm.list_models())"]
    assert list(tmp_path.iterdir()) == []
