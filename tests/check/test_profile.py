"""``dsm-export profile``: the runtimes' own time per op, split by node labels into model, merge and layout work."""

from __future__ import annotations

import json

import pytest

from dsm_export.check.profile import profile_engine, summarize
from dsm_export.cli import main
from dsm_export.engines.int8.quantize import matching_nodes
from dsm_export.engines.registry import RunnerOptions
from dsm_export.graph.export import load_onnx


def test_onnx_runtime_profile_splits_by_the_matching_nodes(dsm_onnx):
    summary = profile_engine(dsm_onnx, RunnerOptions(threads=2), batch=2, runs=2, warmup=1)
    matching = set(matching_nodes(load_onnx(dsm_onnx, weights=False)))
    merge = [op for op in summary.profile.ops if op.part == "merge"]
    assert merge and all(op.name in matching for op in merge)  # from labels, not guessed
    assert {op.op_type for op in merge} & {"TopK", "ArgMax", "ReduceMax"}
    assert not [op for op in summary.profile.ops if op.part == "model" and op.name in matching]
    assert summary.part_ms["merge"] > 0 and summary.part_ms["model"] > summary.part_ms["merge"]
    assert abs(sum(summary.part_ms.values()) - summary.op_ms_total) < 1e-6
    assert summary.profile.wall_ms > 0 and summary.profile.runtime.startswith("ONNX Runtime")
    assert summarize(summary.profile).op_ms == summary.op_ms


def test_profile_cli_two_engines_side_by_side_and_json(dsm_onnx, tmp_path, capsys):
    pytest.importorskip("openvino")
    xml = str(tmp_path / "m.xml")
    assert main(["build", dsm_onnx, "--backend", "openvino", "--output", xml]) == 0
    capsys.readouterr()
    out_json = tmp_path / "profile.json"
    assert main(["profile", xml, dsm_onnx, "--batch", "2", "--runs", "2", "--warmup", "1", "--threads", "2",
                 "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "merge work" in out and "layout work" in out and "m.xml" in out and "OpenVINO" in out
    data = json.loads(out_json.read_text())
    ov, ort = data["engines"]
    assert ov["profile"]["backend"] == "openvino" and ort["profile"]["backend"] == "onnxruntime"
    assert ov["part_ms"]["merge"] > 0, "the IR records its matching nodes, the split finds them"


def test_profile_mistakes_exit_2_with_one_line(dsm_onnx, tmp_path, capsys):
    for args in (["profile", str(tmp_path / "missing.onnx")],
                 ["profile", dsm_onnx, dsm_onnx, dsm_onnx],
                 ["profile", dsm_onnx, "--runs", "0"],
                 ["profile", str(tmp_path / "model.tflite")],
                 ["profile", dsm_onnx, "--json", str(tmp_path / "no" / "p.json")]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "no").exists()
