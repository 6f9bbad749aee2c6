"""Schedules, analyze and tune on models other than DeiT-Tiny (issue 35): a deeper ViT's block
count, and a ViT-B/32 whose 7x7 grid the windows do not divide. Random-init weights saved to a
file stand in for a user's checkpoint: the commands run, but their KLs mean nothing (only real
weights give tune a meaningful choice; docs/tuning.md says so)."""

import json

import timm
import torch

from dsm_export.check.evaluate import flops_ratio
from dsm_export.cli import main
from dsm_export.core.schedule import Schedule


def test_a_schedule_for_another_depth_is_refused_with_one_line(tmp_path, capsys):
    spec = tmp_path / "deit12.json"  # written for a 12-block DeiT, given to the 24-block ViT-L
    spec.write_text(json.dumps({"blocks": ["none"] * 3 + ["global 16"] * 9}))
    for command in (["inspect", "vit_large_patch16_224", "--schedule", str(spec)],
                    ["export", "vit_large_patch16_224", "--schedule", str(spec), "-o", str(tmp_path / "l.onnx")]):
        assert main(command) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if "warning" not in line]
        assert err == ["dsm-export: error: schedule lists 12 blocks but the model has 24"], err
    assert list(tmp_path.iterdir()) == [spec]


def test_analyze_and_tune_run_on_vit_b32_with_uneven_windows(tmp_path, images_dir, capsys):
    name = "vit_base_patch32_224"
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    weights = tmp_path / "vitb32.pth"
    torch.save(model.state_dict(), weights)
    assert main(["analyze", name, "--weights", str(weights), "--images", images_dir, "--limit", "4",
                 "--output", str(tmp_path / "analysis")]) == 0
    report = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert len(report["merge_kl"]) == 12
    capsys.readouterr()
    out = tmp_path / "schedule.json"
    assert main(["tune", name, "--weights", str(weights), "--images", images_dir, "--target-flops-ratio", "1.5",
                 "--calibration-count", "8", "--holdout", "8", "--max-grid", "8", "--refine-steps", "2",
                 "--output", str(out), "--no-progress"]) == 0
    schedule = Schedule.parse(str(out))
    assert flops_ratio(model, schedule) >= 1.5
    text = capsys.readouterr().out
    assert "windows=" in text  # the grid searched local windows on the 7x7 grid, uneven ones included
