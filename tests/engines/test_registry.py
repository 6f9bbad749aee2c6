"""The engine registry: one place that knows the backends, and no backend branch anywhere else."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from conftest import ROOT
from dsm_export.cli import main
from dsm_export.engines import registry
from dsm_export.engines.registry import BuildRequest, Runner, RunnerOptions, pad_batches
from dsm_export.errors import DSMError

# A suffix or backend name compared outside dsm_export/engines/ (the figure of shared/tools/shape_check.py).
BRANCH = re.compile(r"(==|!=|\bin\b|endswith|startswith).*[\"'](\.xml|\.plan|\.engine|\.pte|\.tflite|\.onnx|openvino"
                    r"|tensorrt|executorch|onnxruntime)[\"']")


def test_no_backend_branch_outside_the_engines_package():
    found = []
    package = os.path.join(ROOT, "dsm_export")
    for folder, _, files in os.walk(package):
        rel = os.path.relpath(folder, package).replace(os.sep, "/")
        if rel == "engines" or rel.startswith("engines/"):
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    text = line.strip()
                    if not text.startswith("#") and "help=" not in text and BRANCH.search(text):
                        found.append(f"{rel}/{name}:{i}: {text}")
    assert not found, "dispatch through dsm_export.engines.registry instead:\n" + "\n".join(found)


def test_every_backend_declares_what_commands_need():
    backends = registry.backends()
    assert [b.name for b in backends][:3] == ["onnxruntime", "openvino", "tensorrt"]
    suffixes = [s for b in backends for s in b.suffixes]
    assert len(suffixes) == len(set(suffixes)), "two backends claim one suffix"
    for b in backends:
        assert b.suffixes and all(s.startswith(".") and s == s.lower() for s in b.suffixes)
        assert b.precisions and set(b.precisions) <= set(registry.PRECISIONS)
        assert callable(b.build) and callable(b.read) and callable(b.open)
        assert registry.backend_for("model" + b.suffixes[0].upper()) is b  # suffixes in any case
    assert registry.find_backend("deit_tiny_patch16_224") is None


def test_unknown_files_and_backends_are_one_line_errors(tmp_path):
    with pytest.raises(DSMError, match=r"not an engine dsm-export knows \(suffixes .onnx"):
        registry.backend_for("model.tflite")
    with pytest.raises(DSMError, match="choose one of onnxruntime, openvino, tensorrt"):
        registry.get_backend("coreml")
    with pytest.raises(DSMError, match="does not exist"):
        registry.read_engine(str(tmp_path / "missing.onnx"))


def test_a_request_is_refused_before_any_work(tmp_path):
    out = str(tmp_path / "x.xml")
    with pytest.raises(DSMError, match=r"--backend openvino runs fp32, bf16 or int8 \(--precision fp16 is for "
                                       r"--backend onnxruntime or tensorrt"):
        registry.check_request(registry.get_backend("openvino"), BuildRequest("m.onnx", out, "fp16"))
    with pytest.raises(DSMError, match="an ONNX Runtime engine is an .onnx file"):
        registry.check_request(registry.get_backend("onnxruntime"), BuildRequest("m.onnx", out))
    with pytest.raises(DSMError, match="--compute-capability apply to --backend tensorrt only"):
        registry.check_request(registry.get_backend("onnxruntime"),
                               BuildRequest("m.onnx", str(tmp_path / "y.onnx"), options={"compute_capability": "8.6"}))
    request = BuildRequest("m.onnx", str(tmp_path / "y.onnx"), options={"smooth_alpha": None})
    assert request.options == {}  # an option not given is no option
    assert not os.listdir(tmp_path)


def test_pad_batches_runs_static_chunks_and_keeps_the_order():
    calls = []

    def run(x):
        calls.append(len(x))
        return x.reshape(len(x), -1).sum(1, keepdims=True)

    x = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    out = pad_batches(x, 4, run)
    assert calls == [4, 4] and out.shape == (7, 1)
    np.testing.assert_array_equal(out[:, 0], x.sum(1))
    calls.clear()
    assert pad_batches(x, None, run).shape == (7, 1) and calls == [7]


def test_a_missing_extra_is_one_line_naming_it():
    with pytest.raises(DSMError, match=r"no_such_runtime is not installed: pip install 'dsm-export\[edge\]'"):
        registry.import_optional("no_such_runtime", "edge")


def test_the_onnx_runner_is_a_registry_runner(dsm_onnx):
    runner = registry.open_runner(dsm_onnx, RunnerOptions(threads=1))
    try:
        assert isinstance(runner, Runner)
        engine = runner.engine_file
        assert engine.backend == "onnxruntime" and engine.precision == "fp32" and runner.judged_as == "fp32"
        assert engine.files[0] == dsm_onnx and engine.input_name == "pixel_values" and engine.static_batch is None
        x = np.random.default_rng(0).standard_normal([3, *engine.info.input_size], dtype=np.float32)
        y = runner(x)
        assert y.shape == (3, *engine.output_dims) and np.isfinite(y).all()
    finally:
        runner.close()


def test_build_validate_and_inspect_take_any_engine_through_the_registry(dsm_onnx, tmp_path, capsys):
    out = str(tmp_path / "opt.onnx")
    assert main(["build", dsm_onnx, "--backend", "onnxruntime", "--output", out]) == 0
    assert "ONNX Runtime optimized graph, fp32" in capsys.readouterr().out
    assert main(["inspect", out]) == 0
    assert "GFLOPs" in capsys.readouterr().out
    code = main(["build", dsm_onnx, "--backend", "onnxruntime", "--output", str(tmp_path / "z.onnx"),
                 "--smooth-alpha", "0.5"])
    assert code == 2 and "apply to --precision int8 only" in capsys.readouterr().err
