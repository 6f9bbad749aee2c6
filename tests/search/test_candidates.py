"""The search's candidate rows and the rules that rank, front, budget and confirm them (pure logic)."""

import pytest

from dsm_export.search.candidates import (Budget, Candidate, better, confirmation_round, least, pareto_front,
                                          quality_key, schedule_of)


def test_candidate_fills_the_generic_names_from_a_classifier_s():
    row = Candidate(spec="r=13", flops_ratio=1.5, kl=0.02, top1_agreement=0.95)
    assert row.divergence == row["divergence"] == 0.02 and row.agreement == 0.95
    assert row.schedule.spec() == "r=13" and schedule_of(row).spec() == "r=13"
    # the generic names win where both are given (an embedding model has no kl)
    assert Candidate(divergence=0.1, kl=0.3, agreement=0.5).divergence == 0.1
    with pytest.raises(KeyError, match="divergence"):
        Candidate(spec="r=13", agreement=0.9)
    assert isinstance(row, dict) and dict(row)["kl"] == 0.02  # written to JSON reports as it is


def test_one_ranking_key_and_one_front():
    a, b, c = (Candidate(divergence=d, agreement=g, speedup=s, flops_ratio=f)
               for d, g, s, f in ((0.02, 0.90, 1.5, 1.6), (0.02, 0.95, 1.4, 1.7), (0.05, 0.99, 2.0, 1.5)))
    assert quality_key(a) == (0.02, -0.90) and least([a, b, c]) is b and least([]) is None
    assert better(b, a) and not better(a, b) and better(a, None)
    assert pareto_front([a, b, c]) == [a, c]  # by measured speed-up: a is as accurate and faster than b
    assert pareto_front([a, b, c], "flops_ratio") == [b]  # by FLOP ratio b beats both
    assert Budget(0.93).admits(b) and not Budget(0.93).admits(a)


def test_the_confirmation_round_pools_both_timings():
    rows = [Candidate(divergence=0.0, agreement=1.0, speedup=2.0),
            Candidate(divergence=0.0, agreement=1.0, speedup=1.0, speedup_runs=[1.0, 1.2, 0.8])]
    timed = []

    def time_again(group):
        timed.append(len(group))
        return [[2.2], [1.1, 1.3]]

    confirmation_round(rows, time_again, lambda row, runs: {"speedup": sum(runs) / len(runs)})
    assert timed == [2]  # the contenders together, in one run
    assert rows[0]["speedup_runs"] == [2.0, 2.2] and rows[0]["speedup"] == pytest.approx(2.1)
    assert rows[1]["speedup_runs"] == [1.0, 1.2, 0.8, 1.1, 1.3] and rows[1]["timed_twice"]
    confirmation_round([], lambda g: pytest.fail("nothing to time"), lambda r, x: {})
