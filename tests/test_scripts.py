"""The benchmark scripts keep working (run small; their figures are not asserted)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gpu_runs_on_cpu():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench_gpu.py"), "--cpu", "--batch", "2",
         "--models", "deit_tiny_patch16_224", "--repeats", "2", "--iters", "1"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| deit_tiny")]
    assert len(rows) == 1 and rows[0].endswith("x |")


def test_bench_ort_runs(tmp_path, weights):
    from dsm_export.export import export_onnx

    merged = str(tmp_path / "m.onnx")
    export_onnx("deit_tiny_patch16_224", merged, "r=13", weights, batch=2)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench_ort.py"), merged, "--batch", "2",
         "--repeats", "5", "--iters", "1", "--warmup", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "intra-op threads" in proc.stdout and "ratio" in proc.stdout
