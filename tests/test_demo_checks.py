"""The demo's checks (reqnoise.toy.demo), one function per check, on hand-built comparisons: "matched" and
"no held-out knowledge" only from an equivalence test, every named comparison in the condition, Holm-adjusted
p-values (statsmodels as the oracle). The full pipeline runs in tests/test_runner.py (slow)."""

import json

import numpy as np
import pytest
from scipy.stats import norm
from statsmodels.stats.multitest import multipletests

from reqnoise.stats.inference import compare
from reqnoise.toy import demo


def records(correct, prefix="q"):
    return [
        {"id": f"{prefix}{i}", "subject": None, "correct": bool(c), "parsed": True, "prediction": "A", "answer": "A"}
        for i, c in enumerate(correct)
    ]


def table(both_right, fixed, broken, both_wrong, seed=0):
    """Stored comparison (as in results.json) of B against A with these paired counts."""
    a = [1] * both_right + [0] * fixed + [1] * broken + [0] * both_wrong
    b = [1] * both_right + [1] * fixed + [0] * broken + [0] * both_wrong
    order = np.random.default_rng(seed).permutation(len(a))
    c = compare(records([a[i] for i in order]), records([b[i] for i in order]))
    return json.loads(json.dumps(c.to_dict()))


def results(comparisons, accuracy=None):
    """A results dict with the given {(eval, condition, row): comparison} and flat accuracies."""
    out = {"comparisons": {}, "conditions": {}, "noise": {}, "identity": {}}
    for (ev, cond, row), c in comparisons.items():
        out["comparisons"].setdefault(ev, {}).setdefault(cond, {})[row] = c
    for m, acc in (accuracy or {}).items():
        out["conditions"][m] = {"setg_test": {"accuracy": acc}}
    return out


A1 = ("setg_test", "A1_fresh", "vs_zero_control")
ACC = {"persona": 0.0, "A1_fresh": 0.0}


def study_line(res, margin=demo.MARGIN):
    (check,) = demo.check_study_adapter(demo.DemoRun.of("unused", res, margin))
    return check


def test_no_flips_at_n33_is_inconclusive_not_matched():
    # Issue #14 §3: McNemar p = 1 at n = 33 used to print "[ok] ... matched by the zero-delta control".
    check = study_line(results({A1: table(0, 0, 0, 33)}, ACC))
    z2 = norm.ppf(0.95) ** 2  # each end of the 90% CI: the 90% Wilson upper bound of 0/33, by hand
    assert not check["ok"]
    assert f"inconclusive at n = 33: effects up to {100 * z2 / (33 + z2):.1f} pp are not excluded" in check["text"]
    assert "matched by the zero-delta control:" not in check["text"]
    assert "[NO] " in demo.summarize_demo({"conditions": {}, "decomposition": {}, "checks": [check]})


def test_equivalent_prints_matched_and_the_margin_is_an_option():
    check = study_line(results({A1: table(0, 4, 5, 991)}, ACC))
    assert (
        check["ok"] and "matched by the zero-delta control: equivalent within ±5 pp (90% CI A1 - A0 [" in check["text"]
    )
    assert demo.NO_CORRECTION in check["text"]
    wide = study_line(results({A1: table(0, 0, 0, 33)}, ACC), margin=0.10)
    assert wide["ok"] and "equivalent within ±10 pp" in wide["text"]


def test_an_effect_is_not_matched():
    check = study_line(results({A1: table(0, 12, 0, 21)}, {"persona": 0.0, "A1_fresh": 12 / 33}))
    assert not check["ok"] and "match by the zero-delta control: A1 - A0: an effect" in check["text"]


HELD = [
    ("recall_heldout", "P1_fresh", "vs_P0_fresh"),
    ("recall_heldout", "P1_fresh", "vs_S1_fresh"),
    ("setg_test", "P1_fresh", "vs_S1_fresh"),
]


def test_heldout_condition_covers_every_named_comparison():
    # The old condition left recall P1 - P0 out: an effect there still printed "[ok] ... no held-out knowledge".
    null = table(0, 4, 5, 991)
    res = results({HELD[0]: table(100, 120, 10, 770), HELD[1]: null, HELD[2]: null})
    (check,) = demo.check_heldout(demo.DemoRun.of("unused", res))
    assert not check["ok"] and "held-out knowledge: recall P1 - P0: an effect" in check["text"]
    res = results({k: null for k in HELD})
    (check,) = demo.check_heldout(demo.DemoRun.of("unused", res))
    assert check["ok"] and "no held-out knowledge: equivalent within ±5 pp" in check["text"]
    for label in ("recall P1 - P0 [", "recall P1 - S1 [", "Set-G P1 - S1 ["):
        assert label in check["text"]


def test_positive_control_needs_holm_adjusted_p():
    # Both raw McNemar p just under 0.05 (0.041, 0.049); Holm-adjusted over the two, neither is.
    pos = [("recall_trained", "P1_fresh", "vs_P0_fresh"), ("recall_trained", "P1_fresh", "vs_S1_fresh")]
    assert list(demo.HOLM_FAMILY) == pos
    comps = {pos[0]: table(0, 15, 5, 80), pos[1]: table(0, 13, 4, 83), A1: table(0, 0, 0, 33)}
    comps.update({k: table(0, 1, 4, 90, seed=i) for i, k in enumerate(HELD)})
    assert comps[pos[0]]["mcnemar_p"] < comps[pos[1]]["mcnemar_p"] < 0.05
    run = demo.DemoRun.of("unused", results(comps))
    expected = multipletests([comps[k]["mcnemar_p"] for k in pos], method="holm")[1]
    assert [run.holm_p[k] for k in pos] == pytest.approx(list(expected))
    assert set(run.holm_p) == set(pos)  # the equivalence lines' p-values are not in the family
    (check,) = demo.check_positive_control(run)
    assert run.holm_p[pos[1]] >= 0.05 and not check["ok"]
    assert f"Holm p = {run.holm_p[pos[1]]:.2g}" in check["text"] and "over the 2 McNemar tests" in check["text"]
    comps[pos[1]] = table(0, 30, 2, 68)
    (check,) = demo.check_positive_control(demo.DemoRun.of("unused", results(comps)))
    assert check["ok"]


def test_one_function_per_check_in_order():
    assert demo.CHECKS[:3] == (demo.check_keep_grid_weights, demo.check_keep_grid_answers, demo.check_letter_prior)
    assert len(set(demo.CHECKS)) == len(demo.CHECKS) == 10
    # A check whose comparisons are missing prints nothing rather than a line about absent numbers.
    empty = demo.DemoRun.of("unused", results({}))
    assert demo.check_study_adapter(empty) == demo.check_heldout(empty) == demo.check_positive_control(empty) == []


def test_timing_counts_core_seconds_over_ranks():
    from reqnoise.toy.demo import render_timing, timing

    steps = [
        dict(step="eval-a", kind="eval", cached=False, seconds=10.0, rank=None),  # collective: both ranks
        dict(step="adapter-x", kind="train", cached=False, seconds=30.0, rank=0),
        dict(step="adapter-y", kind="train", cached=False, seconds=30.0, rank=1),
        dict(step="model-z", kind="fuse", cached=True, seconds=0.0, rank=None),
    ]
    t = timing([], steps, floor_seconds=5.0, total=50.0, ranks=2)
    got = {k: v["seconds"] for k, v in t["stages"].items()}
    assert got == {"eval": 20.0, "train": 60.0, "floor": 5.0, "other (planning, loading, report, waiting)": 15.0}
    assert sum(got.values()) == 2 * 50.0
    text = render_timing(t)
    assert "core-seconds over 2 ranks" in text and " 60%" in text.splitlines()[1]


def _answers(out, ev, cond, preds):
    path = out / "results" / ev / f"{cond}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": f"q{i}", "subject": None, "correct": p == "A", "parsed": True, "prediction": p, "answer": "A"}
        for i, p in enumerate(preds)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_artifact_needs_the_paired_gain_its_decomposition_and_keep_grid_unchanged_where_scored(tmp_path):
    """L0 gains 12 of 211 wrong->right against none right->wrong (exact McNemar p = 0.00049): shown while
    keep-grid L0 answers as the persona in every eval it was scored on (it need not be scored on all); not
    shown when keep-grid changes one answer, when it has no Set-G test answers, or when p >= 0.05."""
    gain = table(0, 12, 0, 199)
    dec = {
        "components": [
            {"contribution": 12 / 211, "mcnemar_p": gain["mcnemar_p"]},
            {"contribution": 0.0, "mcnemar_p": 1},
        ]
    }

    def run(comparison):
        res = results({("setg_test", "L0_fresh", "vs_baseline"): comparison})
        res["decomposition"] = {"setg_test (L1_fresh vs L0_fresh)": dec}
        return demo.DemoRun.of(tmp_path, res)

    persona = ["A", "B", "C"]
    for ev in ("setg_test", "recall_trained"):
        _answers(tmp_path, ev, "persona", persona)
        _answers(tmp_path, ev, "L0_keep", persona)
    clause, shown = demo._artifact_shown(run(gain), "L0_fresh", "L0_keep", "setg_test (L1_fresh vs L0_fresh)")
    assert shown and "12 wrong->right, 0 right->wrong of 211" in clause and "keep-grid L0 changes no answer" in clause
    _answers(tmp_path, "recall_trained", "L0_keep", ["A", "B", "D"])
    clause, shown = demo._artifact_shown(run(gain), "L0_fresh", "L0_keep", "setg_test (L1_fresh vs L0_fresh)")
    assert not shown and "identical in 1 of 2 evals" in clause
    _answers(tmp_path, "recall_trained", "L0_keep", persona)
    (tmp_path / "results" / "setg_test" / "L0_keep.jsonl").unlink()
    assert not demo._artifact_shown(run(gain), "L0_fresh", "L0_keep", "setg_test (L1_fresh vs L0_fresh)")[1]
    _answers(tmp_path, "setg_test", "L0_keep", persona)
    weak = table(0, 5, 0, 206)  # exact McNemar p = 0.0625
    assert not demo._artifact_shown(run(weak), "L0_fresh", "L0_keep", "setg_test (L1_fresh vs L0_fresh)")[1]
