"""Per-block statistics of the real DeiT-Tiny and the delay they recommend."""

import json
import math

from PIL import Image

from dsm_export.check.analyze import PLOTS, recommend_delay
from dsm_export.cli import main

from conftest import DEIT


def test_recommend_delay_rule():
    assert recommend_delay([0.05, 0.02, 0.006, 0.004, 0.001])[0] == 3  # > 10 % of 0.05 = 0.005
    assert recommend_delay([0.001, 0.05, 0.02])[0] == 0
    delay, reason = recommend_delay([0.04, 0.001, 0.001])
    assert delay == 1 and "blocks 0-0" in reason and "block 1 costs 0.0010" in reason


def test_analyze_cli_on_real_weights(weights, images_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert main(["analyze", DEIT, "--weights", weights, "--images", images_dir, "--limit", "12",
                 "--r", "16", "-o", str(out)]) == 0
    report = json.loads((out / "analysis.json").read_text())
    for key in ("attention_entropy", "key_match_similarity", "outlier_ratio", "merge_kl", "merge_agreement"):
        assert len(report[key]) == 12
    for key in PLOTS:
        with Image.open(out / f"{key}.png") as im:
            assert im.format == "PNG"
    assert all(0 < h <= math.log(197) for h in report["attention_entropy"])
    assert all(-1 <= s <= 1 for s in report["key_match_similarity"])
    assert all(o > 1 for o in report["outlier_ratio"])
    # DSM's premise on real weights: merging in the bottom blocks costs far more than at the top.
    assert report["merge_kl"][0] > 10 * report["merge_kl"][-1]
    assert report["recommended_delay"] >= 1
    assert "recommended delay" in capsys.readouterr().out

