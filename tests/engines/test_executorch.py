"""ExecuTorch programs (``.pte`` + ``.pte.json``) built from the DSM export of the shared DeiT-Tiny: fp32
parity with PyTorch, INT8 by validate's INT8 criterion, the sidecar read back, one-line refusals.

Skipped where the ``executorch`` extra is not installed."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("executorch.runtime", reason="the executorch extra is not installed: pip install -e '.[executorch]'")
pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e", reason="torchao (executorch extra) is not installed")

from conftest import DEIT, DSM_17  # noqa: E402
from dsm_export.check.validate import INT8_MAX_KL, INT8_MIN_TOP1_MATCH  # noqa: E402
from dsm_export.core.patch import apply  # noqa: E402
from dsm_export.data import list_images  # noqa: E402
from dsm_export.check.evaluate import load_pixels  # noqa: E402
from dsm_export.engines import executorch as et  # noqa: E402
from dsm_export.engines.registry import BuildRequest, Runner, RunnerOptions, check_request  # noqa: E402
from dsm_export.errors import DSMError  # noqa: E402
from dsm_export.graph.export import load_onnx, read_metadata  # noqa: E402
from dsm_export.metrics import kl_divergence  # noqa: E402

CALIBRATION = 64  # the first 64 photos calibrate (the build default)
# The INT8 check scores the next 128 photos: on this aggressive schedule one INT8 rounding can flip a
# merge, and the KL of 64-photo subsets swings (0.062 on photos 64-127, 0.023 on 128-191 when built).
SCORED = 128


def _build(source, folder, precision, calibration=None):
    lines = []
    out = str(folder / f"dsm_{precision}.pte")
    record = et.BACKEND.build(BuildRequest(source, out, precision, calibration, CALIBRATION), lines.append)
    return out, record, lines


@pytest.fixture(scope="module")
def fp32_pte(dsm_onnx, tmp_path_factory):
    """The DSM export (dynamic batch: a program of static batch 1) as an fp32 program."""
    return _build(dsm_onnx, tmp_path_factory.mktemp("executorch"), "fp32")


@pytest.fixture(scope="module")
def int8_pte(dsm_onnx, images_dir, tmp_path_factory):
    """The DSM export as an INT8 program calibrated on the first :data:`CALIBRATION` photos."""
    return _build(dsm_onnx, tmp_path_factory.mktemp("executorch"), "int8", images_dir)


@pytest.fixture(scope="module")
def reference(deit):
    """PyTorch with the schedule, the independent reference form: ``[B, 3, 224, 224]`` -> logits."""
    merged = apply(deit, DSM_17, impl="reference").eval()

    def run(x):
        with torch.no_grad():
            return merged(torch.as_tensor(x)).numpy()

    return run


def test_fp32_program_matches_pytorch(fp32_pte, dsm_onnx, pixels, reference):
    path, record, lines = fp32_pte
    assert record.files == [path, path + ".json"] and all(os.path.isfile(f) for f in record.files)
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]
    assert record.summary[0].startswith(f"wrote {path} and {path}.json: ExecuTorch ")
    assert "fp32, static batch 1" in record.summary[0] and "XNNPACK runs" in record.summary[1]
    assert any(line.startswith("lowering to ExecuTorch") for line in lines)
    with open(path + ".json") as fh:
        sidecar = json.load(fh)
    source = load_onnx(dsm_onnx, weights=False)
    assert sidecar["onnx_metadata"] == {p.key: p.value for p in source.metadata_props}
    assert sidecar["precision"] == "fp32" and sidecar["batch"] == 1 and sidecar["quantization"] is None
    assert (sidecar["input_name"], sidecar["output_name"], sidecar["output_dims"]) == ("pixel_values", "logits", [1000])
    assert sidecar["delegated_nodes"] > sidecar["non_delegated_nodes"] > 0

    runner = et.BACKEND.open(path, RunnerOptions(threads=1))
    try:
        assert isinstance(runner, Runner) and runner.judged_as == "fp32"
        assert runner.label.startswith("ExecuTorch ") and "1 threads" in runner.label
        x = pixels[:6].numpy()
        got = runner(x)
    finally:
        runner.close()
    want = reference(x)
    assert got.shape == want.shape == (6, 1000) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_engine_file_is_read_back_from_the_sidecar(fp32_pte, dsm_onnx):
    path = fp32_pte[0]
    engine = et.BACKEND.read(path)
    source = read_metadata(load_onnx(dsm_onnx, weights=False), dsm_onnx)
    assert engine.backend == "executorch" and engine.precision == "fp32"
    assert engine.info.model == DEIT and engine.info.schedule.spec() == source.schedule.spec()
    assert engine.info.tokens == source.tokens and engine.info.weights == source.weights
    assert engine.static_batch == engine.info.batch == 1 and source.batch is None
    assert (engine.input_name, engine.output_name, engine.output_dims) == ("pixel_values", "logits", (1000,))
    assert engine.files == (path, path + ".json")
    assert os.path.abspath(engine.source_path) == os.path.abspath(dsm_onnx)  # weights resolve from there
    assert engine.meta["precision"] == "fp32" and "onnx_metadata" not in engine.meta
    assert et.BACKEND.claims("model.PTE") and not et.BACKEND.claims("model.onnx")


def test_int8_program_meets_the_int8_criterion(int8_pte, images_dir, deit, reference):
    path, record, lines = int8_pte
    q = record.details["quantization"]
    # only the weight layers: DeiT-Tiny's 49 linears (qkv, proj, fc1, fc2 x 12, head) and the patch embedding
    assert q["quantized"] == {"conv2d": 1, "linear": 49} and q["calibration_count"] == CALIBRATION
    assert f"calibrated on {CALIBRATION} images" in record.summary[2] and "stay fp32" in record.summary[2]
    x = load_pixels(list_images(images_dir, limit=CALIBRATION + SCORED), deit)[CALIBRATION:].numpy()
    runner = et.BACKEND.open(path, RunnerOptions())
    try:
        assert runner.judged_as == "int8"
        got = runner(x)
    finally:
        runner.close()
    want = reference(x)
    match = float((got.argmax(-1) == want.argmax(-1)).mean())
    kl = float(kl_divergence(want, got).mean())
    print(f"int8 program on {len(x)} photos: top-1 match {match:.4f}, KL {kl:.4f}")
    assert match >= INT8_MIN_TOP1_MATCH and kl <= INT8_MAX_KL, (match, kl)
    assert np.abs(got - want).max() > 1e-3  # it is quantized


def test_mistakes_are_one_line_errors(fp32_pte, dsm_onnx, images_dir, pixels, tmp_path):
    path = fp32_pte[0]
    out = str(tmp_path / "x.pte")
    with pytest.raises(DSMError, match="--backend executorch runs fp32 or int8"):
        check_request(et.BACKEND, BuildRequest(dsm_onnx, out, "fp16"))
    with pytest.raises(DSMError, match="an ExecuTorch program is a .pte file"):
        check_request(et.BACKEND, BuildRequest(dsm_onnx, str(tmp_path / "x.onnx")))
    with pytest.raises(DSMError, match="needs calibration images: --calibration DIR"):
        check_request(et.BACKEND, BuildRequest(dsm_onnx, out, "int8"))
    with pytest.raises(DSMError, match="--calibration applies to --precision int8 only"):
        check_request(et.BACKEND, BuildRequest(dsm_onnx, out, "fp32", images_dir))
    assert not os.listdir(tmp_path)  # refused before any work

    info = read_metadata(load_onnx(dsm_onnx, weights=False), dsm_onnx)
    with pytest.raises(DSMError, match="randomly initialised weights"):
        et.rebuild_module(dataclasses.replace(info, weights="", weights_sha256=""), dsm_onnx)
    with pytest.raises(DSMError, match="are not the ones"):
        et.rebuild_module(dataclasses.replace(info, weights_sha256="0" * 64), dsm_onnx)

    with pytest.raises(DSMError, match="--provider is for ONNX files"):
        et.BACKEND.open(path, RunnerOptions(provider="cuda"))
    alone = str(tmp_path / "alone.pte")
    shutil.copyfile(path, alone)
    with pytest.raises(DSMError, match=r"alone.pte.json' is missing"):
        et.BACKEND.read(alone)
    stale = str(tmp_path / "stale.pte")
    shutil.copyfile(path + ".json", stale + ".json")
    with open(path, "rb") as src, open(stale, "wb") as dst:
        dst.write(src.read()[:4096])
    with pytest.raises(DSMError, match="a build that did not finish"):
        et.BACKEND.read(stale)
    with open(stale, "wb") as fh:
        fh.write(b"\0" * os.path.getsize(path))
    with pytest.raises(DSMError, match="not an ExecuTorch program"):
        et.BACKEND.read(stale)

    runner = et.BACKEND.open(path, RunnerOptions())
    try:
        with pytest.raises(DSMError, match=r"takes \[B, 3, 224, 224\] images, got \[2, 3, 112, 112\]"):
            runner(np.zeros((2, 3, 112, 112), np.float32))
        three = runner(pixels[:3].numpy())  # any batch through the static batch of 1
        assert three.shape == (3, 1000)
    finally:
        runner.close()
    with pytest.raises(DSMError, match="the runner is closed"):
        runner(pixels[:1].numpy())


def test_the_thread_pool_is_resized_only_while_no_runner_is_open(fp32_pte, pixels):
    """ExecuTorch has one thread pool per process and XNNPACK keeps the one a program loaded with:
    a runner asking for another size while one is open is refused, and sizes change between runners."""
    path = fp32_pte[0]
    x = pixels[:2].numpy()
    one = et.BACKEND.open(path, RunnerOptions(threads=1))
    try:
        with pytest.raises(DSMError, match="close that runner before opening one at 2 threads"):
            et.BACKEND.open(path, RunnerOptions(threads=2))
        same = et.BACKEND.open(path, RunnerOptions())  # no size asked: the open runner's
        try:
            assert "1 threads" in same.label
            np.testing.assert_array_equal(same(x), one(x))
        finally:
            same.close()
    finally:
        one.close()
    two = et.BACKEND.open(path, RunnerOptions(threads=2))  # none open: resized before it loads
    try:
        assert "2 threads" in two.label and two(x).shape == (2, 1000)
    finally:
        two.close()
