"""The user tools of scripts/, ``dsm-export bench`` and the research/ generators keep working (run small;
their figures are not asserted)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.heavy  # random-init exports or a subprocess: no data, but seconds
def test_bench_gpu_runs_on_cpu():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench_gpu.py"), "--cpu", "--batch", "2",
         "--models", "deit_tiny_patch16_224", "--repeats", "2", "--iters", "1"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| deit_tiny")]
    assert len(rows) == 1 and rows[0].endswith("x |")


def test_bench_ort_runs(tmp_path, weights):
    from dsm_export.graph.export import export_onnx

    merged = str(tmp_path / "m.onnx")
    export_onnx("deit_tiny_patch16_224", merged, "r=13", weights, batch=2)
    proc = subprocess.run(
        [sys.executable, "-m", "dsm_export", "bench", merged, "--batch", "2",
         "--repeats", "5", "--iters", "1", "--warmup", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "intra-op threads" in proc.stdout and "ratio" in proc.stdout


def test_frontier_dominance_compares_only_at_equal_or_higher_speed(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "research"))
    import frontier

    def engine(family, speedup, kl):
        return {"family": family, "speedup": speedup, "kl": kl, "precision": "int8 dynamic", "flops_ratio": 1.5,
                "spec": "r=13"}

    engines = [engine("INT8 alone", 1.45, 0.003), engine("merge fp32", 1.6, 0.03), engine("merge fp32", 1.8, 0.10),
               engine("tuned", 1.4, 0.001),  # below 1.5x: not judged
               engine("tune's Pareto front", 1.55, 0.02),  # beats 0.03 (1.6x) and 0.10 (1.8x)
               engine("tune's Pareto front", 1.7, 0.2),  # loses to 0.10 (1.8x)
               engine("tuned", 2.2, 0.5),  # nothing as fast
               {**engine("tune's Pareto front", 1.52, 0.004), "spec": "none"}]  # INT8 alone itself
    rows = frontier.dominance(engines)
    assert [r["speedup"] for r in rows] == [1.52, 1.55, 1.7, 2.2]
    assert [r["lower"] for r in rows] == [None, True, False, None]
    assert [r["unmerged"] for r in rows] == [True, False, False, False]
    assert rows[1]["rivals"] == {"INT8 alone": None, "merge fp32": 0.03}
    text = frontier._dominance_text(rows)
    assert "4, 1 of them unmerged" in text and "unmerged, INT8 alone itself" in text
    assert "Of the 2 merged with" in text and "1 has lower KL" in text and "the other 1 is faster" in text
    assert "NOT lower KL" in text


def test_ort_throughput_with_a_reference_graph(dsm_onnx):
    import pytest

    from dsm_export.search.timing import ort_speedups, ort_throughput, timing_order

    assert timing_order(["a", "b", "c"], "a") == ["a", "b", "a", "c"]
    assert timing_order(["b", "a", "c"], "a") == ["a", "b", "a", "c"]
    assert timing_order(["a", "b"]) == ["a", "b"] and timing_order(["a"], "a") == ["a"]

    rates = ort_throughput({"a": dsm_onnx, "b": dsm_onnx, "c": dsm_onnx}, batch=1, repeats=2, reference="a")
    assert set(rates) == {"a", "b", "c"} and all(v > 0 for v in rates.values())
    assert ort_throughput({"a": dsm_onnx}, batch=1, repeats=1, reference="a")["a"] > 0  # the reference alone
    with pytest.raises(KeyError, match="reference"):
        ort_throughput({"a": dsm_onnx}, batch=1, repeats=1, reference="z")

    # paired speed-ups: one ratio per repetition for every graph but the reference; the same file
    # against itself is ~1 (a pair runs within milliseconds here)
    pairs = ort_speedups({"a": dsm_onnx, "b": dsm_onnx, "c": dsm_onnx}, "a", batch=1, repeats=3)
    assert set(pairs) == {"b", "c"} and all(len(v) == 3 and all(0.2 < x < 5 for x in v) for v in pairs.values())
    assert ort_speedups({"a": dsm_onnx}, "a", batch=1, repeats=1) == {}
    with pytest.raises(KeyError, match="reference"):
        ort_speedups({"a": dsm_onnx}, "z", batch=1, repeats=1)


def _token_counts(path: str) -> list[int]:
    """The token axis of every LayerNormalization output of a static-batch graph, in graph order."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    return [shapes[n.output[0]][1] for n in model.graph.node if n.op_type == "LayerNormalization"]


def test_merge_overhead_twin_has_the_token_counts_and_no_merge_work(tmp_path, deit, weights, monkeypatch):
    import onnx

    from dsm_export.graph.export import export_model
    from dsm_export.core.patch import MergedViT
    from dsm_export.core.schedule import Schedule

    monkeypatch.syspath_prepend(os.path.join(ROOT, "research"))
    import merge_overhead

    spec = Schedule.parse("r=33,r_end=0,delay=3,local=1,windows=1x2,protect=16,metric=heads,merge=mlerp")
    merged, twin = str(tmp_path / "merged.onnx"), str(tmp_path / "twin.onnx")
    export_model(deit, "deit_tiny_patch16_224", merged, spec, weights=weights, batch=2)
    merge_overhead.export_twin(deit, "deit_tiny_patch16_224", twin, spec, weights=weights, batch=2)
    assert MergedViT._merge.__name__ == "_merge"  # patched for the twin's export only
    counts = _token_counts(twin)
    assert counts == _token_counts(merged) and 197 in counts and min(counts) == 1
    ops = {n.op_type for n in onnx.load(twin).graph.node}
    assert not ops & {"TopK", "ArgMax", "Equal", "ReduceL2", "Sqrt", "ReduceMax", "Log", "GatherND"}  # no merge work

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "research", "merge_overhead.py"), "deit_tiny_patch16_224",
                           "--weights", weights, "--schedules", "r=13,delay=99"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1


def test_held_apart_ci_intervals(tmp_path, weights, images_dir):
    import json

    table = tmp_path / "merge_variants.json"
    table.write_text(json.dumps({"rows": [
        {"target": 1.7, "kind": "exact ToMe", "spec": "r=13,mode=tome", "kl": 0.0},
        {"target": 1.7, "kind": "paper-style DSM", "spec": "r=15,delay=1,local=2", "kl": 0.0},
        {"target": 1.7, "kind": "tuned (variant: plain)", "spec": "r=13", "kl": 0.0}]}))
    other = tmp_path / "previous.json"  # another run's choice: a paired comparison of the tuned rows
    other.write_text(json.dumps({"rows": [
        {"target": 1.7, "kind": "tuned (variant: protect=16)", "spec": "r=13,protect=16", "kl": 0.0}]}))
    script = os.path.join(ROOT, "research", "held_apart_ci.py")
    proc = subprocess.run(
        [sys.executable, script, "deit_tiny_patch16_224", "--weights", weights, "--images", images_dir,
         "--json", str(table), "--holdout", "24", "--resamples", "200", "--previous", str(other)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" | ") for line in proc.stdout.splitlines()
            if line.startswith("| 1.7x") and "points" not in line]
    assert [r[1] for r in rows] == ["exact ToMe", "tuned (variant: plain)"]  # default kinds only
    for cell in (rows[0][2], rows[1][2], rows[1][4].rstrip(" |")):  # mean [low, high], mean inside
        mean, low, high = (float(v) for v in cell.replace("[", "").replace("]", "").replace(",", "").split())
        assert low <= mean <= high and low < high
    assert rows[0][4].rstrip(" |") == "-"
    assert "not compared (--holdout)" in proc.stdout
    paired = [line.split(" | ") for line in proc.stdout.splitlines()
              if line.startswith("| 1.7x | ") and line.count("points") == 1]
    assert len(paired) == 1
    kl_now, kl_before = float(paired[0][1].split(",")[0]), float(paired[0][2].split(",")[0])
    diff, low, high = (float(v) for v in paired[0][3].replace("[", "").replace("]", "").replace(",", "").split())
    assert abs(diff - (kl_now - kl_before)) < 2e-4 and low <= diff <= high and kl_now != kl_before
    # A user mistake: one line, exit 2, no model loaded
    proc = subprocess.run([sys.executable, script, "deit_tiny_patch16_224", "--weights", weights,
                           "--images", images_dir, "--json", str(tmp_path / "missing.json")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    table.write_text(json.dumps({"rows": [{"target": 1.7, "kind": "exact ToMe", "spec": "r=13,mode=tome"}]}))
    proc = subprocess.run([sys.executable, script, "deit_tiny_patch16_224", "--weights", weights,
                           "--images", images_dir, "--json", str(other), "--previous", str(table)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "has no tuned row" in proc.stderr


def test_every_dsm_export_name_the_tools_import_exists():
    """scripts/ and research/ import dsm_export inside their functions, where a renamed module or
    function would fail only when someone runs them: check every such import resolves."""
    import ast
    import importlib
    import importlib.util

    missing = []
    for folder in ("scripts", "research"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(ROOT, folder, name), encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dsm_export":
                    module = importlib.import_module(node.module)
                    missing += [f"{folder}/{name}: {node.module}.{a.name}" for a in node.names
                                if not hasattr(module, a.name)
                                and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.split(".")[0] == "dsm_export" and importlib.util.find_spec(a.name) is None:
                            missing.append(f"{folder}/{name}: {a.name}")
    assert not missing, missing


def _scale(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "research"))
    import scale

    return scale


def test_scale_cuts_repeats_before_latency_runs_and_never_below_the_floor(monkeypatch):
    scale = _scale(monkeypatch)
    est = {"sessions_s": 2.0, "run_s": {"baseline": 10.0, "a": 5.0, "b": 5.0}, "run1_s": {"baseline": 1.5, "a": 1.0}}
    fit = scale.fit_budget(est, 10_000, 9, 30, "baseline", 2)  # room for all: nothing cut
    assert (fit["repeats"], fit["latency_runs"], fit["cut"], fit["over_s"]) == (9, 30, [], 0.0)
    assert fit["per_repeat_s"] == 30.0  # the baseline before each of a and b
    fit = scale.fit_budget(est, 350, 9, 30, "baseline", 2)  # repeats first, latency runs kept
    assert fit["latency_runs"] == 30 and 3 <= fit["repeats"] < 9 and fit["planned_s"] <= 350
    assert fit["cut"] == [f"repeats cut from 9 to {fit['repeats']}"]
    fit = scale.fit_budget(est, 100, 9, 30, "baseline", 2)  # both at their floor, the overrun reported
    assert (fit["repeats"], fit["latency_runs"]) == (3, 10) and fit["over_s"] > 0 and len(fit["cut"]) == 2
    assert scale.fit_budget(est, 100, 1, 5, "baseline", 2)["repeats"] == 1  # asked below the floor: kept


def test_scale_keeps_the_page_around_its_block(tmp_path, monkeypatch):
    scale = _scale(monkeypatch)
    data = {"command": "python research/scale.py --output x", "machine": "test CPU", "threads": 2,
            "onnxruntime": "1.0", "batch": 8, "date": "2026-01-01", "repeats_asked": 9, "budget_minutes": 10,
            "models": [{"model": "deit_small_patch16_224", "error": "no disk\nmore"}]}
    body = scale.write_outputs(data, str(tmp_path), plot=False)
    page = (tmp_path / "scale.md").read_text(encoding="utf-8")
    assert page.startswith(scale.INTRO) and "<!-- figures:scale -->\n" + body + "\n<!-- /figures:scale -->" in page
    assert "random-init weights: speed only" in body and "Not measured: deit_small_patch16_224: no disk" in body
    (tmp_path / "scale.md").write_text(page.replace(scale.INTRO, "# my own intro\n"), encoding="utf-8")
    scale.write_outputs({**data, "date": "2026-02-02"}, str(tmp_path), plot=False)
    page = (tmp_path / "scale.md").read_text(encoding="utf-8")
    assert page.startswith("# my own intro\n") and "2026-02-02" in page and "2026-01-01" not in page


@pytest.mark.heavy  # random-init models: no data, but seconds
def test_scale_dry_run_prints_schedules_at_their_targets():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "research", "scale.py"), "--dry-run", "--models",
                           "deit_small_patch16_224", "--base", "r=16,r_end=8,delay=2,local=1,windows=2x2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "197 tokens" in out and "r=13,mode=tome" in out
    ratios = [float(line.split()[2][:-1]) for line in out.splitlines() if line.strip().startswith("DSM ")]
    assert len(ratios) == 3 and all(t <= r < t + 0.05 for t, r in zip((1.5, 1.7, 2.0), ratios))


@pytest.mark.heavy  # a random-init DINOv2-S at 518 px: seconds
def test_scale_gives_a_register_model_tome_constant_r_in_the_default_mode():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "research", "scale.py"), "--dry-run", "--models",
                           "vit_small_patch14_reg4_dinov2", "--targets", "1.7"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "mode=tome knows no register tokens" in proc.stdout and "mode=tome`" not in proc.stdout


def test_child_rss_measures_the_child_alone(monkeypatch):
    """A child's peak RSS through research/child_rss.py is its own, not the parent's (which execve
    would carry into a plain child's ru_maxrss), and it sees the child's own allocation."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "research"))
    import child_rss

    ballast = bytearray(1 << 30)  # 1 GiB in this process, touched page by page
    ballast[::4096] = b"x" * len(ballast[::4096])
    small = child_rss.run_measured([sys.executable, "-c", "print('hi')"], stdout=subprocess.PIPE)
    big = child_rss.run_measured([sys.executable, "-c", "b = bytearray(400 << 20); b[::4096] = b'y' * len(b[::4096])"])
    failed = child_rss.run_measured([sys.executable, "-c", "raise SystemExit(3)"])
    del ballast
    assert small["returncode"] == 0 and small["output"] == "hi\n" and small["seconds"] > 0
    assert small["peak_rss_bytes"] < 200 << 20, small  # a bare Python, not this process's 1 GiB
    assert (400 << 20) < big["peak_rss_bytes"] < (700 << 20), big
    assert failed["returncode"] == 3 and failed["output"] is None


def test_scale_remeasure_exports_refuses_a_folder_without_scale_json(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "research", "scale.py"), "--output", str(tmp_path),
                           "--remeasure-exports"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_scale_append_refuses_a_folder_without_scale_json(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "research", "scale.py"), "--models",
                           "deit_small_patch16_224", "--output", str(tmp_path), "--append"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "scale.json").write_text(json.dumps({"batch": 4, "threads": 2, "command": "c", "date": "d",
                                                     "models": []}), encoding="utf-8")
    proc = subprocess.run(proc.args, capture_output=True, text=True, timeout=300)  # measured at another batch
    assert proc.returncode == 2 and "batch 4" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["scale.json"]


def _openvino_frontier_data():
    def row(family, key, spec, precision, runs, ratio, rate, kl, **extra):
        return {"family": family, "key": key, "label": f"{key} row", "spec": spec, "precision": precision,
                "runs": runs, "flops_ratio": ratio, "images_per_s": rate, "speedup_ort": rate / 100,
                "speedup_openvino": rate / 150, "kl": kl, "top1_agreement": 1 - kl, "top1_accuracy": 0.8, **extra}

    return {"command": "python research/openvino_frontier.py deit_tiny_patch16_224 --weights w --images i --output x",
            "quick": False,
            "machine": {"cpu": "test CPU", "logical_cpus": 2, "cpu_bf16": False, "threads": 2, "batch": 32,
                        "repeats": 7, "openvino": "1.0", "nncf": "2.0", "onnxruntime": "3.0", "baseline_runs": "f32",
                        "date": "2026-01-01"},
            "photos": {"calibration": 64, "held_apart": 436, "first_held": 64, "seen_by_tune": 90},
            "tuned": {"spec": "r=33", "precision": "fp32", "origin": "given by --tuned"},
            "engines": [row("baseline", "onnxruntime", "none", "fp32", "f32", 1.0, 100.0, 0.0),
                        row("baseline", "baseline", "none", "default", "f32", 1.0, 150.0, 0.0),
                        row("merged int8", "2", "r=16", "int8", "int8 + f32", 1.4, 170.0, 0.02, smooth_alpha=0.5),
                        row("merged default", "1", "r=16", "bf16", "f32", 1.4, 180.0, 0.004),
                        row("tuned", "3", "r=33", "fp32", "f32", 1.7, 250.0, 0.04)]}


def test_openvino_frontier_keeps_the_page_around_its_block_and_refuses_a_page_without_one(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "research"))
    import openvino_frontier

    data = _openvino_frontier_data()
    body = openvino_frontier.write_outputs(data, str(tmp_path), plot=False)  # no page: one holding the block
    lines = body.splitlines()
    assert lines[0] == f"Generated by `{data['command']}`" and "without BF16" in lines[1] and "nncf 2.0" in lines[1]
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| family")]
    assert [r.split(" | ")[0] for r in rows] == ["| baseline", "| baseline", "| merged default", "| merged int8", "| tuned"]
    assert "| 1.80x | 1.20x |" in rows[2] and "r=16 (int8 IR): 0.5" in body and "90 of the 436 photos" in body
    page = tmp_path / "results.md"
    page.write_text("# mine\n\n<!-- figures:openvino-frontier -->\nold\n<!-- /figures:openvino-frontier -->\ntail\n",
                    encoding="utf-8")
    openvino_frontier.write_outputs(data, str(tmp_path), plot=False)
    text = page.read_text(encoding="utf-8")
    assert text.startswith("# mine\n\n<!-- figures:openvino-frontier -->\nGenerated by") and text.endswith(
        "<!-- /figures:openvino-frontier -->\ntail\n") and "\nold\n" not in text
    page.write_text("# no block\n", encoding="utf-8")
    assert openvino_frontier.main(["deit_tiny_patch16_224", "--weights", "w", "--images", "i", "--output",
                                   str(tmp_path)]) == 2  # refused before anything is measured
    assert page.read_text(encoding="utf-8") == "# no block\n"
