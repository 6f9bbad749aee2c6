"""TensorRT engines built for real: TensorRT-RTX builds them on this machine, with no GPU.

Every build goes export -> ``dsm-export build --backend tensorrt`` -> a ``.plan`` and its sidecar, whose
engine header names the release and the targets asked, with no error in TensorRT's build log. One
precision matrix (fp32, fp16, static INT8) on the real DeiT-Tiny here; one fp32 build per merge
variant and per model family rides on their parity tests (test_variants, test_export: the same
exported file, see ``trt_checks.build_and_check``). Then the TensorRT-RTX targets, what must be
refused before any work, and what needs a GPU. CI installs the ``tensorrt-rtx`` extra:
these tests fail there rather than skip without TensorRT; only running an engine needs a GPU.
"""

import json
import os
from pathlib import Path

import onnx
import pytest
import timm
import torch

from dsm_export.cli import main
from dsm_export.graph.export import export_model

from conftest import DEIT
from trt_checks import assert_engine

pytestmark = pytest.mark.tensorrt


def _one_line_refusal(capsys, argv, *outputs):
    """``argv`` exits 2 with one line on stderr and leaves none of ``outputs`` behind; the line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for path in outputs:
        assert not os.path.exists(path) and not os.path.exists(str(path) + ".json")
    return err


# ---------------------------------------------------------------------------- DeiT-Tiny, every precision
@pytest.fixture(scope="module")
def int8_qdq(dsm_onnx, images_dir, tmp_path_factory):
    """Static QDQ files of the DSM export: plain, and smoothed as tune's INT8 engines are (SmoothQuant
    alpha 0.7)."""
    folder = tmp_path_factory.mktemp("trt_int8")
    out = {}
    for kind, extra in (("int8", []), ("int8-smoothed", ["--smooth-alpha", "0.7"])):
        out[kind] = str(folder / f"deit_dsm_{kind}.onnx")
        assert main(["build", dsm_onnx, "--backend", "onnxruntime", "--precision", "int8", "--calibration",
                     images_dir, "--calibration-count", "8", "--output", out[kind], *extra]) == 0
    return out


@pytest.mark.parametrize("kind", ["fp32", "fp16", "int8", "int8-smoothed"])
def test_deit_tiny_builds_in_every_precision(tensorrt, dsm_onnx, int8_qdq, tmp_path, kind, capsys):
    precision = kind.split("-")[0]
    plan = tmp_path / f"deit_{kind}.plan"
    source = int8_qdq.get(kind, dsm_onnx)
    assert main(["build", source, "--backend", "tensorrt", "--precision", precision, "--output", str(plan)]) == 0
    out = capsys.readouterr().out
    assert f"{precision}," in out and "built in" in out and "the engine runs on" in out
    sidecar = assert_engine(plan, tensorrt, precision)
    assert sidecar["profile"]["min"][0] == 1 and sidecar["batch"] is None
    assert sidecar["onnx_metadata"]["dsm.schedule"] == onnx_meta(source)["dsm.schedule"]
    if tensorrt.flavour == "rtx" and not torch.cuda.is_available():
        assert "no GPU (CPU-only ahead-of-time build)" in out


def onnx_meta(path):
    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}


def _export(tmp_path, name, spec, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    path = str(tmp_path / "model.onnx")
    export_model(model, name, path, spec)
    return path


# ------------------------------------------------------------------------------- TensorRT-RTX targets
@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("trt_small"), DEIT, "r=12,delay=1,local=1", depth=3)


def test_rtx_engines_carry_the_targets_asked(tensorrt, small_export, tmp_path, capsys):
    if tensorrt.flavour != "rtx":
        pytest.skip(f"compute-capability targets are TensorRT-RTX's; {tensorrt.name} is installed")
    plan = tmp_path / "two.plan"
    assert main(["build", small_export, "--backend", "tensorrt", "--compute-capability", "8.6,sm89",
                 "--output", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "targets 8.6, 8.9" in out and "not on 7.5 (Turing) or 9.0 (Hopper, H100/H200)" in out
    assert_engine(plan, tensorrt, "fp32", ("8.6", "8.9"))
    one = tmp_path / "blackwell.plan"
    assert main(["build", small_export, "--backend", "tensorrt", "--precision", "fp16", "--compute-capability",
                 "12.0", "--output", str(one)]) == 0
    assert_engine(one, tensorrt, "fp16", ("12.0",))
    # No Hopper target: refused before any work
    err = _one_line_refusal(capsys, ["build", small_export, "--backend", "tensorrt", "--compute-capability",
                                     "9.0", "--output", str(tmp_path / "h.plan")], tmp_path / "h.plan")
    assert "no target for H100/H200" in err
    # Turing: TensorRT-RTX has no fp32 GEMM there and the matching path is fp32: the build fails,
    # with TensorRT's reason in one line, and nothing is written
    err = _one_line_refusal(capsys, ["build", small_export, "--backend", "tensorrt", "--compute-capability",
                                     "7.5", "--output", str(tmp_path / "t.plan")], tmp_path / "t.plan")
    assert "Turing" in err and "leave 7.5 out" in err
    # The timing cache would force a GPU query and does nothing in TensorRT-RTX
    err = _one_line_refusal(capsys, ["build", small_export, "--backend", "tensorrt", "--timing-cache",
                                     str(tmp_path / "c.bin"), "--output", str(tmp_path / "c.plan")],
                            tmp_path / "c.plan", tmp_path / "c.bin")
    assert "no timing cache" in err


# ------------------------------------------------------------------- refused before any work is done
def test_files_tensorrt_cannot_take_are_refused(small_export, images_dir, tmp_path, capsys):
    """An ONNX Runtime-optimized file (contrib ops), a dynamic or U8S8 INT8 file, a float file for an
    INT8 engine: one line each, naming the build that makes a TensorRT-ready file, and no plan.
    These checks read the file only, so they hold with or without TensorRT installed."""
    ort16 = str(tmp_path / "ort16.onnx")
    assert main(["build", small_export, "--backend", "onnxruntime", "--precision", "fp16", "--output", ort16]) == 0
    assert any(n.domain == "com.microsoft" for n in onnx.load(ort16).graph.node)
    plan = tmp_path / "x.plan"
    err = _one_line_refusal(capsys, ["build", ort16, "--backend", "tensorrt", "--precision", "fp16",
                                     "--output", str(plan)], plan)
    assert "ONNX Runtime-only ops" in err and "FusedMatMul" in err
    assert "dsm-export build EXPORT.onnx --backend tensorrt --precision fp16" in err
    dyn = str(tmp_path / "dyn.onnx")
    assert main(["build", small_export, "--backend", "onnxruntime", "--precision", "int8", "--quantization",
                 "dynamic", "--output", dyn]) == 0
    err = _one_line_refusal(capsys, ["build", dyn, "--backend", "tensorrt", "--precision", "int8",
                                     "--output", str(plan)], plan)
    assert "dynamic INT8" in err and "--backend onnxruntime --precision int8 --calibration DIR" in err
    u8 = str(tmp_path / "u8.onnx")
    assert main(["build", small_export, "--backend", "onnxruntime", "--precision", "int8", "--activations",
                 "uint8", "--calibration", images_dir, "--calibration-count", "2", "--output", u8]) == 0
    err = _one_line_refusal(capsys, ["build", u8, "--backend", "tensorrt", "--precision", "int8",
                                     "--output", str(plan)], plan)
    assert "with uint8" in err and "symmetric int8 activations" in err
    err = _one_line_refusal(capsys, ["build", small_export, "--backend", "tensorrt", "--precision", "int8",
                                     "--output", str(plan)], plan)
    assert "is not quantized" in err
    err = _one_line_refusal(capsys, ["build", u8, "--backend", "tensorrt", "--output", str(plan)], plan)
    assert "is quantized: build it with --precision int8" in err
    err = _one_line_refusal(capsys, ["build", small_export, "--backend", "onnxruntime", "--compute-capability",
                                     "8.6", "--output", str(tmp_path / "o.onnx")], tmp_path / "o.onnx")
    assert "apply to --backend tensorrt only" in err


# --------------------------------------------------------------------------- running needs a GPU
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the engine would run")
def test_running_an_engine_without_a_gpu_says_so(tensorrt, small_export, images_dir, tmp_path, capsys):
    plan = str(tmp_path / "run.plan")
    assert main(["build", small_export, "--backend", "tensorrt", "--output", plan]) == 0
    report = tmp_path / "report.json"
    err = _one_line_refusal(capsys, ["validate", "--engine", plan, "--images", images_dir, "--json", str(report)],
                            report)
    assert "needs an NVIDIA GPU" in err
    err = _one_line_refusal(capsys, ["bench", plan, plan, "--batch", "4"])
    assert "needs an NVIDIA GPU" in err


def test_triton_repo_refuses_a_tensorrt_rtx_plan(tensorrt, small_export, tmp_path, capsys):
    if tensorrt.flavour != "rtx":
        pytest.skip(f"{tensorrt.name} plans are what Triton's TensorRT backend runs")
    plan = str(tmp_path / "rtx.plan")
    assert main(["build", small_export, "--backend", "tensorrt", "--output", plan]) == 0
    repo = tmp_path / "repo"
    err = _one_line_refusal(capsys, ["triton-repo", plan, "-o", str(repo), "--allow-random-init"], repo)
    assert "TensorRT-RTX engine" in err and "full-TensorRT plans only" in err
    assert json.loads(Path(plan + ".json").read_text())["flavour"] == "rtx"
