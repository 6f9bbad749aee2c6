"""``dsm-export predict``: an engine over a data set of images, rows to a Parquet folder; resumable after
SIGTERM, unreadable images listed, bounded memory. Real DeiT-Tiny export, real ONNX Runtime, real photos."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch

from dsm_export.cli import main
from dsm_export.data import eval_transform, iter_batches, list_images

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _command(*args):
    return [sys.executable, "-m", "dsm_export", "predict", *args]


def _ort_logits(onnx_path, deit, images):
    """Local ONNX Runtime's logits for ``images`` (an ImageSet), preprocessed with the model's eval transform."""
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    out = []
    with torch.inference_mode():
        for _, pixels in iter_batches(images, eval_transform(deit), 32):
            out.append(session.run(None, {"pixel_values": pixels.numpy()})[0])
    return np.concatenate(out)


def _rows(path):
    table = pq.read_table(path)
    return table.column("path").to_pylist(), table


@pytest.mark.slow
def test_predict_resumes_after_sigterm_and_writes_every_image_once(dsm_onnx, deit, images_dir, tmp_path):
    out = str(tmp_path / "preds.parquet")
    args = _command(dsm_onnx, "--images", images_dir, "--output", out, "--logits", "--batch-size", "16",
                    "--rows-per-file", "32", "--no-progress")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        parts = [f for f in os.listdir(out) if f.startswith("part-")] if os.path.isdir(out) else []
        if len(parts) >= 3:
            break
        time.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10, "SIGTERM took more than 10 s to stop predict"
    assert proc.returncode == 130, err
    assert "Traceback" not in err and not [f for f in os.listdir(out) if f.endswith(".tmp")]
    first, _ = _rows(out)
    assert 3 * 32 <= len(first) < 500 and len(set(first)) == len(first)

    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"{500 - len(first)} rows written" in proc.stdout
    assert f"{len(first)} of 500 images done before" in proc.stdout
    keys, table = _rows(out)
    assert len(keys) == 500 and len(set(keys)) == 500
    images = list_images(images_dir)
    assert sorted(keys) == sorted(images.files)
    order = {k: i for i, k in enumerate(keys)}
    logits = np.stack(table.column("logits").to_numpy(zero_copy_only=False))[[order[f] for f in images.files]]
    expected = _ort_logits(dsm_onnx, deit, images)
    assert np.abs(logits - expected).max() <= 1e-4
    top = np.stack(table.column("top_k_classes").to_numpy(zero_copy_only=False))[[order[f] for f in images.files]]
    assert (top[:, 0] == expected.argmax(1)).all()
    probs = np.stack(table.column("top_k_probs").to_numpy(zero_copy_only=False))
    assert (np.diff(probs, axis=1) <= 0).all() and (probs.sum(1) <= 1 + 1e-5).all()
    with open(os.path.join(out, "_SUCCESS.json")) as fh:
        assert json.load(fh)["written"] == 500 - len(first)


def _folder_with_a_corrupt_image(images_dir, tmp_path, n=10):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    files = sorted(f for f in os.listdir(images_dir) if f.endswith(".JPEG"))[:n]
    for i, f in enumerate(files):
        (folder / ("sub" if i % 2 else "") / f).symlink_to(os.path.join(images_dir, f))
    (folder / "broken.jpg").write_bytes(b"not a JPEG at all")
    return str(folder), files


def test_unreadable_images_are_listed_and_the_rest_written(dsm_onnx, images_dir, tmp_path, capsys):
    folder, files = _folder_with_a_corrupt_image(images_dir, tmp_path)
    out = str(tmp_path / "preds.parquet")
    assert main(["predict", dsm_onnx, "--images", folder, "--output", out, "--top-k", "3", "--no-progress"]) == 0
    keys, table = _rows(out)
    assert len(keys) == len(files) and "broken.jpg" not in keys and any(k.startswith("sub/") for k in keys)
    assert table.schema.field("top_k_classes").type == pa.list_(pa.int32(), 3)
    with open(os.path.join(out, "_unreadable.tsv")) as fh:
        lines = fh.read().splitlines()
    assert len(lines) == 1 and lines[0].startswith("broken.jpg\t")
    # run again: nothing to do, nothing written twice
    assert main(["predict", dsm_onnx, "--images", folder, "--output", out, "--top-k", "3", "--no-progress"]) == 0
    done = len(files) + 1
    assert f"0 rows written to {out} ({done} of {done} images done before" in capsys.readouterr().out
    assert len(_rows(out)[0]) == len(files)
    # a Parquet list of paths, relative to its folder, gives the same rows
    listing = str(tmp_path / "photos" / "list.parquet")
    pq.write_table(pa.table({"path": sorted(keys)}), listing)
    out2 = str(tmp_path / "preds2.parquet")
    assert main(["predict", dsm_onnx, "--images", listing, "--output", out2, "--top-k", "3", "--no-progress"]) == 0
    a, b = (pq.read_table(p).sort_by("path") for p in (out, out2))
    assert a.column("path").to_pylist() == b.column("path").to_pylist()
    assert a.column("top_k_classes").to_pylist() == b.column("top_k_classes").to_pylist()


def _one_line_exit_2(args, capsys, needle):
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err


def test_mistakes_exit_2_with_one_line_and_write_nothing(dsm_onnx, images_dir, tmp_path, capsys):
    out = str(tmp_path / "p.parquet")
    base = ["predict", dsm_onnx, "--no-progress", "--limit", "4"]
    _one_line_exit_2([*base, "--images", str(tmp_path / "missing"), "--output", out], capsys,
                     "give an image folder or a .parquet file")
    _one_line_exit_2([*base, "--images", images_dir, "--output", out, "--top-k", "0"], capsys,
                     "--top-k must be at least 1")
    _one_line_exit_2(["predict", str(tmp_path / "none.onnx"), "--images", images_dir, "--output", out], capsys,
                     "none.onnx")
    _one_line_exit_2([*base, "--images", images_dir, "--output", str(tmp_path / "no" / "p.parquet")], capsys,
                     "does not exist")
    _one_line_exit_2([*base, "--images", images_dir, "--output", out, "--ray-actors", "2"], capsys,
                     "--ray-actors needs --ray")
    assert os.listdir(tmp_path) == []
    a_file = tmp_path / "file.parquet"
    a_file.write_bytes(b"")
    _one_line_exit_2([*base, "--images", images_dir, "--output", str(a_file)], capsys, "is a file")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    _one_line_exit_2([*base, "--images", images_dir, "--output", str(other)], capsys, "did not write")
    assert main([*base, "--images", images_dir, "--output", out]) == 0
    capsys.readouterr()
    _one_line_exit_2([*base, "--images", images_dir, "--output", out, "--top-k", "3"], capsys, "other settings (top_k)")


@pytest.mark.parametrize("command", ["predict", "validate"])
def test_ray_missing_is_one_line_naming_the_extra(dsm_onnx, images_dir, tmp_path, command):
    output = ["--output", str(tmp_path / "p.parquet")] if command == "predict" else ["--json", str(tmp_path / "r.json")]
    code = ("import sys; sys.modules['ray'] = None; from dsm_export.cli import main; "
            f"sys.exit(main([{command!r}, {dsm_onnx!r}, '--images', {images_dir!r}, *{output!r}, '--ray']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "pip install 'dsm-export[ray]'" in proc.stderr and os.listdir(tmp_path) == []


def _peak_rss(args) -> int:
    """The peak RSS (bytes) of the command ``args``, sampled every 20 ms. Sampled, not read from
    ``ru_maxrss``: a child started by exec keeps the high-water RSS of the process it replaced (this
    test's), research/child_rss.py."""
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    child, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, child.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return peak


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_data_set(dsm_onnx, images_dir, tmp_path):
    big = tmp_path / "big"
    files = sorted(f for f in os.listdir(images_dir) if f.endswith(".JPEG"))
    for copy in range(10):
        folder = big / f"copy{copy}"
        folder.mkdir(parents=True)
        for f in files:
            (folder / f).symlink_to(os.path.join(images_dir, f))
    peaks = []
    for source, name in ((images_dir, "one.parquet"), (str(big), "ten.parquet")):
        peaks.append(_peak_rss(_command(dsm_onnx, "--images", source, "--output", str(tmp_path / name),
                                        "--no-progress")))
    assert len(pq.read_table(str(tmp_path / "ten.parquet")).column("path")) == 10 * len(files)
    assert peaks[1] <= 1.2 * peaks[0], (f"peak RSS {peaks[1] / 2**20:.0f} MiB over 10x the images, "
                                        f"{peaks[0] / 2**20:.0f} MiB over 1x")


@pytest.mark.heavy  # a random-init export: predict needs no weights
def test_an_embedding_export_writes_its_embedding(images_dir, tmp_path):
    onnx_path = str(tmp_path / "emb.onnx")
    assert main(["export", "deit_tiny_patch16_224", "--num-classes", "0", "--schedule", "r=8", "-o", onnx_path]) == 0
    out = str(tmp_path / "emb.parquet")
    assert main(["predict", onnx_path, "--images", images_dir, "--output", out, "--limit", "8", "--no-progress"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["path", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 192)
    images = list_images(images_dir, limit=8)
    expected = _ort_logits(onnx_path, timm.create_model("deit_tiny_patch16_224", num_classes=0), images)
    got = np.stack(table.sort_by("path").column("embedding").to_numpy(zero_copy_only=False))
    assert np.abs(got - expected[np.argsort(images.files)]).max() <= 1e-5
