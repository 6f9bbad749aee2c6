"""The Python API: the README's example runs as written (paths pointed at the shared data and a
temporary folder), and the API refuses a user mistake with a DSMError before any work."""

import os
import re

import pytest

import dsm_export
from dsm_export import DSMError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_example() -> str:
    """The ``python`` block under the README's "Python API" heading."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_is_short_and_uses_the_api():
    code = readme_example()
    assert len(code.strip().splitlines()) <= 20
    for call in ("export", "validate", "build", "tune"):
        assert f"dsm_export.{call}(" in code


def test_readme_python_example_runs(weights, images_dir, tmp_path, capsys):
    code = readme_example()
    code = code.replace("../shared/models/deit_tiny_patch16_224.pth", weights)
    code = code.replace("../shared/data/imagenet-sample", images_dir).replace('"out/', f'"{tmp_path}/')
    exec(compile(code, "README.md (Python API)", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    passed, max_abs, kl, agreement = lines[0].split()
    assert passed == "True" and float(max_abs) <= 1e-4 and 0 <= float(kl) < 0.1 and 0.8 <= float(agreement) <= 1
    assert int(lines[1].split()[0]) > 0  # matching and size nodes kept in fp32
    spec, divergence, agree = lines[-1].rsplit(maxsplit=2)  # a per-block spec holds spaces
    assert dsm_export.Schedule.parse(spec) and 0 <= float(divergence) < 0.2 and 0.5 <= float(agree) <= 1
    assert {"api_dsm.onnx", "api_dsm_int8.onnx"} <= set(os.listdir(tmp_path))


@pytest.mark.parametrize("settings, message", [
    ({"target_flops_ratio": 1.7, "target_speedup": 1.5}, "exactly one of"),
    ({"target_speedup": 1.5, "backend": "tensorrt"}, "--backend tensorrt"),
    ({"target_speedup": 1.5, "backend": "openvino", "precision": "int8-dynamic"}, "not an OpenVINO precision"),
    ({"target_flops_ratio": 0.9}, "above 1"),
    ({"target_flops_ratio": 1.7, "weights": None}, "give --weights FILE or --pretrained"),
])
def test_tune_refuses_a_mistake_before_any_work(settings, message, tmp_path):
    kwargs = {"model": "deit_tiny_patch16_224", "images": str(tmp_path / "missing"), "weights": "w.pth", **settings}
    with pytest.raises(DSMError, match=message):
        dsm_export.tune(**kwargs)


def test_build_refuses_an_unknown_backend_and_precision(tmp_path):
    with pytest.raises(DSMError, match="backend 'coreml'"):
        dsm_export.build("x.onnx", str(tmp_path / "y.onnx"), backend="coreml")
    with pytest.raises(DSMError, match="precision 'bf16'"):
        dsm_export.build("x.onnx", str(tmp_path / "y.onnx"), precision="bf16")


def test_the_api_names_are_documented():
    for name in ("export", "validate", "quantize", "build", "tune"):
        doc = getattr(dsm_export, name).__doc__
        assert doc and "Raises:" in doc, name
