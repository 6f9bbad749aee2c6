"""Engines, Triton model repositories and a live Triton server (PyTriton) on loopback."""

import importlib.util
import os
import signal
import subprocess

import numpy as np
import onnx
import pytest

from dsm_export.cli import main
from dsm_export.graph.export import export_onnx
from dsm_export.check.validate import onnx_runner, validate

from conftest import DEIT
from servers import start_ready

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def dsm_file(dsm_onnx):
    return dsm_onnx


# ------------------------------------------------------------------ engines
def test_onnxruntime_engine_fp32_keeps_parity(dsm_file, images_dir, tmp_path):
    out = str(tmp_path / "opt.onnx")
    assert main(["build", dsm_file, "--backend", "onnxruntime", "-o", out]) == 0
    report = validate(out, images_dir, limit=16, progress=False)
    assert report["passed"] and report["max_abs_diff"] <= 1e-4
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["dsm.engine"] == "onnxruntime" and meta["dsm.precision"] == "fp32"


def test_onnxruntime_engine_fp16_keeps_matching_in_fp32(dsm_file, images_dir, tmp_path):
    out = str(tmp_path / "fp16.onnx")
    assert main(["build", dsm_file, "--backend", "onnxruntime", "--precision", "fp16", "-o", out]) == 0
    model = onnx.load(out)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    topk = [n for n in model.graph.node if n.op_type == "TopK"]
    assert topk and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in topk)
    logs = [n for n in model.graph.node if n.op_type == "Log"]  # log(size): proportional attention
    assert logs and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in logs)
    halves = sum(1 for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16)
    assert halves > len(model.graph.initializer) // 2
    report = validate(out, images_dir, limit=32, progress=False)
    assert report["criterion"].startswith("fp16")
    assert report["passed"], report  # median per-image max |dlogit| <= 0.1, top-1 match >= 98 %
    assert report["median_abs_diff"] > 1e-4  # it really runs in fp16


@pytest.mark.skipif(HAS_TRT, reason="full TensorRT is installed: the missing-package path does not apply")
def test_tensorrt_missing_is_a_clear_error(dsm_file, tmp_path, capsys):
    out = tmp_path / "m.plan"
    """Full TensorRT asked for where only TensorRT-RTX (or nothing) is installed: one clear line."""
    assert main(["build", dsm_file, "--backend", "tensorrt", "--tensorrt", "enterprise", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tensorrt is not installed" in err.lower() and "pip install tensorrt" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.skipif(not HAS_TRT, reason="full TensorRT is not installed (its wheels need NVIDIA's package index; "
                                        "TensorRT-RTX builds are tested in test_tensorrt_build)")
def test_tensorrt_engine_builds_and_validates(dsm_file, images_dir, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs an NVIDIA GPU")
    plan = str(tmp_path / "m.plan")
    cache = str(tmp_path / "timing.cache")
    assert main(["build", dsm_file, "--backend", "tensorrt", "--tensorrt", "enterprise", "-o", plan,
                 "--timing-cache", cache]) == 0
    assert os.path.getsize(cache) > 0 and os.path.isfile(plan + ".json")
    assert main(["validate", "--engine", plan, "--images", images_dir, "--limit", "16", "--no-progress"]) == 0


# ------------------------------------------------------------------ model repository
def _parse_config(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    with open(path, encoding="utf-8") as fh:
        return text_format.Parse(fh.read(), model_config_pb2.ModelConfig())


def test_triton_repository_configs(dsm_file, tmp_path, weights):
    from tritonclient.grpc import model_config_pb2 as pb2

    static = str(tmp_path / "deit_b4.onnx")
    export_onnx(DEIT, static, "none", weights, batch=4)
    repo = tmp_path / "repo"
    assert main(["triton-repo", dsm_file, static, "-o", str(repo), "--max-batch", "16"]) == 0
    for name, path in (("deit_dsm", dsm_file), ("deit_b4", static)):
        cfg = _parse_config(repo / name / "config.pbtxt")
        model = onnx.load(path)
        in_dims = [d.dim_value or -1 for d in model.graph.input[0].type.tensor_type.shape.dim]
        out_dims = [d.dim_value or -1 for d in model.graph.output[0].type.tensor_type.shape.dim]
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx"
        assert [i.name for i in cfg.input] == [model.graph.input[0].name]
        assert [o.name for o in cfg.output] == [model.graph.output[0].name]
        assert cfg.input[0].data_type == pb2.TYPE_FP32
        if in_dims[0] == -1:  # dynamic batch: dims leave out the batch axis
            assert cfg.max_batch_size == 16
            assert list(cfg.input[0].dims) == in_dims[1:] and list(cfg.output[0].dims) == out_dims[1:]
            assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]
        else:  # fixed batch: full dims, no batcher
            assert cfg.max_batch_size == 0
            assert list(cfg.input[0].dims) == in_dims and list(cfg.output[0].dims) == out_dims
            assert not cfg.HasField("dynamic_batching")
        assert cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
        with open(path, "rb") as a, open(repo / name / "1" / "model.onnx", "rb") as b:
            assert a.read() == b.read()


# ------------------------------------------------------------------ live server
@pytest.fixture(scope="module")
def server(dsm_file, tmp_path_factory):
    srv = start_ready([dsm_file], ["dsm"], str(tmp_path_factory.mktemp("log") / "serve.log"), ["--threads", "1"])
    try:
        yield {"proc": srv.proc, "http": srv.http, "grpc": srv.grpc, "srv": srv}
    finally:
        srv.close()


def _pixels(images_dir, n):
    import timm

    from dsm_export.data import eval_transform, list_images, load_batch

    images = list_images(images_dir, limit=n)
    return images, load_batch(images, range(n), eval_transform(timm.create_model(DEIT))).numpy()


def test_served_logits_equal_local_onnxruntime(server, dsm_file, images_dir):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    _, x = _pixels(images_dir, 6)
    local = onnx_runner(dsm_file)(x)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server['http']}")
    inp = httpclient.InferInput("pixel_values", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    served = client.infer("dsm", [inp]).as_numpy("logits")
    np.testing.assert_allclose(served, local, rtol=0, atol=1e-4)
    gclient = grpcclient.InferenceServerClient(f"127.0.0.1:{server['grpc']}")
    ginp = grpcclient.InferInput("pixel_values", [1, *x.shape[1:]], "FP32")
    ginp.set_data_from_numpy(x[2:3])
    np.testing.assert_allclose(gclient.infer("dsm", [ginp]).as_numpy("logits"), local[2:3], rtol=0, atol=1e-4)


def test_served_image_model_top_k(server, dsm_file, images_dir):
    import tritonclient.http as httpclient
    from timm.data import ImageNetInfo

    images, x = _pixels(images_dir, 2)
    local = onnx_runner(dsm_file)(x)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server['http']}")
    for i in range(2):
        with open(images.path(i), "rb") as fh:
            data = fh.read()
        inp = httpclient.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([data], dtype=object))
        result = client.infer("dsm_image", [inp])
        idx, scores = result.as_numpy("top_k_indices"), result.as_numpy("top_k_scores")
        assert list(idx) == list(np.argsort(-local[i], kind="stable")[:5])
        probs = np.exp(local[i] - local[i].max())
        probs /= probs.sum()
        np.testing.assert_allclose(scores, probs[idx], rtol=1e-4)
        names = [n.decode() for n in result.as_numpy("top_k_names")]
        assert names == [ImageNetInfo("imagenet-1k").index_to_description(int(i)) for i in idx]


def test_bad_requests_fail_alone(server, images_dir):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(f"127.0.0.1:{server['http']}")
    wrong_shape = httpclient.InferInput("pixel_values", [1, 3, 200, 224], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 3, 200, 224), np.float32))
    with pytest.raises(InferenceServerException, match="shape"):
        client.infer("dsm", [wrong_shape])
    wrong_dtype = httpclient.InferInput("pixel_values", [1, 3, 224, 224], "FP64")
    wrong_dtype.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float64))
    with pytest.raises(InferenceServerException, match="(?i)data.?type|FP64"):
        client.infer("dsm", [wrong_dtype])
    garbage = httpclient.InferInput("image", [1], "BYTES")
    garbage.set_data_from_numpy(np.array([b"these bytes are no image"], dtype=object))
    with pytest.raises(InferenceServerException, match="not a JPEG/PNG image"):
        client.infer("dsm_image", [garbage])
    # ... and the server keeps serving good requests.
    _, x = _pixels(images_dir, 1)
    good = httpclient.InferInput("pixel_values", list(x.shape), "FP32")
    good.set_data_from_numpy(x)
    assert client.infer("dsm", [good]).as_numpy("logits").shape == (1, 1000)
    assert client.is_server_live() and client.is_server_ready()


def test_sigterm_shuts_down_cleanly(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("serve still ran 120 s after SIGTERM; its log ends:\n" + server["srv"].log()[-4000:])
    assert code == 0, server["srv"].log()[-4000:]
    assert "stopped" in server["srv"].log()
