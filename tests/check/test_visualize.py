"""Merge-group visualisation: groups partition the patches, local groups stay inside windows."""

import os

import numpy as np
from PIL import Image

from dsm_export.cli import main
from dsm_export.core.patch import apply
from dsm_export.core.schedule import Schedule
from dsm_export.check.visualize import merge_groups

from conftest import DEIT, DSM_17


def test_groups_match_token_counts_and_windows(deit, pixels):
    schedule = Schedule.parse("r=16,delay=1,local=2,windows=2x2")
    tokens = apply(deit, schedule).tokens
    groups = merge_groups(deit, schedule, pixels[:1], [0, 1, 2, 5])
    for b, g in groups.items():
        assert g.shape == (14, 14)
        assert len(np.unique(g)) == tokens[b].tokens_out - 1  # every patch token is one group
    for b in (1, 2):  # local blocks: no group crosses a 7x7 window
        g = groups[b]
        for token in np.unique(g):
            rows, cols = np.nonzero(g == token)
            assert len({r // 7 for r in rows}) == 1 and len({c // 7 for c in cols}) == 1


def test_visualize_cli_writes_png(weights, images_dir, tmp_path, capsys):
    out = str(tmp_path / "vis.png")
    image = os.path.join(images_dir, sorted(f for f in os.listdir(images_dir) if f.endswith(".JPEG"))[0])
    assert main(["visualize", DEIT, "--weights", weights, "--image", image, "--schedule", DSM_17,
                 "--blocks", "3,11", "-o", out]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]
    assert "block 11: 41 tokens" in capsys.readouterr().out
    assert main(["visualize", DEIT, "--weights", weights, "--image", image, "--schedule", DSM_17,
                 "--blocks", "12", "-o", str(tmp_path / "x.png")]) == 2
    assert not os.path.exists(tmp_path / "x.png")
