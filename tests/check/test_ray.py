"""``validate --ray`` and ``predict --ray`` on a local Ray instance (2 CPUs, 2 engine actors): the same
report and the same rows as the local run, for an ONNX Runtime file and an OpenVINO IR."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from dsm_export.cli import main

LIMIT = "48"  # images: 3 batches of 16 over 2 actors


def _validate(engine, images_dir, path, *extra):
    assert main(["validate", engine, "--images", images_dir, "--limit", LIMIT, "--batch-size", "16",
                 "--no-progress", "--json", str(path), *extra]) == 0
    with open(path) as fh:
        return json.load(fh)


@pytest.fixture(scope="module")
def fp32_ir(dsm_onnx, tmp_path_factory):
    pytest.importorskip("openvino")
    out = str(tmp_path_factory.mktemp("ov") / "dsm.xml")
    assert main(["build", dsm_onnx, "--backend", "openvino", "--precision", "fp32", "--output", out]) == 0
    return out


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_validate_on_ray_reports_the_local_figures(ray_local, dsm_onnx, fp32_ir, images_dir, tmp_path, capsys,
                                                  engine):
    path = dsm_onnx if engine == "onnx" else fp32_ir
    local = _validate(path, images_dir, tmp_path / "local.json")
    on_ray = _validate(path, images_dir, tmp_path / "ray.json", "--ray")
    assert "ran on:                   Ray local: 1 node, 2 CPUs, 0 GPUs, 2 engine actors" in capsys.readouterr().out
    assert on_ray.pop("ray") == "Ray local: 1 node, 2 CPUs, 0 GPUs" and on_ray.pop("ray_actors") == 2
    assert set(on_ray) == set(local)
    for key, value in local.items():
        if isinstance(value, float):  # the actors run 1 thread each: sums may round differently
            assert on_ray[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
        else:
            assert on_ray[key] == value, key


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_predict_on_ray_writes_the_local_rows(ray_local, dsm_onnx, fp32_ir, images_dir, tmp_path, engine):
    path = dsm_onnx if engine == "onnx" else fp32_ir
    folder = tmp_path / "photos"
    folder.mkdir()
    for f in sorted(f for f in os.listdir(images_dir) if f.endswith(".JPEG"))[:int(LIMIT)]:
        (folder / f).symlink_to(os.path.join(images_dir, f))
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    tables = {}
    for run, extra in (("local", []), ("ray", ["--ray", "--ray-actors", "2"])):
        out = str(tmp_path / f"{run}.parquet")
        assert main(["predict", path, "--images", str(folder), "--output", out, "--logits", "--batch-size", "16",
                     "--no-progress", *extra]) == 0
        tables[run] = pq.read_table(out).sort_by("path")
        with open(os.path.join(out, "_unreadable.tsv")) as fh:
            assert [line.split("\t")[0] for line in fh] == ["broken.png"]
    local, on_ray = tables["local"], tables["ray"]
    assert on_ray.num_rows == int(LIMIT) and on_ray.column("path").to_pylist() == local.column("path").to_pylist()
    assert on_ray.column("top_k_classes").to_pylist() == local.column("top_k_classes").to_pylist()
    a, b = (np.stack(t.column("logits").to_numpy(zero_copy_only=False)) for t in (local, on_ray))
    assert np.abs(a - b).max() <= 1e-4


def test_the_python_api_runs_on_ray(ray_local, dsm_onnx, images_dir, tmp_path):
    import dsm_export

    report = dsm_export.validate(dsm_onnx, images_dir, limit=16, batch_size=8, progress=False,
                                 ray=dsm_export.RayOptions(actors=2))
    assert report["passed"] and report["images"] == 16 and report["ray_actors"] == 2
    assert report["engine"] == "onnxruntime"
    summary = dsm_export.predict(dsm_onnx, images_dir, str(tmp_path / "p.parquet"), limit=16, top_k=2,
                                 progress=False, ray=dsm_export.RayOptions())
    assert summary.written == 16 and summary.ray.startswith("Ray local")
    assert pq.read_table(str(tmp_path / "p.parquet")).column("top_k_classes").type.list_size == 2
