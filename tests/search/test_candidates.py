"""The search's candidate rows and the rules that rank, front, budget and confirm them (pure logic)."""

import json

import pytest

from dsm_export.search.candidates import (CLASSIFIER_NAMES, Budget, Candidate, better, confirmation_round, least,
                                          pareto_front, quality_key, schedule_of)


def test_candidate_fills_the_generic_names_from_a_classifier_s():
    row = Candidate.from_json(dict(spec="r=13", flops_ratio=1.5, kl=0.02, top1_agreement=0.95))
    assert row.divergence == row.to_json()["divergence"] == 0.02 and row.agreement == 0.95
    assert row.schedule.spec() == "r=13" and schedule_of(row).spec() == "r=13"
    # the generic names win where both are given (an embedding model has no kl)
    assert Candidate.from_json(dict(divergence=0.1, kl=0.3, agreement=0.5)).divergence == 0.1
    with pytest.raises(KeyError, match="divergence"):
        Candidate.from_json(dict(spec="r=13", agreement=0.9))
    assert json.loads(json.dumps(row.to_json()))["kl"] == 0.02  # written to JSON reports with the classifier's names


def test_candidate_json_keeps_the_keys_reports_have_always_had():
    """One name per metric in Python; the JSON rows keep ``kl`` and ``top1_agreement`` (classifiers),
    an embedding model's names and every other key, and read back to the same candidate."""
    evaluated = {"schedule": "r=13", "flops_ratio": 1.74, "kl": 0.05, "top1_agreement": 0.92, "divergence": 0.05,
                 "agreement": 0.92, "spec": "r=13", "variant": "plain"}
    row = Candidate.from_json(evaluated)
    assert (row.divergence, row.agreement, row.variant, row.extra) == (0.05, 0.92, "plain", {"schedule": "r=13"})
    assert row.to_json() == evaluated and Candidate.from_json(row.to_json()) == row
    engine = Candidate(spec="none", precision="int8", flops_ratio=1.07, speedup=1.6, divergence=0.003, agreement=0.99,
                       path="int8_none.onnx", rung=1.0, stride=1, metric_names=CLASSIFIER_NAMES)
    assert set(engine.to_json()) == {"spec", "precision", "flops_ratio", "speedup", "divergence", "agreement", "path",
                                     "rung", "stride", "kl", "top1_agreement"}
    engine.timed_twice, engine.speedup_runs = True, [1.6, 1.7]
    assert engine.to_json()["timed_twice"] and engine.to_json()["speedup_runs"] == [1.6, 1.7]
    cosine = {"cosine_distance": 0.01, "min_cosine": 0.9, "mean_cosine": 0.99, "knn_overlap": 0.8, "knn_k": 5,
              "divergence": 0.01, "agreement": 0.8, "spec": "r=13", "flops_ratio": 1.7}
    assert Candidate.from_json(cosine).to_json() == cosine and "kl" not in cosine
    with pytest.raises(AttributeError):
        engine.kl = 0.1  # one name per metric: no second name to drift from the first


def test_one_ranking_key_and_one_front():
    a, b, c = (Candidate(divergence=d, agreement=g, speedup=s, flops_ratio=f)
               for d, g, s, f in ((0.02, 0.90, 1.5, 1.6), (0.02, 0.95, 1.4, 1.7), (0.05, 0.99, 2.0, 1.5)))
    assert quality_key(a) == (0.02, -0.90) and least([a, b, c]) is b and least([]) is None
    assert better(b, a) and not better(a, b) and better(a, None)
    assert pareto_front([a, b, c]) == [a, c]  # by measured speed-up: a is as accurate and faster than b
    assert pareto_front([a, b, c], "flops_ratio") == [b]  # by FLOP ratio b beats both
    assert Budget(0.93).admits(b) and not Budget(0.93).admits(a)
    # a report's JSON rows and held-apart scores rank and budget the same way
    assert quality_key(a.to_json()) == quality_key(a) and least([a.to_json(), b.to_json()]) == b.to_json()
    assert Budget(0.93).admits(b.to_json()) and not Budget(0.93).admits(a.to_json())


def test_the_confirmation_round_pools_both_timings():
    rows = [Candidate(divergence=0.0, agreement=1.0, speedup=2.0),
            Candidate(divergence=0.0, agreement=1.0, speedup=1.0, speedup_runs=[1.0, 1.2, 0.8])]
    timed = []

    def time_again(group):
        timed.append(len(group))
        return [[2.2], [1.1, 1.3]]

    confirmation_round(rows, time_again, lambda row, runs: {"speedup": sum(runs) / len(runs)})
    assert timed == [2]  # the contenders together, in one run
    assert rows[0].speedup_runs == [2.0, 2.2] and rows[0].speedup == pytest.approx(2.1)
    assert rows[1].speedup_runs == [1.0, 1.2, 0.8, 1.1, 1.3] and rows[1].timed_twice
    confirmation_round([], lambda g: pytest.fail("nothing to time"), lambda r, x: {})
