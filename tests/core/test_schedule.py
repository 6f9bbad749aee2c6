import json

import pytest

from dsm_export.errors import ScheduleError
from dsm_export.core.schedule import BlockPlan, Schedule, resolve

GRID = (14, 14)


def test_tome_constant_schedule_counts():
    plan = Schedule.parse("r=13").plan(12)
    assert plan == tuple(BlockPlan("global", 13) for _ in range(12))
    tokens = resolve(Schedule.parse("r=13"), 12, GRID, 1)
    # 196 patch tokens lose 13 per block, the class token stays.
    assert [t.tokens_out for t in tokens] == [197 - 13 * (i + 1) for i in range(12)]
    assert all(t.tokens_in - t.tokens_out == 13 for t in tokens)


def test_dsm_schedule_delay_local_global():
    s = Schedule.parse("r=13,delay=2,local=4,windows=2x2")
    plan = s.plan(12)
    assert [b.mode for b in plan] == ["none"] * 2 + ["local"] * 4 + ["global"] * 6
    tokens = resolve(s, 12, GRID, 1)
    # local: ceil(13 / 4) = 4 per window, 16 in all; global: 13.
    assert [t.removed for t in tokens] == [0, 0, 16, 16, 16, 16, 13, 13, 13, 13, 13, 13]
    assert [t.per_window for t in tokens[2:6]] == [4, 4, 4, 4]
    assert tokens[-1].tokens_out == 197 - 4 * 16 - 6 * 13


def test_uneven_windows_spread_r_by_window_size():
    # 7x7 in 2x2 windows: rows and columns 4/3, windows of 16, 12, 12 and 9 tokens (49 in all);
    # r=8 spreads as ceil(8 * n_w / n): 3 in the 16-token window, 2 in each other.
    tokens = resolve(Schedule.from_dict(["none", "local 8", "local 8"] + ["global 2"] * 9), 12, (7, 7), 1)
    assert tokens[1].windows == ((1, 16, 3), (2, 12, 2), (1, 9, 2))
    assert tokens[1].removed == 9 and tokens[1].per_window == 3
    # the next block sees 13, 10, 10 and 7 of the 40 tokens left
    assert tokens[2].windows == ((1, 13, 3), (2, 10, 2), (1, 7, 2))
    assert tokens[2].tokens_out == 50 - 9 - 9
    # windows that divide the grid: one group, ceil(r / W) each, as before
    even = resolve(Schedule.parse("r=13,delay=2,local=4,windows=2x2"), 12, GRID, 1)
    assert even[2].windows == ((4, 49, 4),) and even[3].windows == ((4, 45, 4),)
    # 37x37 (DINOv2 at 518 px, patch 14) in 2x2: 19/18 by 19/18, four sizes
    big = resolve(Schedule.parse("r=40,r_end=20,delay=2,local=2,windows=2x2"), 12, (37, 37), 5)
    assert [(c, n) for c, n, _ in big[2].windows] == [(1, 361), (2, 342), (1, 324)]
    assert big[2].removed == sum(c * r for c, _, r in big[2].windows)


def test_r_end_ramp_and_none():
    plan = Schedule.parse("r=20,r_end=8,delay=3").plan(12)
    assert [b.r for b in plan] == [0, 0, 0, 20, 18, 17, 16, 14, 12, 11, 10, 8]
    assert Schedule.parse("none").is_none
    assert Schedule.parse("none").spec() == "none"
    assert all(t.removed == 0 for t in resolve(Schedule.parse("none"), 12, GRID, 2))


def test_spec_round_trip():
    for text in ["none", "r=13", "r=13,delay=2,local=4,windows=2x2", "r=20,r_end=8,delay=3"]:
        s = Schedule.parse(text)
        assert Schedule.parse(s.spec()).plan(12) == s.plan(12)


def test_json_file_with_per_block_r(tmp_path):
    blocks = ["none", "local 16", "local 12"] + [f"global {r}" for r in (10, 9, 8, 7, 6, 5, 4, 3, 2)]
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"blocks": blocks, "windows": "2x2"}))
    s = Schedule.parse(str(path))
    assert [str(b) for b in s.plan(12)] == blocks
    tokens = resolve(s, 12, GRID, 1)
    assert [t.removed for t in tokens][:3] == [0, 16, 12]
    assert Schedule.from_dict(s.to_dict(12)).plan(12) == s.plan(12)


def test_stride_merges_each_run_of_blocks_at_once():
    from dsm_export.core.schedule import stride_blocks

    s = Schedule.parse("r=27,r_end=9,delay=3,stride=2")
    every = Schedule.parse("r=27,r_end=9,delay=3").plan(12)
    assert [b.r for b in every] == [0, 0, 0, 27, 25, 22, 20, 18, 16, 14, 11, 9]
    assert [str(b) for b in s.plan(12)] == ["none"] * 4 + ["global 52", "none", "global 42", "none",
                                                          "global 34", "none", "global 25", "global 9"]
    # the token count after each run is the every-block schedule's
    a, b = resolve(s, 12, GRID, 1), resolve(Schedule.parse("r=27,r_end=9,delay=3"), 12, GRID, 1)
    assert [a[i].tokens_out for i in (4, 6, 8, 10, 11)] == [b[i].tokens_out for i in (4, 6, 8, 10, 11)]
    # runs do not cross modes: local blocks run apart from global ones
    plan = Schedule.parse("r=20,delay=2,local=3,stride=2").plan(12)
    assert [str(b) for b in plan[:6]] == ["none", "none", "none", "local 40", "local 20", "none"]
    assert stride_blocks(every, 1) == every
    assert Schedule.parse(s.spec()).same_as(s, 12) and s.spec() == "r=27,r_end=9,delay=3,stride=2"
    assert Schedule.from_dict({"r": 20, "stride": 3}).plan(12)[2] == BlockPlan("global", 60)
    for bad, message in (("r=13,stride=0", "at least 1"), ("r=13,stride=2,mode=tome", "r list only")):
        with pytest.raises(ScheduleError, match=message):
            Schedule.parse(bad)


@pytest.mark.parametrize("text, message", [
    ("r=13,foo=2", "unknown key"),
    ("r=-1", "non-negative"),
    ("r=abc", "non-negative"),
    ("delay=2", "r is required"),
    ("r=13,windows=2by2", "ROWSxCOLS"),
    ("r=13 delay=2", "non-negative integer"),
    ("r=13,delay", "key=value"),
])
def test_bad_specs(text, message):
    with pytest.raises(ScheduleError, match=message):
        Schedule.parse(text)


def test_impossible_schedules_name_the_block():
    with pytest.raises(ScheduleError, match=r"block 0: global r=99 .*at most 98"):
        resolve(Schedule.parse("r=99"), 12, GRID, 1)
    # r=16 constant runs out of tokens: the message names the first block that cannot give them.
    with pytest.raises(ScheduleError, match=r"block 11: global r=16 .* 20 mergeable"):
        resolve(Schedule.parse("r=16"), 12, GRID, 1)
    with pytest.raises(ScheduleError, match=r"block 0: local r=100 needs 25 merges .* of 49 tokens"):
        resolve(Schedule.parse("r=100,local=1"), 12, GRID, 1)
    with pytest.raises(ScheduleError, match="windows 8x8 need at least one patch row and column each: "
                                            "the patch grid is 7x7"):
        resolve(Schedule.parse("r=8,local=2,windows=8x8"), 12, (7, 7), 1)
    with pytest.raises(ScheduleError, match=r"block 0: local r=22 needs 5 merges in a window of 9 tokens"):
        resolve(Schedule.parse("r=22,local=1,windows=2x2"), 12, (7, 7), 1)
    with pytest.raises(ScheduleError, match="block 2: local merging after global"):
        resolve(Schedule.from_dict(["global 4", "none", "local 4"] + ["none"] * 9), 12, GRID, 1)
    with pytest.raises(ScheduleError, match="lists 3 blocks but the model has 12"):
        resolve(Schedule.from_dict(["none"] * 3), 12, GRID, 1)
    with pytest.raises(ScheduleError, match="does not exist"):
        Schedule.parse("/nonexistent/schedule.json")
