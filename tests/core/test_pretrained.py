"""timm pretrained names, offline, from a Hugging Face cache built from the shared DeiT-Tiny weights.

The cache has the layout huggingface_hub writes (``hub/models--timm--<repo>/blobs/<sha256>``,
``snapshots/<revision>/model.safetensors`` linking to the blob, ``refs/main`` naming the revision),
so timm's own loader finds it with ``HF_HUB_OFFLINE=1``. The CLI runs in a subprocess because
huggingface_hub reads ``HF_HOME`` and ``HF_HUB_OFFLINE`` when it is imported.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from dsm_export.cli import main
from dsm_export.graph.export import read_metadata

from conftest import DEIT, ROOT

REPO = "timm/deit_tiny_patch16_224.fb_in1k"
REVISION = hashlib.sha1(b"dsm-export test cache").hexdigest()
TIMM_CONFIG = {
    "architecture": DEIT, "num_classes": 1000, "num_features": 192, "global_pool": "token",
    "pretrained_cfg": {"tag": "fb_in1k", "custom_load": False, "input_size": [3, 224, 224],
                       "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 0.9,
                       "crop_mode": "center", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                       "num_classes": 1000, "pool_size": None, "first_conv": "patch_embed.proj",
                       "classifier": "head"},
}


def _put(repo_dir, filename, data: bytes):
    blob = hashlib.sha256(data).hexdigest()
    os.makedirs(os.path.join(repo_dir, "blobs"), exist_ok=True)
    with open(os.path.join(repo_dir, "blobs", blob), "wb") as fh:
        fh.write(data)
    snap = os.path.join(repo_dir, "snapshots", REVISION)
    os.makedirs(snap, exist_ok=True)
    os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snap, filename))
    return blob


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, weights):
    """A Hugging Face cache holding timm's DeiT-Tiny repo, made from the shared weights."""
    import torch
    from huggingface_hub.constants import REPO_ID_SEPARATOR
    from safetensors.torch import save

    home = tmp_path_factory.mktemp("hf_home")
    repo_dir = os.path.join(home, "hub", "models" + REPO_ID_SEPARATOR + REPO.replace("/", REPO_ID_SEPARATOR))
    state = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    blob = _put(repo_dir, "model.safetensors", save({k: v.contiguous() for k, v in state.items()}))
    _put(repo_dir, "config.json", json.dumps(TIMM_CONFIG).encode())
    os.makedirs(os.path.join(repo_dir, "refs"))
    with open(os.path.join(repo_dir, "refs", "main"), "w") as fh:
        fh.write(REVISION)
    return str(home), blob


def cli(hf_home, *args):
    env = dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "dsm_export", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_pretrained_export_validates_offline_like_weights(hf_home, weights, images_dir, tmp_path):
    home, blob = hf_home
    a = str(tmp_path / "a.onnx")
    done = cli(home, "export", "deit_tiny_patch16_224.fb_in1k", "--pretrained", "--schedule", "r=13", "-o", a)
    assert done.returncode == 0, done.stderr
    info = read_metadata(onnx.load(a))
    assert info.model == "deit_tiny_patch16_224.fb_in1k" and info.pretrained
    assert info.weights == "" and info.weights_sha256 == blob  # the cached file's sha256
    report_a = str(tmp_path / "a.json")
    done = cli(home, "validate", a, "--images", images_dir, "--limit", "100", "--no-progress",
               "--json", report_a)
    assert done.returncode == 0, done.stdout + done.stderr
    # The same model from the local file: same accuracy.
    b = str(tmp_path / "b.onnx")
    assert main(["export", DEIT, "--weights", weights, "--schedule", "r=13", "-o", b]) == 0
    report_b = str(tmp_path / "b.json")
    assert main(["validate", b, "--images", images_dir, "--limit", "100", "--no-progress",
                 "--json", report_b]) == 0
    ra, rb = json.loads(Path(report_a).read_text()), json.loads(Path(report_b).read_text())
    assert ra["images"] == rb["images"] == 100
    assert ra["top1_accuracy"] == rb["top1_accuracy"] and ra["top1_agreement"] == rb["top1_agreement"]
    assert abs(ra["kl"] - rb["kl"]) < 1e-6
    # Crossing sources: the same weights in another file validate, with a warning about the file.
    done = cli(home, "validate", b, "--pretrained", "--images", images_dir, "--limit", "8", "--no-progress")
    assert done.returncode == 0 and "another file" in done.stderr, done.stdout + done.stderr
    assert main(["validate", a, "--weights", weights, "--images", images_dir, "--limit", "8",
                 "--no-progress"]) == 0


def test_pretrained_analyze_and_visualize(hf_home, images_dir, tmp_path):
    home, _ = hf_home
    image = os.path.join(images_dir, sorted(f for f in os.listdir(images_dir) if f.endswith(".JPEG"))[0])
    png = str(tmp_path / "groups.png")
    done = cli(home, "visualize", "deit_tiny_patch16_224.fb_in1k", "--pretrained", "--image", image,
               "--schedule", "r=13", "--blocks", "3,11", "-o", png)
    assert done.returncode == 0 and os.path.getsize(png) > 0, done.stderr
    done = cli(home, "analyze", "deit_tiny_patch16_224.fb_in1k", "--pretrained", "--images", images_dir,
               "--limit", "4", "-o", str(tmp_path / "an"))
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "an" / "analysis.json") as fh:
        assert json.load(fh)["merge_cost_metric"] == "KL"


def test_uncached_name_fails_in_one_line(hf_home, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    done = cli(hf_home[0], "export", "vit_small_patch16_224.augreg_in21k_ft_in1k", "--pretrained",
               "-o", str(out / "v.onnx"))
    err = done.stderr.strip()
    assert done.returncode == 2
    assert len(err.splitlines()) == 1 and err.startswith("dsm-export: error:"), err
    assert "vit_small_patch16_224.augreg_in21k_ft_in1k" in err and "Hugging Face cache" in err
    assert os.listdir(out) == []


def test_pretrained_embeddings_and_hf_hub_name(hf_home, images_dir, tmp_path):
    home, blob = hf_home
    e = str(tmp_path / "e.onnx")
    done = cli(home, "export", f"hf-hub:{REPO}", "--pretrained", "--num-classes", "0",
               "--schedule", "r=13", "-o", e)
    assert done.returncode == 0, done.stderr
    model = onnx.load(e)
    assert [o.name for o in model.graph.output] == ["embeddings"]
    dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 192]
    info = read_metadata(model)
    assert info.model == f"hf-hub:{REPO}" and info.num_classes == 0 and info.weights_sha256 == blob
    report = str(tmp_path / "e.json")
    done = cli(home, "validate", e, "--images", images_dir, "--limit", "24", "--no-progress", "--json", report)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(report) as fh:
        r = json.load(fh)
    assert r["output"] == "embeddings" and r["passed"]
    cos = r["cosine"]
    assert cos["pytorch"]["min"] >= 1 - 1e-5 and cos["knn_overlap_pytorch"] >= 0.98
    assert 0.5 < cos["unmerged"]["mean"] < 1 and 0 < cos["knn_overlap_unmerged"] <= 1


def test_weights_recorded_relative_to_the_file(weights, images_dir, tmp_path, capsys):
    here = tmp_path / "here"
    here.mkdir()
    path = str(here / "m.onnx")
    assert main(["export", DEIT, "--weights", weights, "--schedule", "r=8", "-o", path]) == 0
    info = read_metadata(onnx.load(path))
    assert not os.path.isabs(info.weights)
    assert os.path.samefile(os.path.join(here, info.weights), weights)
    # Copied elsewhere, where the relative path leads nowhere: one clear line, then --weights works.
    other = tmp_path / "elsewhere" / "deeper"
    other.mkdir(parents=True)
    moved = str(other / "m.onnx")
    with open(path, "rb") as src, open(moved, "wb") as dst:
        dst.write(src.read())
    capsys.readouterr()
    assert main(["validate", moved, "--images", images_dir, "--limit", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--weights or --pretrained" in err
    assert main(["validate", moved, "--images", images_dir, "--limit", "2", "--no-progress",
                 "--weights", weights]) == 0


def test_weights_of_another_model_fail_in_one_line(weights, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for extra in ([], ["--num-classes", "0"]):
        code = main(["export", "deit_small_patch16_224", "--weights", weights, "-o", str(out / "x.onnx"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "do not fit deit_small_patch16_224" in err and "size mismatch" in err
    assert main(["export", DEIT, "--weights", weights, "--pretrained", "-o", str(out / "x.onnx")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["export", "deit_tiny_patch16_224.nope", "--pretrained", "-o", str(out / "x.onnx")]) == 2
    assert "unknown pretrained tag 'nope'" in capsys.readouterr().err
    assert os.listdir(out) == []
