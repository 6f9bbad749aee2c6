"""ONNX Runtime execution providers: ``--provider`` resolved in one place against what is installed."""

import os
import subprocess
import sys

import onnxruntime as ort
import pytest

from dsm_export.cli import main
from dsm_export.errors import DSMError
from dsm_export.engines.providers import PROVIDER_ALIASES, create_session, resolve_providers

from conftest import DEIT

MISSING = [alias for alias, full in PROVIDER_ALIASES.items() if full not in ort.get_available_providers()]


def test_cpu_by_short_and_full_name():
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers("CPU") == ["CPUExecutionProvider"]
    assert resolve_providers("CPUExecutionProvider") == ["CPUExecutionProvider"]
    assert resolve_providers(None) == ["CPUExecutionProvider"]


def test_installed_gpu_providers_chain_to_cpu():
    for alias in ("cuda", "tensorrt"):
        if alias in MISSING:
            continue
        chain = resolve_providers(alias)
        assert chain[0] == PROVIDER_ALIASES[alias] and chain[-1] == "CPUExecutionProvider"
    if "tensorrt" not in MISSING:
        assert "CUDAExecutionProvider" in resolve_providers("tensorrt")


@pytest.mark.parametrize("alias", MISSING or ["none-missing"])
def test_missing_provider_names_what_is_installed(alias):
    if alias == "none-missing":
        pytest.skip("every provider alias is installed here")
    with pytest.raises(DSMError) as err:
        resolve_providers(alias)
    text = str(err.value)
    assert PROVIDER_ALIASES[alias] in text and "installed: " in text
    assert all(p in text for p in ort.get_available_providers())
    assert "\n" not in text


def test_unknown_provider():
    with pytest.raises(DSMError, match="unknown execution provider 'quantum'"):
        resolve_providers("quantum")


@pytest.fixture(scope="module")
def small_export(tmp_path_factory, weights):
    from dsm_export.graph.export import export_onnx

    path = str(tmp_path_factory.mktemp("prov") / "m.onnx")
    export_onnx(DEIT, path, "r=13", weights, batch=2)
    return path


def test_session_on_cpu(small_export):
    session = create_session(small_export, "cpu")
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_validate_provider_option(small_export, images_dir, capsys):
    assert main(["validate", small_export, "--images", images_dir, "--limit", "3", "--no-progress",
                 "--provider", "CPUExecutionProvider"]) == 0
    if not MISSING:
        return
    capsys.readouterr()
    assert main(["validate", small_export, "--images", images_dir, "--limit", "3", "--no-progress",
                 "--provider", MISSING[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "installed: " in err


@pytest.mark.skipif(not MISSING, reason="every provider alias is installed here")
def test_tune_and_bench_refuse_a_missing_provider(small_export, weights, images_dir, capsys):
    assert main(["tune", DEIT, "--weights", weights, "--images", images_dir, "--target-speedup", "1.5",
                 "--provider", MISSING[0], "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "installed: " in err
    proc = subprocess.run([sys.executable, "-m", "dsm_export", "bench", small_export,
                           small_export, "--provider", MISSING[0]], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "installed: " in proc.stderr


def test_create_session_is_the_only_session_constructor():
    """dsm_export builds ``SessionOptions``/``InferenceSession`` in create_session alone."""
    import glob
    import re

    from conftest import ROOT

    found = []
    for path in glob.glob(os.path.join(ROOT, "dsm_export", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        if re.search(r"\b(InferenceSession|SessionOptions)\(", text):
            found.append(os.path.relpath(path, ROOT))
    assert found == [os.path.join("dsm_export", "engines", "providers.py")]


def test_create_session_errors(tmp_path):
    with pytest.raises(DSMError, match="ONNX Runtime cannot load .*missing.onnx"):
        create_session(str(tmp_path / "missing.onnx"))
    with pytest.raises(DSMError, match="cannot load an in-memory ONNX model"):
        create_session(b"not a model")
    with pytest.raises(ValueError, match="optimization 'fast'"):
        create_session(str(tmp_path / "missing.onnx"), optimization="fast")


def test_create_session_options(small_export, tmp_path):
    optimized = str(tmp_path / "opt.onnx")
    session = create_session(small_export, "cpu", threads=1, optimization="extended", optimized_path=optimized)
    assert os.path.getsize(optimized) > 0 and session.get_providers() == ["CPUExecutionProvider"]
    with open(small_export, "rb") as fh:
        from_bytes = create_session(fh.read(), optimization="default", log_severity=3)
    assert from_bytes.get_inputs()[0].name == session.get_inputs()[0].name
