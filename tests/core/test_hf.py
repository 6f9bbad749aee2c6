"""Hugging Face Transformers vision models (issue 47): each covered class rebuilt as the timm ViT it
computes equals the Hugging Face forward (eager and sdpa attention), merges and exports like a timm
model; the shared DeiT-Tiny weights in the layout of Hugging Face's DeiT-Tiny checkpoint
(``ViTForImageClassification``) validate at 1e-4 and give the timm export's logits; unsupported
classes and uncached hub ids exit 2 with one line."""

import os

import numpy as np
import onnx
import pytest
import torch

from dsm_export.check.validate import onnx_runner
from dsm_export.cli import main
from dsm_export.core.hf import ATTN_IMPLEMENTATIONS, SUPPORTED, is_hf_name
from dsm_export.core.hf_reference import merged_reference
from dsm_export.core.models import create_hf_model, create_model, is_embedding_model
from dsm_export.core.patch import apply
from dsm_export.graph.export import export_onnx, read_metadata

from conftest import DEIT
from trt_checks import build_and_check

if os.environ.get("CI"):  # CI installs the transformers extra: a missing module is a failure there
    import transformers
else:
    transformers = pytest.importorskip("transformers")

DSM = "r=34,r_end=0,delay=3,local=1"
SMALL = dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3)


def _configs():
    """Class name -> (config, schedule): small random-init models of every covered class."""
    tf = transformers
    mlp = dict(SMALL, intermediate_size=384)
    return {
        "ViTForImageClassification": (tf.ViTConfig(**mlp, num_labels=10), "r=16,delay=1,local=1"),
        "ViTModel": (tf.ViTConfig(**mlp), "r=16,delay=1"),
        "DeiTForImageClassification": (tf.DeiTConfig(**mlp, num_labels=10), "r=16,delay=1,protect=4"),
        "DeiTForImageClassificationWithTeacher": (tf.DeiTConfig(**mlp, num_labels=10), "r=16,delay=1"),
        "DeiTModel": (tf.DeiTConfig(**mlp), "r=16,delay=1,merge=mlerp"),
        "Dinov2Model": (tf.Dinov2Config(**SMALL, image_size=224, patch_size=14), "r=20,mode=tome"),
        # registers, LayerScale and position embeddings interpolated by the model's own code to 518 px
        "Dinov2WithRegistersModel": (tf.Dinov2WithRegistersConfig(**SMALL, image_size=224, patch_size=14,
                                                                   num_register_tokens=4, layerscale_value=0.5),
                                     "r=48,delay=1,local=1,windows=2x2"),
        # ViT-B/32's 7x7 grid (narrow): windows of 2x2 are uneven (4 and 3 rows)
        "CLIPVisionModel": (tf.CLIPVisionConfig(**mlp, image_size=224, patch_size=32), "r=4,delay=1"),
        "CLIPVisionModelWithProjection": (tf.CLIPVisionConfig(**mlp, image_size=224, patch_size=32,
                                                              projection_dim=64), "r=3,delay=1,local=1,windows=2x2"),
        # no class token: the attention-pooling head reads merged tokens with their sizes
        "SiglipVisionModel": (tf.SiglipVisionConfig(**mlp, image_size=224, patch_size=16), "r=16,delay=1,local=1"),
    }


def hf_folder(tmp, arch, config, processor=None, seed=0):
    """A random-init ``arch`` saved with ``save_pretrained`` (and ``processor``) into ``tmp/arch``."""
    torch.manual_seed(seed)
    config.architectures = [arch]
    model = getattr(transformers, arch)(config).eval()
    folder = os.path.join(str(tmp), arch)
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    return folder


def test_supported_covers_the_issue_classes():
    assert set(_configs()) == set(SUPPORTED)
    assert is_hf_name("facebook/dinov2-small") and not is_hf_name("deit_tiny_patch16_224")
    assert not is_hf_name("hf-hub:timm/deit_tiny_patch16_224.fb_in1k")


@pytest.mark.parametrize("arch", sorted(SUPPORTED))
def test_rebuild_equals_the_hugging_face_forward(tmp_path, arch):
    """Unmerged: the rebuilt timm ViT gives the HF model's own output (eager and sdpa attention);
    merged: the export form equals the reference at 1e-4."""
    config, schedule = _configs()[arch]
    folder = hf_folder(tmp_path, arch, config)
    model = create_model(folder)
    spec = model.hf_spec
    assert spec.architecture == arch and spec.output == SUPPORTED[arch][1] and spec.pretrained
    assert is_embedding_model(model) == (spec.output != "logits")
    torch.manual_seed(1)
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.inference_mode():
        ours = model(x)
        for impl in ("eager", "sdpa"):
            hf = getattr(transformers, arch).from_pretrained(folder, attn_implementation=impl).eval()
            theirs = getattr(hf(pixel_values=x), spec.output)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-5)
        ref = apply(model, schedule, impl="reference")(x)
        exp = apply(model, schedule, impl="export")(x)
        # the schedule through the HF model's own modules and attention implementation
        for impl in ATTN_IMPLEMENTATIONS:
            own = create_hf_model(folder, attn_implementation=impl)
            assert own.hf_model.config._attn_implementation == impl
            torch.testing.assert_close(merged_reference(own, schedule)(x), exp, rtol=0, atol=1e-4)
            unmerged = merged_reference(own, "none")(x)
            torch.testing.assert_close(unmerged, getattr(own.hf_model(pixel_values=x), spec.output), rtol=0, atol=1e-6)
    torch.testing.assert_close(exp, ref, rtol=0, atol=1e-4)
    assert not torch.allclose(ref, ours, atol=1e-6)  # the schedule did merge


def test_dinov2_position_embeddings_interpolated_to_518(tmp_path):
    """A 224-px DINOv2 config at 518 px: the model's own interpolation, once, at load."""
    config, _ = _configs()["Dinov2WithRegistersModel"]
    processor = transformers.BitImageProcessor(size={"shortest_edge": 518}, crop_size={"height": 518, "width": 518})
    folder = hf_folder(tmp_path, "Dinov2WithRegistersModel", config, processor)
    model = create_model(folder)
    assert tuple(model.patch_embed.img_size) == (518, 518) and model.patch_embed.grid_size == (37, 37)
    assert model.num_prefix_tokens == 5
    hf = transformers.Dinov2WithRegistersModel.from_pretrained(folder).eval()
    x = torch.randn(1, 3, 518, 518)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), hf(pixel_values=x).pooler_output, rtol=0, atol=2e-5)


@pytest.mark.parametrize("folder_of", ["swin", "text", "missing", "uncached"])
def test_unsupported_or_missing_models_exit_2(tmp_path, capsys, monkeypatch, folder_of):
    tf = transformers
    if folder_of == "swin":
        name = hf_folder(tmp_path, "SwinForImageClassification", tf.SwinConfig(embed_dim=24, depths=[1, 1],
                                                                                num_heads=[1, 2], num_labels=3))
        expected = "SwinForImageClassification"
    elif folder_of == "text":
        name = hf_folder(tmp_path, "CLIPTextModel", tf.CLIPTextConfig(**SMALL, intermediate_size=384))
        expected = "CLIPTextModel"
    elif folder_of == "missing":
        name, expected = str(tmp_path / "nowhere" / "model"), "does not exist"
    else:
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        name, expected = "nobody/no-such-vit", "not in the local cache"
    out = tmp_path / "m.onnx"
    assert main(["export", name, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and "Traceback" not in err
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.endswith(".onnx")]


def test_weights_and_num_classes_are_timm_only(tmp_path, capsys):
    config, _ = _configs()["ViTModel"]
    folder = hf_folder(tmp_path, "ViTModel", config)
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    assert main(["export", folder, "--weights", str(weights), "-o", str(tmp_path / "a.onnx")]) == 2
    assert "--weights is for timm models" in capsys.readouterr().err
    assert main(["export", folder, "--num-classes", "0", "-o", str(tmp_path / "a.onnx")]) == 2
    assert "--num-classes is for timm models" in capsys.readouterr().err


@pytest.mark.heavy
@pytest.mark.parametrize("arch", ["Dinov2WithRegistersModel", "CLIPVisionModelWithProjection", "SiglipVisionModel"])
def test_towers_export_with_parity_static_shapes_and_tensorrt(tmp_path, images_dir, arch):
    """Random-init DINOv2 with registers at 518 px, CLIP ViT-B/32's grid with 2x2 (uneven) windows and
    SigLIP: fp32 parity at 1e-4, every shape static, Optimum's names, and a TensorRT fp16 build."""
    config, schedule = _configs()[arch]
    processor = None
    if arch.startswith("Dinov2"):
        processor = transformers.BitImageProcessor(size={"shortest_edge": 518},
                                                   crop_size={"height": 518, "width": 518})
    folder = hf_folder(tmp_path, arch, config, processor)
    path = str(tmp_path / "m.onnx")
    info = export_onnx(folder, path, schedule, batch=2)  # the op check for TensorRT runs inside
    model = onnx.load(path)
    output = SUPPORTED[arch][1]
    assert [i.name for i in model.graph.input] == ["pixel_values"]
    assert [o.name for o in model.graph.output] == [output] and info.output == output
    meta = read_metadata(model)
    assert meta.model == os.path.abspath(folder) and meta.weights_sha256 and meta.tokens[-1] < meta.tokens[0]
    shapes = onnx.shape_inference.infer_shapes(model).graph
    for v in list(shapes.value_info) + list(shapes.output) + list(shapes.input):
        dims = v.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") for d in dims), f"{v.name} has a dynamic axis"
    ref_model = create_model(folder)
    torch.manual_seed(2)
    x = torch.randn(2, 3, *ref_model.patch_embed.img_size)
    with torch.inference_mode():
        ref = apply(ref_model, schedule, impl="reference")(x).numpy()
    np.testing.assert_allclose(onnx_runner(path)(x.numpy()), ref, rtol=0, atol=1e-4)
    build_and_check(path, tmp_path, "fp16")
    # validate: the embeddings report against the HF model's own modules under the schedule
    report = str(tmp_path / "report.json")
    assert main(["validate", path, "--images", images_dir, "--limit", "4", "--json", report, "--no-progress"]) == 0
    with open(report, encoding="utf-8") as fh:
        text = fh.read()
    assert f'"output": "{output}"' in text and "its own modules" in text


# ------------------------------------------------------------------ the shared DeiT-Tiny weights
@pytest.fixture(scope="module")
def hf_deit(weights, tmp_path_factory):
    """The shared DeiT-Tiny weights as a ``ViTForImageClassification`` folder, with the image processor
    of Hugging Face's ``facebook/deit-tiny-patch16-224`` (256x256 bicubic resize, 224 crop, ImageNet
    mean and std)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from dsm_export.core.hf import save_as_hf_vit

    folder = str(tmp_path_factory.mktemp("hf") / "deit-tiny-patch16-224")
    processor = transformers.DeiTImageProcessor(
        size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224}, resample=3,
        image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD))
    save_as_hf_vit(create_model(DEIT, weights), folder, processor)
    return folder


@pytest.mark.parametrize("schedule", ["none", DSM])
def test_hf_deit_export_equals_timm_export(hf_deit, weights, pixels, tmp_path, schedule):
    """On the same pixel tensors the Hugging Face path's export gives the timm export's logits."""
    hf_path, timm_path = str(tmp_path / "hf.onnx"), str(tmp_path / "timm.onnx")
    export_onnx(hf_deit, hf_path, schedule)
    export_onnx(DEIT, timm_path, schedule, weights)
    x = pixels.numpy()
    np.testing.assert_allclose(onnx_runner(hf_path)(x), onnx_runner(timm_path)(x), rtol=0, atol=1e-4)


def test_hf_deit_validates_against_hugging_face_pytorch(hf_deit, images_dir, tmp_path, capsys):
    path = str(tmp_path / "hf.onnx")
    assert main(["export", hf_deit, "--schedule", DSM, "-o", path]) == 0
    assert main(["validate", path, "--images", images_dir, "--limit", "32"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "(atol 1e-04)" in out and os.path.abspath(hf_deit) in out
    assert "Hugging Face ViTForImageClassification, its own modules" in out


@pytest.mark.server
def test_served_clip_image_embeds_equal_local_onnxruntime(tmp_path, images_dir):
    """A merged ``CLIPVisionModelWithProjection`` behind ``serve``: ``image_embeds`` from pixels and from
    JPEG bytes (preprocessed by the checkpoint's CLIPImageProcessor) equal local ONNX Runtime."""
    import tritonclient.http as httpclient

    from dsm_export.core.models import transform_for
    from dsm_export.data import list_images, load_batch
    from servers import start_ready

    config, schedule = _configs()["CLIPVisionModelWithProjection"]
    folder = hf_folder(tmp_path, "CLIPVisionModelWithProjection", config, transformers.CLIPImageProcessor())
    path = str(tmp_path / "clip.onnx")
    export_onnx(folder, path, schedule)
    images = list_images(images_dir, limit=3)
    x = load_batch(images, range(3), transform_for(folder)).numpy()
    local = onnx_runner(path)(x)
    srv = start_ready([path], ["clip"], str(tmp_path / "serve.log"), ["--threads", "1"])
    try:
        client = httpclient.InferenceServerClient(srv.url)
        inp = httpclient.InferInput("pixel_values", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(client.infer("clip", [inp]).as_numpy("image_embeds"), local, rtol=0, atol=1e-4)
        with open(images.path(1), "rb") as fh:
            data = fh.read()
        img = httpclient.InferInput("image", [1], "BYTES")
        img.set_data_from_numpy(np.array([data], dtype=object))
        served = client.infer("clip_image", [img]).as_numpy("image_embeds")
        np.testing.assert_allclose(served.reshape(-1), local[1], rtol=0, atol=1e-4)
        client.close()
    finally:
        srv.close()


def test_optimum_loads_the_merged_file(hf_deit, pixels, tmp_path):
    """Where optimum-onnx is installed, its ``ORTModelForImageClassification`` runs the merged export
    from a folder with the checkpoint's config and gets the same logits. (optimum-onnx 0.1.0 requires
    transformers < 4.58, so beside the transformers extra it is not installed and this skips.)"""
    optimum_ort = pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is not installed")
    import shutil

    folder = tmp_path / "optimum"
    folder.mkdir()
    path = str(folder / "model.onnx")
    export_onnx(hf_deit, path, DSM)
    shutil.copy(os.path.join(hf_deit, "config.json"), folder / "config.json")
    model = optimum_ort.ORTModelForImageClassification.from_pretrained(str(folder))
    ours = onnx_runner(path)(pixels.numpy())
    theirs = model(pixel_values=pixels).logits
    np.testing.assert_allclose(np.asarray(theirs), ours, rtol=0, atol=1e-5)


def hub_cache(cache, repo, folder, revision="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face hub cache (``$HF_HUB_CACHE`` layout: ``models--ORG--NAME/refs/main`` and
    ``snapshots/<revision>/``) holding ``folder``'s files as ``repo``, as a download would leave it."""
    import shutil

    root = os.path.join(str(cache), "models--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(root, "refs"))
    with open(os.path.join(root, "refs", "main"), "w", encoding="utf-8") as fh:
        fh.write(revision)
    shutil.copytree(folder, os.path.join(root, "snapshots", revision))
    return str(cache)


def test_hub_id_from_the_local_cache(hf_deit, images_dir, tmp_path):
    """``facebook/deit-tiny-patch16-224 --pretrained`` offline from a hub cache, as users name it: the
    export records the hub id and the cached weights' sha256; validate finds them again."""
    import subprocess
    import sys

    repo = "facebook/deit-tiny-patch16-224"
    env = dict(os.environ, HF_HUB_CACHE=hub_cache(tmp_path / "hub", repo, hf_deit), HF_HUB_OFFLINE="1")
    path = str(tmp_path / "hub.onnx")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dsm_export", *args], env=env, capture_output=True, text=True,
                              timeout=600)

    proc = cli("export", repo, "--pretrained", "--schedule", DSM, "-o", path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = read_metadata(onnx.load(path))
    assert info.model == repo and info.pretrained and info.weights_sha256
    proc = cli("validate", path, "--images", images_dir, "--limit", "8", "--no-progress")
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    proc = cli("export", "facebook/deit-small-patch16-224", "--pretrained", "-o", str(tmp_path / "no.onnx"))
    assert proc.returncode == 2 and "not in the local cache" in proc.stderr and not (tmp_path / "no.onnx").exists()


@pytest.mark.openvino
def test_every_command_takes_a_hugging_face_model(tmp_path, images_dir, capsys):
    """A merged CLIP vision tower with projection (``image_embeds``) from a folder through inspect,
    bench, analyze, ONNX Runtime and OpenVINO INT8 builds (calibrated through its CLIPImageProcessor),
    an OpenVINO fp32 build and its validation, profile, triton-repo and predict. (Random weights: an
    INT8 engine of them is not held to the INT8 criterion here.)"""
    import pyarrow.parquet as pq

    config, schedule = _configs()["CLIPVisionModelWithProjection"]
    folder = hf_folder(tmp_path, "CLIPVisionModelWithProjection", config, transformers.CLIPImageProcessor())
    onnx_path, ort8, ov8, ov32 = (str(tmp_path / f) for f in ("clip.onnx", "clip_int8.onnx", "clip_int8.xml",
                                                               "clip_fp32.xml"))
    calib = ["--calibration", images_dir, "--calibration-count", "8"]
    steps = [
        ["export", folder, "--schedule", schedule, "-o", onnx_path],
        ["inspect", folder, "--schedule", schedule],
        ["inspect", onnx_path],
        ["bench", onnx_path, "--batch", "4", "--repeats", "5"],
        ["analyze", folder, "--images", images_dir, "--limit", "8", "--r", "2", "--output", str(tmp_path / "an")],
        ["build", onnx_path, "--backend", "onnxruntime", "--precision", "int8", *calib, "-o", ort8],
        ["build", onnx_path, "--backend", "openvino", "--precision", "int8", *calib, "-o", ov8],
        ["build", onnx_path, "--backend", "openvino", "--precision", "fp32", "-o", ov32],
        ["validate", ov32, "--images", images_dir, "--limit", "8", "--no-progress"],
        ["profile", ov8, "--batch", "4"],
        ["triton-repo", onnx_path, "-o", str(tmp_path / "repo")],
        ["predict", ort8, "--images", images_dir, "--limit", "6", "--output", str(tmp_path / "p.parquet")],
    ]
    for args in steps:
        assert main(args) == 0, (args, capsys.readouterr().err[-2000:])
    out = capsys.readouterr().out
    assert "image_embeds" in out and "PASS" in out
    table = pq.read_table(str(tmp_path / "p.parquet"))
    assert table.num_rows == 6 and len(table.column("embedding")[0]) == config.projection_dim


HIDDEN_CLASSES = sorted(a for a, (_, out) in SUPPORTED.items() if out != "logits")


@pytest.mark.parametrize("arch", HIDDEN_CLASSES)
def test_last_hidden_state_equals_the_hugging_face_tokens(tmp_path, arch):
    """``last_hidden_state``: unmerged, every token as the HF model returns it (after CLIP's encoder, before
    its post_layernorm); merged, the export form equals the schedule through the HF modules."""
    config, schedule = _configs()[arch]
    folder = hf_folder(tmp_path, arch, config)
    torch.manual_seed(3)
    for impl in ATTN_IMPLEMENTATIONS:
        model = create_hf_model(folder, attn_implementation=impl, output="last_hidden_state")
        x = torch.randn(2, 3, *model.patch_embed.img_size)
        with torch.inference_mode():
            theirs = model.hf_model(pixel_values=x).last_hidden_state
            torch.testing.assert_close(apply(model, "none", impl="export")(x), theirs, rtol=0, atol=2e-5)
            torch.testing.assert_close(merged_reference(model, "none")(x), theirs, rtol=0, atol=1e-6)
            exp = apply(model, schedule, impl="export")(x)
            torch.testing.assert_close(merged_reference(model, schedule)(x), exp, rtol=0, atol=1e-4)
        merged = apply(model, schedule, impl="export")
        assert exp.shape == (2, merged.tokens[-1].tokens_out, config.hidden_size) and exp.shape[1] < theirs.shape[1]


@pytest.mark.heavy
@pytest.mark.parametrize("arch", ["CLIPVisionModel", "SiglipVisionModel"])
def test_last_hidden_state_export_validates(tmp_path, images_dir, capsys, arch):
    config, schedule = _configs()[arch]
    processor = transformers.CLIPImageProcessor() if arch.startswith("CLIP") else transformers.SiglipImageProcessor()
    folder = hf_folder(tmp_path, arch, config, processor)
    path = str(tmp_path / "hidden.onnx")
    assert main(["export", folder, "--schedule", schedule, "--last-hidden-state", "--batch", "2", "-o", path]) == 0
    graph = onnx.load(path)
    dims = [d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim]
    info = read_metadata(graph)
    assert graph.graph.output[0].name == "last_hidden_state" and info.output == "last_hidden_state"
    assert dims == [2, info.tokens[-1], config.hidden_size] and info.last_block == "full"
    assert main(["validate", path, "--images", images_dir, "--limit", "6", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and ("the class token" if arch.startswith("CLIP") else "the mean token") in out
    # a file of tokens per image is not a predict output; a classifier has no last_hidden_state
    assert main(["predict", path, "--images", images_dir, "--output", str(tmp_path / "p.parquet")]) == 2
    assert not (tmp_path / "p.parquet").exists()
    cls_config, _ = _configs()["ViTForImageClassification"]
    vit = hf_folder(tmp_path, "ViTForImageClassification", cls_config)
    assert main(["export", vit, "--last-hidden-state", "-o", str(tmp_path / "v.onnx")]) == 2
    assert "gives logits, not last_hidden_state" in capsys.readouterr().err
