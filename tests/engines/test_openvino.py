"""OpenVINO engines: real IR built from the DSM export, real inference, real NNCF quantization.

Skipped only where the ``openvino`` extra is absent outside CI (``.ci/run`` installs it)."""

import os

import numpy as np
import onnx
import pytest

from dsm_export.cli import main

from conftest import DEIT

pytestmark = pytest.mark.openvino


@pytest.fixture(scope="module")
def ov():
    try:
        import nncf  # noqa: F401
        import openvino
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the openvino extra is not installed: pip install -e '.[openvino]'")
        pytest.skip("the openvino extra is not installed: pip install -e '.[openvino]'")
    return openvino


@pytest.fixture(scope="module")
def int8_ir(ov, dsm_onnx, images_dir, tmp_path_factory):
    """DSM DeiT-Tiny as an OpenVINO INT8 IR (NNCF, 16 calibration images, no SmoothQuant)."""
    out = str(tmp_path_factory.mktemp("ov") / "dsm_int8.xml")
    code = main(["build", dsm_onnx, "--backend", "openvino", "--precision", "int8", "--calibration", images_dir,
                 "--calibration-count", "16", "--smooth-alpha", "0", "--output", out])
    assert code == 0
    return out


def _validate(xml, images_dir, tmp_path, limit=32):
    import json

    report = str(tmp_path / "report.json")
    code = main(["validate", xml, "--images", images_dir, "--limit", str(limit), "--no-progress", "--json", report])
    with open(report) as fh:
        return code, json.load(fh)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fp32_and_bf16_ir_build_and_validate(ov, dsm_onnx, images_dir, tmp_path, capsys, precision):
    from dsm_export.engines.openvino import cpu_has_bf16, read_ir_metadata
    from dsm_export.graph.export import load_onnx, read_metadata

    out = str(tmp_path / f"dsm_{precision}.xml")
    assert main(["build", dsm_onnx, "--backend", "openvino", "--precision", precision, "--output", out]) == 0
    printed = capsys.readouterr().out
    assert os.path.isfile(out) and os.path.isfile(out[:-4] + ".bin")
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp.xml") or f.endswith(".tmp.bin")]
    runs = "bf16" if precision == "bf16" and cpu_has_bf16(ov.Core()) else "f32"
    assert f"runs in {runs} on this CPU" in printed
    info, meta = read_ir_metadata(out)
    source = read_metadata(load_onnx(dsm_onnx), dsm_onnx)
    assert info.schedule.spec() == source.schedule.spec() and info.model == source.model
    assert meta["precision"] == precision and meta["inference_precision"] == runs and meta["engine"] == "openvino"

    code, report = _validate(out, images_dir, tmp_path)
    assert code == 0 and report["passed"], report
    assert report["inference_precision"] == runs
    if runs == "f32":  # fp32 parity holds in OpenVINO as in ONNX Runtime
        assert report["precision"] == "fp32" and report["max_abs_diff"] <= 1e-4
    else:
        assert report["precision"] == "bf16" and report["criterion"].startswith("bf16:")
        assert report["kl_to_pytorch"] <= 0.02 and report["top1_match_pytorch"] >= 0.95


def test_int8_keeps_the_matching_path_out_of_quantization(ov, int8_ir, dsm_onnx):
    """Read the IR: FakeQuantize ops exist, feed the weight layers, and feed no matching or size op
    and no attention MatMul."""
    from dsm_export.engines.openvino import ignored_nodes, read_ir_metadata
    from dsm_export.engines.int8.quantize import matching_nodes

    model = ov.Core().read_model(int8_ir)
    ops = model.get_ordered_ops()
    fq = [op for op in ops if op.get_type_name() == "FakeQuantize"]
    assert len(fq) > 40
    names, counts = ignored_nodes(onnx.load(dsm_onnx))
    matching = set(matching_nodes(onnx.load(dsm_onnx)))
    assert counts["matching"] == len(matching) > 100 and counts["attention"] >= 2 * 12  # q@k, attn@v a block
    kept = set(names)
    checked = 0

    def fed_by_fq(op):
        for inp in op.inputs():
            src = inp.get_source_output().get_node()
            while src.get_type_name() in ("Convert", "Transpose", "Reshape"):  # weight decompression
                src = src.input(0).get_source_output().get_node()
            if src.get_type_name() == "FakeQuantize":
                return True
        return False

    for op in ops:
        if op.get_friendly_name() in kept:
            checked += 1
            assert not fed_by_fq(op), f"{op.get_friendly_name()} ({op.get_type_name()}) is quantized"
    assert checked > 0.8 * len(kept)  # the rest were folded (Transposes into MatMuls)
    quantized_matmuls = [op for op in ops if op.get_type_name() == "MatMul" and fed_by_fq(op)]
    assert len(quantized_matmuls) >= 12 * 3  # qkv, fc1, fc2 (and proj) of every block
    _, meta = read_ir_metadata(int8_ir)
    assert meta["precision"] == "int8" and meta["calibration_count"] == "16" and len(meta["calibration_sha256"]) == 64
    assert meta["smooth_alpha"] == "0.0" and meta["fp32_matching_nodes"] == str(len(matching))


def test_merged_blocks_keep_openvinos_fused_attention(ov, weights, tmp_path):
    """Issue 46: in a compiled IR of a merging schedule with proportional attention and protected
    tokens, every head's MatMul-Softmax-MatMul runs inside OpenVINO's fused attention ("Subgraph"):
    no Softmax of the compiled model feeds a MatMul (the class token's importance rows are separate
    Softmaxes that feed the protection TopK only)."""
    from dsm_export.graph.export import export_onnx

    onnx_path = str(tmp_path / "protect.onnx")
    export_onnx(DEIT, onnx_path, "r=16,r_end=8,delay=3,protect=16,merge=mlerp", weights)
    core = ov.Core()
    compiled = core.compile_model(ov.convert_model(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ops = compiled.get_runtime_model().get_ordered_ops()
    kind = {op.get_friendly_name(): op.get_rt_info()["layerType"].astype(str) for op in ops}
    fed = [(op.get_friendly_name(), t.get_node().get_friendly_name())
           for op in ops if kind[op.get_friendly_name()] == "Softmax"
           for out in op.outputs() for t in out.get_target_inputs()]
    assert fed and not [(s, d) for s, d in fed if kind.get(d) == "MatMul"]
    assert sum(k == "Subgraph" for k in kind.values()) >= 12 * 3  # every head of every block


def test_ascending_indices_stay_exact_in_bf16(ov, tmp_path):
    """The export's order-keeping index selection (:func:`ascending_subset`) returns exact indices
    when OpenVINO runs its keys in bf16, above 256 tokens too: the indices select rows (bits of the
    row number) that a MatMul reads, so OpenVINO's bf16 reaches the TopK as in a model."""
    import torch

    from dsm_export.core.merge import ascending_subset

    n = 600
    bits = ((torch.arange(n).unsqueeze(-1) >> torch.arange(10)) & 1).to(torch.float32)  # row i: i in binary

    class Select(torch.nn.Module):
        def forward(self, idx, w):
            return torch.nn.functional.embedding(ascending_subset(idx, n, complement=True), bits) @ w

    idx = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s))[:150] for s in range(4)])
    path = str(tmp_path / "select.onnx")
    torch.onnx.export(Select(), (idx, torch.eye(10)), path, dynamo=True, opset_version=18)
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    got = (compiled([idx.numpy(), np.eye(10, dtype=np.float32)])[0].round().astype(np.int64) << np.arange(10)).sum(-1)
    want = np.stack([sorted(set(range(n)) - set(row.tolist())) for row in idx])
    assert np.array_equal(got, want)


def test_runner_compiles_each_batch_size_static(ov, dsm_onnx, tmp_path):
    """A dynamic-batch IR runs reshaped to each call's batch (the first two batch sizes, each compiled
    on first use; any other batch on the IR as written): the same logits for an image whatever batch
    it came in, in f32."""
    from dsm_export.engines.openvino import OpenVINORunner

    out = str(tmp_path / "f32.xml")
    assert main(["build", dsm_onnx, "--backend", "openvino", "--precision", "fp32", "--output", out]) == 0
    runner = OpenVINORunner(out, threads=2, streams=1)
    x = np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)
    together = runner(x)
    alone = np.concatenate([runner(x[i:i + 1]) for i in range(4)])
    three = runner(x[:3])
    np.testing.assert_allclose(alone, together, atol=1e-4)
    np.testing.assert_allclose(three, together[:3], atol=1e-4)
    compiled = runner.compiler._compiled
    assert list(compiled) == [(4, 1), (1, 1), (None, 1)]  # batch 3: a third size, run dynamic
    assert runner.request(3) is compiled[(None, 1)][1][0] and runner.request(4) is compiled[(4, 1)][1][0]
    # streams: a batch split in near-equal parts run in parallel, each part its own static compile
    split = OpenVINORunner(out, threads=2, streams=2)
    np.testing.assert_allclose(split(x), together, atol=1e-4)  # 2 + 2
    np.testing.assert_allclose(split(x[:3]), together[:3], atol=1e-4)  # 2 + 1
    np.testing.assert_allclose(split(x[:1]), together[:1], atol=1e-4)  # one image: one stream
    assert list(split.compiler._compiled) == [(2, 2), (1, 2), (1, 1)]
    assert [len(r) for _, r in split.compiler._compiled.values()] == [2, 2, 1]
    assert split.compiler.compiled(2, 2).get_property("NUM_STREAMS") == 2
    runner.close()
    split.close()
    assert not compiled


def test_int8_validates_by_the_int8_criterion(ov, int8_ir, images_dir, tmp_path):
    code, report = _validate(int8_ir, images_dir, tmp_path)
    assert report["precision"] == "int8" and report["criterion"].startswith("int8:")
    assert code == 0 and report["passed"], report
    assert report["kl_to_pytorch"] <= 0.05 and report["top1_match_pytorch"] >= 0.9


def test_smoothquant_is_chosen_by_kl_on_held_apart_calibration_images(ov, dsm_onnx, images_dir, tmp_path):
    from dsm_export.engines.openvino import OpenVINOOptions, build_openvino
    from dsm_export.engines.int8.quantize import calibration_pixels

    pixels, files = calibration_pixels("deit_tiny_patch16_224", images_dir, 16)
    lines = []
    rec = build_openvino(dsm_onnx, str(tmp_path / "auto.xml"), OpenVINOOptions("int8", candidates=(0.0, 0.95)),
                         pixels, files, log=lines.append)
    assert [a for a, _ in rec["smooth_trials"]] == [0.0, 0.95]
    assert rec["smooth_alpha"] == min(rec["smooth_trials"], key=lambda t: t[1])[0]
    assert all("on 4 calibration images, calibrated on the other 12" in line for line in lines) and len(lines) == 2
    assert os.path.isfile(tmp_path / "auto.xml") and os.path.isfile(tmp_path / "auto.bin")


def test_bench_times_the_ir_against_both_unmerged_baselines(ov, int8_ir, capsys):
    code = main(["bench", int8_ir, "--batch", "4", "--repeats", "5", "--iters", "1", "--warmup", "1",
                 "--latency-runs", "0", "--threads", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "unmerged, OpenVINO's default compile" in out and "(unmerged, ONNX Runtime fp32)" in out
    rates = {}
    for line in out.splitlines():
        if "images/s" in line:
            label, value = line.split(":", 1)
            rates[label.strip()] = float(value.split()[0])
    assert set(rates) == {"ort fp32", "openvino", "merged"} and all(v > 0 for v in rates.values())
    assert "x against OpenVINO's baseline" in out and "x against ONNX Runtime fp32" in out
    assert "| OpenVINO streams 2" in out  # a batch of 4 over 2 threads: two streams of 2 images
    _one_line_exit_2(["bench", int8_ir, "--streams", "0"], capsys, "--streams is a count of at least 1")


def _one_line_exit_2(args, capsys, needle):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err


def test_mistakes_exit_2_with_one_line_and_no_file(ov, dsm_onnx, images_dir, tmp_path, capsys):
    out = str(tmp_path / "x.xml")
    base = ["build", dsm_onnx, "--backend", "openvino", "--output", out]
    _one_line_exit_2([*base, "--precision", "int8"], capsys, "needs calibration images: --calibration DIR")
    _one_line_exit_2([*base, "--precision", "fp16"], capsys, "runs fp32, bf16 or int8")
    _one_line_exit_2(["build", dsm_onnx, "--backend", "openvino", "--output", str(tmp_path / "x.onnx")], capsys,
                     "an OpenVINO IR is an .xml file")
    _one_line_exit_2([*base, "--precision", "int8", "--calibration", images_dir, "--quantization", "dynamic"],
                     capsys, "OpenVINO INT8 is NNCF's static quantization")
    _one_line_exit_2([*base, "--precision", "int8", "--calibration", images_dir, "--smooth-alpha", "1.5"],
                     capsys, "--smooth-alpha must be in [0, 1]")
    _one_line_exit_2(["build", dsm_onnx, "--backend", "onnxruntime", "--precision", "bf16", "--output",
                      str(tmp_path / "y.onnx")], capsys, "--precision bf16 is for --backend openvino")
    # an already-quantized file (ONNX Runtime dynamic INT8) is refused before OpenVINO runs
    quantized = str(tmp_path / "dyn.onnx")
    assert main(["build", dsm_onnx, "--backend", "onnxruntime", "--precision", "int8", "--quantization", "dynamic",
                 "--output", quantized]) == 0
    capsys.readouterr()
    _one_line_exit_2(["build", quantized, "--backend", "openvino", "--precision", "int8", "--calibration",
                      images_dir, "--output", out], capsys, "is already int8")
    assert not [f for f in os.listdir(tmp_path) if f.startswith("x.") or f.endswith(".tmp.xml")]


def test_validate_and_bench_refuse_a_foreign_ir(ov, tmp_path, images_dir, capsys):
    """An IR that dsm-export did not build: one line, exit 2, before any image is read."""
    import openvino as ov_mod

    param = ov_mod.opset13.parameter([1, 3, 224, 224], np.float32, name="pixels")
    model = ov_mod.Model([ov_mod.opset13.relu(param)], [param], "foreign")
    xml = str(tmp_path / "foreign.xml")
    ov_mod.save_model(model, xml)
    _one_line_exit_2(["validate", xml, "--images", images_dir], capsys, "has no dsm-export metadata")
    _one_line_exit_2(["bench", xml, "--batch", "1"], capsys, "has no dsm-export metadata")


# ------------------------------------------------------------------ Triton: model repository and serving
def test_triton_repo_writes_an_openvino_backend_model(ov, int8_ir, dsm_onnx, tmp_path, capsys):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb2

    from dsm_export.engines.openvino import read_ir_metadata

    fp32 = str(tmp_path / "dsm_fp32.xml")
    assert main(["build", dsm_onnx, "--backend", "openvino", "--output", fp32]) == 0
    repo = tmp_path / "repo"
    capsys.readouterr()
    assert main(["triton-repo", int8_ir, fp32, "--output", str(repo), "--max-batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "note: dsm_fp32: Triton's OpenVINO backend cannot ask for f32" in out
    _, meta = read_ir_metadata(int8_ir)
    for name, src, bf16 in (("dsm_int8", int8_ir, meta["inference_precision"] == "bf16"), ("dsm_fp32", fp32, False)):
        cfg = text_format.Parse((repo / name / "config.pbtxt").read_text(), pb2.ModelConfig())
        assert cfg.backend == "openvino" and not cfg.platform
        assert cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
        assert ("HINT_BF16" in cfg.parameters) == bf16
        if bf16:
            assert cfg.parameters["HINT_BF16"].string_value == "YES"
        # the dynamic-batch export: the batch axis is left out of dims, the dynamic batcher is on
        assert cfg.max_batch_size == 16 and list(cfg.input[0].dims) == [3, 224, 224]
        assert list(cfg.output[0].dims) == [1000] and cfg.output[0].name == "logits"
        for ext in ("xml", "bin"):
            with open(src[:-4] + f".{ext}", "rb") as a, open(repo / name / "1" / f"model.{ext}", "rb") as b:
                assert a.read() == b.read()
    _one_line_exit_2(["triton-repo", int8_ir, "--output", str(tmp_path / "r2"), "--instance-kind", "gpu"], capsys,
                     "run on CPU instances only")
    assert not (tmp_path / "r2").exists() or not os.listdir(tmp_path / "r2")


def test_serve_answers_requests_from_an_openvino_ir(ov, int8_ir, images_dir, tmp_path):
    """Real requests to a PyTriton server running the IR in OpenVINO: the logits equal local
    OpenVINO's, and the image model answers with the same top-k."""
    import tritonclient.http as httpclient
    from servers import start_ready

    from dsm_export.data import eval_transform, list_images, load_batch
    from dsm_export.engines.openvino import OpenVINORunner
    from dsm_export.core.models import create_model

    images = list_images(images_dir, limit=3)
    x = load_batch(images, range(3), eval_transform(create_model("deit_tiny_patch16_224", None, warn_random=False))).numpy()
    local = OpenVINORunner(int8_ir)(x)
    srv = start_ready([int8_ir], ["dsm"], str(tmp_path / "serve.log"), ["--threads", "1"])
    try:
        client = httpclient.InferenceServerClient(srv.url)
        try:
            inp = httpclient.InferInput("pixel_values", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            served = client.infer("dsm", [inp]).as_numpy("logits")
            np.testing.assert_allclose(served, local, rtol=0, atol=1e-4)
            with open(images.path(0), "rb") as fh:
                data = fh.read()
            img = httpclient.InferInput("image", [1], "BYTES")
            img.set_data_from_numpy(np.array([data], dtype=object))
            idx = client.infer("dsm_image", [img]).as_numpy("top_k_indices")
            assert int(idx[0]) == int(local[0].argmax())
        finally:
            client.close()
    finally:
        srv.close()


def test_tune_searches_openvino_engines_and_exports_an_ir(ov, weights, images_dir, tmp_path, capsys):
    """``tune --backend openvino``: bf16 (f32 on a CPU without BF16) and int8 IR of the rungs, timed in OpenVINO against its
    default compile of timm's unmerged model, ONNX Runtime's fp32 unmerged model timed in the same
    runs; the chosen IR is written (.xml and .bin) and scored on held-apart photos in OpenVINO."""
    import json

    from dsm_export.engines.openvino import OpenVINORunner, read_ir_metadata

    out, report = str(tmp_path / "tuned.xml"), str(tmp_path / "report.json")
    code = main(["tune", "deit_tiny_patch16_224", "--weights", weights, "--images", images_dir, "--backend", "openvino",
                 "--target-speedup", "1.1", "--calibration-count", "8", "--holdout", "8", "--rungs", "2",
                 "--max-grid", "2", "--refine-steps", "0", "--no-progress", "--export", out, "--report", report])
    captured = capsys.readouterr()
    with open(report) as fh:
        data = json.load(fh)
    first = "bf16" if data["machine"]["cpu_bf16"] else "fp32"  # auto: bf16, or f32 on a CPU without BF16
    assert "SmoothQuant alpha" in captured.out  # chosen once by KL, then reused
    assert data["machine"]["runtime"] == "openvino" and {r["precision"] for r in data["evaluated"]} == {first, "int8"}
    assert all(r["speedup"] > 0 and r["speedup_onnxruntime"] > 0 for r in data["evaluated"])
    if code == 1:
        # Every rung is aimed at 1.1x; without BF16 the unmerged f32 export runs about 1.07x, and with
        # BF16 a busy CI machine has measured the fastest engine at 1.08x: timing noise decides
        # whether one reaches it. The miss is reported, nothing is written.
        assert "no engine reached a 1.10x measured speed-up" in captured.err and data["schedule"] is None
        assert not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
        rungs = data["machine"]["rungs"]  # a second rung, if any, is aimed further
        assert 1 <= len(rungs) <= 2 and rungs == sorted(rungs)
        return
    assert code == 0, captured.err
    assert "measured OpenVINO speed-up: " in captured.out and "over OpenVINO's default compile" in captured.out
    assert "over ONNX Runtime's fp32 unmerged model, timed in the same runs" in captured.out
    assert data["precision"] in (first, "int8")
    # a second rung only where the first, aimed at the target, missed it once confirmed (on a CPU
    # without BF16 the unmerged f32 export runs about 1.07x, so the aim lands near 1.1x); none where
    # an unmerged engine reaches the target already (int8 with VNNI: about 1.5x), merging would only
    # raise the KL
    rungs = data["machine"]["rungs"]
    assert data["calibration"]["speedup"] >= 1.1 and len(rungs) in (0, 1, 2)
    if not rungs:
        assert data["calibration"]["flops_ratio"] == pytest.approx(
            min(r["flops_ratio"] for r in data["evaluated"])) and "phase_seconds" in data["machine"]
    if len(rungs) == 2:  # aimed again from the pooled timings, or stepped past: more merging
        assert rungs[1] > rungs[0]
    assert os.path.exists(out[:-4] + ".bin") and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    info, meta = read_ir_metadata(out)
    assert meta["precision"] == data["precision"] and info.schedule.spec() == data["schedule"]
    held = data["held_apart"]
    assert 0 <= held["divergence"] and 0 <= held["agreement"] <= 1
    x = np.zeros((2, 3, 224, 224), dtype=np.float32)
    assert OpenVINORunner(out)(x).shape == (2, 1000)
