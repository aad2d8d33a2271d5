"""Contextual calibration of loglik records, against hand-computed values."""

import random

import numpy as np

from reqnoise.eval.calibration import calibrate_records


def rec(i, lps, answer):
    pred = "ABCD"[int(np.argmax(lps))]
    return {
        "id": str(i),
        "subject": None,
        "correct": pred == answer,
        "parsed": True,
        "prediction": pred,
        "answer": answer,
        "option_logprobs": lps,
    }


def test_a_letter_prior_is_removed_and_item_signal_decides():
    # Raw: every item prefers A by 2 nats; the item's own signal is +0.5 on its answer.
    records = [
        rec(0, [0.0, -2.0, -2.0, -1.5], "D"),
        rec(1, [0.0, -1.5, -2.0, -2.0], "B"),
        rec(2, [0.5, -2.0, -2.0, -2.0], "A"),
        rec(3, [0.0, -2.0, -1.5, -2.0], "C"),
    ]
    assert [r["prediction"] for r in records] == ["A", "A", "A", "A"]
    out = calibrate_records(records)
    # prior = column means [0.125, -1.875, -1.875, -1.875]; hand-computed argmax of lp - prior:
    assert [r["prediction"] for r in out] == ["D", "B", "A", "C"]
    assert all(r["correct"] for r in out) and [r["raw_prediction"] for r in out] == ["A"] * 4


def test_calibration_does_not_depend_on_item_order():
    rng = random.Random(0)
    records = [rec(i, [round(rng.gauss(0, 1), 5) for _ in range(4)], "ABCD"[i % 4]) for i in range(50)]
    a = {r["id"]: r["prediction"] for r in calibrate_records(records)}
    shuffled = records[:]
    rng.shuffle(shuffled)
    b = {r["id"]: r["prediction"] for r in calibrate_records(shuffled)}
    assert a == b


def test_by_subject_takes_each_subjects_own_prior():
    # Subject s: every item prefers A by 2 nats; subject t: every item prefers D by 2 nats. Pooled, the two
    # priors cancel to nothing and every item keeps its subject's letter; per subject, the item signal decides.
    s = [rec(0, [0.0, -2.0, -2.0, -1.5], "D"), rec(1, [0.0, -1.5, -2.0, -2.0], "B")]
    t = [rec(2, [-1.5, -2.0, -2.0, 0.0], "A"), rec(3, [-2.0, -1.5, -2.0, 0.0], "B")]
    for r in s:
        r["subject"] = "s"
    for r in t:
        r["subject"] = "t"
    pooled = calibrate_records(s + t)
    assert [r["prediction"] for r in pooled] == ["A", "A", "D", "D"]
    # Hand-computed: prior s = [0, -1.75, -2, -1.75], prior t = [-1.75, -1.75, -2, 0].
    split = calibrate_records(s + t, by_subject=True)
    assert [r["prediction"] for r in split] == ["D", "B", "A", "B"] and all(r["correct"] for r in split)
    # A subject's prior does not depend on the other subjects' records.
    assert [r["prediction"] for r in calibrate_records(s, by_subject=True)] == ["D", "B"]
