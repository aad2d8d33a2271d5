"""Mean-prior calibration of loglik records, against hand-computed values."""

import json
import random

import numpy as np
import pytest

from reqnoise.errors import ReqnoiseError
from reqnoise.eval.calibration import calibrate_records, option_prior


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


def test_option_prior_is_the_mean_logprob_per_position():
    records = [rec(0, [0.0, -1.0, -2.0], "A"), rec(1, [-1.0, -2.0, -4.0, -3.0], "B")]
    prior = option_prior(records)
    assert set(prior) == {None}
    # Hand-computed: position 3 exists in one record only.
    np.testing.assert_array_equal(prior[None], [-0.5, -1.5, -3.0, -3.0])
    records[0]["subject"], records[1]["subject"] = "s", "t"
    split = option_prior(records, by_subject=True)
    np.testing.assert_array_equal(split["s"], [0.0, -1.0, -2.0])
    np.testing.assert_array_equal(split["t"], [-1.0, -2.0, -4.0, -3.0])


def two_models():
    # Baseline P and model Q score item 0 identically (raw: both answer A); they differ on item 1 only.
    p = [rec(0, [0.0, -1.5], "A"), rec(1, [0.0, -0.5], "B")]
    q = [rec(0, [0.0, -1.5], "A"), rec(1, [0.0, -2.5], "B")]
    return p, q


def test_per_condition_priors_can_flip_an_item_both_models_score_identically():
    p, q = two_models()
    # Own priors, hand-computed: P [0, -1.0], Q [0, -2.0]. Item 0: P [0, -0.5] -> A; Q [0, +0.5] -> B.
    own_p, own_q = calibrate_records(p), calibrate_records(q)
    assert [r["prediction"] for r in own_p] == ["A", "B"]
    assert [r["prediction"] for r in own_q] == ["B", "A"]
    assert own_p[0]["raw_prediction"] == own_q[0]["raw_prediction"] == "A"


def test_a_shared_baseline_prior_gives_identical_answers_for_identical_raw_scores():
    p, q = two_models()
    prior = option_prior(p)
    np.testing.assert_array_equal(prior[None], [0.0, -1.0])
    shared_p, shared_q = calibrate_records(p, prior=prior), calibrate_records(q, prior=prior)
    # Hand-computed with P's prior [0, -1]: P item 0 [0, -0.5] -> A, item 1 [0, +0.5] -> B;
    # Q item 0 [0, -0.5] -> A (as P), item 1 [0, -1.5] -> A.
    assert [r["prediction"] for r in shared_p] == ["A", "B"]
    assert [r["prediction"] for r in shared_q] == ["A", "A"]
    # The baseline calibrated with its own prior is the default calibration.
    assert shared_p == calibrate_records(p)
    assert [r["correct"] for r in shared_q] == [True, False]


def test_shared_prior_never_separates_identical_raw_scores():
    rng = np.random.default_rng(0)
    base = [rec(i, list(np.round(rng.normal(size=4) - [2, 0, 0, 0], 3)), "ABCD"[i % 4]) for i in range(40)]
    # The other model: half its items scored exactly as the baseline, the rest shifted towards D.
    other = [
        r if i % 2 else rec(i, list(np.add(r["option_logprobs"], [0, 0, 0, 1.5])), r["answer"])
        for i, r in enumerate(base)
    ]
    prior = option_prior(base)
    a, b = calibrate_records(base, prior=prior), calibrate_records(other, prior=prior)
    same = [i for i in range(40) if base[i]["option_logprobs"] == other[i]["option_logprobs"]]
    assert len(same) == 20 and all(a[i]["prediction"] == b[i]["prediction"] for i in same)


def test_a_shared_prior_by_subject_and_its_errors():
    p, q = two_models()
    for r in p + q:
        r["subject"] = "s"
    prior = option_prior(p, by_subject=True)
    assert [r["prediction"] for r in calibrate_records(q, by_subject=True, prior=prior)] == ["A", "A"]
    q[1]["subject"] = "t"
    with pytest.raises(ReqnoiseError, match="prior has no subject 't'"):
        calibrate_records(q, by_subject=True, prior=prior)
    with pytest.raises(ReqnoiseError, match="3 options but the calibration prior covers 2"):
        calibrate_records([rec(5, [0.0, -1.0, -2.0], "A")], prior=option_prior(p))
    with pytest.raises(ReqnoiseError, match="no option_logprobs"):
        calibrate_records([{**p[0], "option_logprobs": None}])
    with pytest.raises(ReqnoiseError, match="no option_logprobs"):
        calibrate_records([{k: v for k, v in p[0].items() if k != "option_logprobs"}])
    with pytest.raises(ReqnoiseError, match="at least one record"):
        option_prior([])


def _spec(tmp_path, eval_extra):
    from reqnoise.experiment.spec import load_spec

    items = tmp_path / "items.jsonl"
    words = "red blue green stone river cloud seven paper iron glass".split()
    rng = random.Random(3)
    with items.open("w") as f:
        for i in range(12):
            q = "Which " + " ".join(rng.choice(words) for _ in range(6)) + "?"
            opts = [" ".join(rng.choice(words) for _ in range(2)) for _ in range(4)]
            f.write(json.dumps({"id": f"q{i}", "question": q, "options": opts, "answer": "ABCD"[i % 4]}) + "\n")
    text = (
        'conditions = ["a", "b"]\n[models.a]\ntoy = {}\n[models.b]\ntoy = { seed = 1 }\n'
        f'[evals.e]\nitems = "items.jsonl"\nmode = "loglik"\n{eval_extra}'
    )
    (tmp_path / "spec.toml").write_text(text)
    return load_spec(tmp_path / "spec.toml")


@pytest.mark.parametrize(
    "extra,match",
    [
        ('calibrate_from = "a"', "calibrate_from needs calibrate"),
        ('calibrate = true\ncalibrate_from = "z"', "calibrate_from names unknown model 'z'"),
        ("calibrate = true\ncalibrate_from = 1", "calibrate_from names unknown model 1"),
        ('calibrate_eval = "e"', "calibrate_eval needs calibrate"),
        ('calibrate = true\ncalibrate_eval = "z"', "calibrate_eval names unknown eval 'z'"),
        (
            'calibrate = true\ncalibrate_eval = "c"\n[evals.c]\nitems = "items.jsonl"\nmode = "generate"',
            "eval 'c' scores in mode 'generate', this one in 'loglik'",
        ),
    ],
)
def test_spec_refuses_a_bad_calibrate_from(tmp_path, extra, match):
    with pytest.raises(ReqnoiseError, match=match):
        _spec(tmp_path, extra)


def test_runner_calibrates_every_model_with_the_named_models_prior(tmp_path):
    from reqnoise.experiment.plan import execute
    from reqnoise.experiment.runner import Runner

    spec = _spec(tmp_path, 'calibrate = true\ncalibrate_from = "a"')
    runner = Runner(spec, tmp_path / "out", progress=False, log=lambda *a: None)
    paths = {m: runner.evaluate(m, "e") for m in ("a", "b")}
    execute(runner.plan, runner.cache, log=lambda *a: None)
    recs = {m: [json.loads(line) for line in p.read_text().splitlines()] for m, p in paths.items()}
    # Oracle in numpy: a's mean option log-probability per position, subtracted from b's raw scores.
    prior = np.mean([r["option_logprobs"] for r in recs["a"]], axis=0)
    for m in ("a", "b"):
        for r in recs[m]:
            lp = np.asarray(r["option_logprobs"])
            assert r["raw_prediction"] == "ABCD"[int(np.argmax(lp))]
            assert r["prediction"] == "ABCD"[int(np.argmax(lp - prior))]
    lp_b = np.array([r["option_logprobs"] for r in recs["b"]])
    assert ((lp_b - lp_b.mean(axis=0)).argmax(1) != (lp_b - prior).argmax(1)).any()  # b's own prior would differ
    # Without calibrate_from, b takes its own prior (and a different cache key).
    own = Runner(_spec(tmp_path, "calibrate = true"), tmp_path / "out", progress=False, log=lambda *a: None)
    own.evaluate("a", "e"), own.evaluate("b", "e")
    assert own.keys["eval-e-b"] != runner.keys["eval-e-b"] and own.keys["eval-e-a"] == runner.keys["eval-e-a"]


def test_runner_takes_the_prior_from_another_evals_records(tmp_path):
    """calibrate_eval: the prior from model a's records of eval e (all 12 items), applied to eval f (the first
    5): a answers f's items exactly as it answers them in e, which is what keeps a Set G built from e wrong."""
    from reqnoise.experiment.plan import execute
    from reqnoise.experiment.runner import Runner

    extra = 'calibrate = true\n[evals.f]\nitems = "first.jsonl"\ncalibrate = true\ncalibrate_from = "a"\n'
    spec = _spec(tmp_path, extra + 'calibrate_eval = "e"\n')  # writes items.jsonl; first.jsonl is read at run time
    (tmp_path / "first.jsonl").write_text("".join((tmp_path / "items.jsonl").read_text().splitlines(True)[:5]))
    runner = Runner(spec, tmp_path / "out", progress=False, log=lambda *a: None)
    paths = {m: runner.evaluate(m, "f") for m in ("a", "b")}
    whole = runner.evaluate("a", "e")
    execute(runner.plan, runner.cache, log=lambda *a: None)
    read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]  # noqa: E731
    e_a = read(whole)
    prior = np.mean([r["option_logprobs"] for r in e_a], axis=0)  # numpy oracle: a's prior over e's 12 items
    assert [r["prediction"] for r in read(paths["a"])] == [r["prediction"] for r in e_a[:5]]
    for r in read(paths["b"]):
        assert r["prediction"] == "ABCD"[int(np.argmax(np.asarray(r["option_logprobs"]) - prior))]
    # f's own prior over its 5 items would answer differently: the option changes what is computed.
    own = Runner(_spec(tmp_path, extra), tmp_path / "out2", progress=False, log=lambda *a: None)
    own_path = own.evaluate("a", "f")
    execute(own.plan, own.cache, log=lambda *a: None)
    assert [r["prediction"] for r in read(own_path)] != [r["prediction"] for r in e_a[:5]]
    assert own.keys["eval-f-a"] != runner.keys["eval-f-a"]
