"""Pre-registration: safe expression language, lock file, verdict and its refusals."""

import builtins
import hashlib
import json
import os
import re
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportions_ztest

from reqnoise.errors import RefusedError, ReqnoiseError
from reqnoise.eval.records import write_records
from reqnoise.stats import prereg

PUBLISHED = 'success_if = "diff(A1, A0) >= 0.05 and ztest_p(A1, A0) < 0.05 and n >= 692"\n'


def make_records(correct, subjects=None):
    subjects = subjects or [None] * len(correct)
    return [
        {"id": f"q{i}", "subject": subjects[i], "correct": bool(c), "parsed": True, "prediction": "A", "answer": "A"}
        for i, c in enumerate(correct)
    ]


def published_arms(fixed=60, broken=55):
    """A0 with 123/692 correct and A1 with 123 - broken + fixed, in a fixed shuffled order."""
    a0 = [1] * 123 + [0] * (692 - 123)
    a1 = list(a0)
    for i in range(broken):
        a1[i] = 0
    for i in range(123, 123 + fixed):
        a1[i] = 1
    order = np.random.default_rng(0).permutation(692)
    return [a0[i] for i in order], [a1[i] for i in order]


def lock_time(lock):
    return datetime.fromisoformat(lock["locked_at"]).timestamp()


def sha256_file(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_sidecar(records_path, lock_sha, computed_at, records_sha=None):
    """A provenance file written by hand (the format of the prereg module docstring): one step, eval-X."""
    doc = {
        "format": "reqnoise-provenance/1",
        "records": records_path.name,
        "records_sha256": records_sha or sha256_file(records_path),
        "steps": {
            f"eval-{records_path.stem}": {"computed_at": computed_at, "lock_sha256": lock_sha, "reqnoise_version": "x"}
        },
    }
    records_path.with_name(records_path.stem + ".provenance.json").write_text(json.dumps(doc))


@pytest.fixture
def study(tmp_path):
    """criteria.toml + lock.json in tmp_path, results in tmp_path/results computed 10 s after the lock (their
    provenance says so) unless ``provenance=False`` (hand-made records)."""

    def build(criteria_text=PUBLISHED, arms=None, provenance=True):
        crit = tmp_path / "criteria.toml"
        crit.write_text(criteria_text, encoding="utf-8")
        lock = prereg.lock_criteria(crit, tmp_path / "lock.json")
        res = tmp_path / "results"
        res.mkdir(exist_ok=True)
        for name, correct in (arms or dict(zip(("A0", "A1"), published_arms()))).items():
            path = res / f"{name}.jsonl"
            write_records(path, make_records(correct), overwrite=True)
            t = lock_time(lock) + 10
            os.utime(path, (t, t))
            if provenance:
                when = datetime.fromtimestamp(t, UTC).isoformat()
                write_sidecar(path, sha256_file(tmp_path / "lock.json"), when)
        return tmp_path / "lock.json", res, lock

    return build


# ---------------------------------------------------------------- expression language


@pytest.mark.parametrize(
    "text,conds",
    [
        ("diff(A1, A0) >= 0.05 and mcnemar_p(A1, A0) < 0.05 and n >= 692", ["A0", "A1"]),
        ("not (acc(B) < 0.1) or fixed(B, A) - broken(B, A) > 2 * 10", ["A", "B"]),
        ("0 < se(X, Y) <= 1 and -z(X, Y) != 3", ["X", "Y"]),
        ("ci_low(A) > 0.5e-1", ["A"]),
    ],
)
def test_parser_accepts(text, conds):
    assert prereg.conditions_of(prereg.parse_expression(text)) == conds


@pytest.mark.parametrize(
    "text,msg",
    [
        ("__import__('os').system('true')", "not allowed|plain function"),
        ("__import__('os') == 0", "unknown function '__import__'"),
        ("acc(A).real > 0", "Attribute is not allowed"),
        ("acc(A).__class__ > 0", "Attribute is not allowed"),
        ("open(A) > 0", "unknown function 'open'"),
        ("eval(A) > 0", "unknown function 'eval'"),
        ("acc(__builtins__) > 0", "bad condition name"),
        ("acc(A)[0] > 0", "Subscript"),
        ("acc('A') > 0", "must be condition names"),
        ("acc(A, B) > 0", "takes 1 condition"),
        ("acc(x=A) > 0", "keyword"),
        ("(lambda: 1)() > 0", "plain function names"),
        ("[x for x in A] == 1", "ListComp"),
        ("A > 0.1", "unknown name 'A'"),
        ("acc(A)", "is a number, not a true/false"),
        ("acc(A) > 0.1 and 3", "is not a true/false"),
        ("(acc(A) > 0.1) + 1 > 0", "is not a number"),
        ("acc(A) ** 2 > 0", "only \\+ - \\* /"),
        ("acc(A) in (1, 2)", "comparison In"),
        ("True", "only numbers"),
        ("acc(n) > 0", "reserved"),
        ("acc(A) > 0; import os", "syntax error"),
        ("", "empty"),
        ("acc(A) > " + "(" * 300 + "1" + ")" * 300, "nested|syntax error|cannot parse"),
        ("acc(A) > 1" + " " * 5000, "longer than"),
    ],
)
def test_parser_rejects(text, msg):
    with pytest.raises(prereg.CriteriaSyntaxError, match=msg):
        prereg.parse_expression(text)


def test_criteria_file_rules():
    assert prereg.parse_criteria('criterion = "acc(A) > 0"').rule == "success_if"
    assert prereg.parse_criteria('kill_if = "acc(A) > 0"\nnote = "x"').fields["note"] == "x"
    with pytest.raises(ReqnoiseError, match="exactly one"):
        prereg.parse_criteria('kill_if = "acc(A) > 0"\nsuccess_if = "acc(A) > 0"')
    with pytest.raises(ReqnoiseError, match="exactly one"):
        prereg.parse_criteria('title = "nothing"')
    with pytest.raises(ReqnoiseError, match="not valid TOML"):
        prereg.parse_criteria("kill_if = ")
    with pytest.raises(ReqnoiseError, match="names no condition"):
        prereg.parse_criteria('kill_if = "1 > 0"')
    with pytest.raises(ReqnoiseError, match="'alpha'"):
        prereg.parse_criteria('kill_if = "acc(A) > 0"\nalpha = 2')


# ---------------------------------------------------------------- lock


def test_lock_contents_and_no_overwrite(tmp_path):
    crit = tmp_path / "c.toml"
    crit.write_bytes(PUBLISHED.encode())
    lock = prereg.lock_criteria(crit, tmp_path / "locks" / "lock.json")
    on_disk = json.loads((tmp_path / "locks" / "lock.json").read_text())
    assert on_disk == lock
    assert lock["criteria_sha256"] == hashlib.sha256(PUBLISHED.encode()).hexdigest()
    assert lock["criteria_text"] == PUBLISHED
    assert lock["criteria_path"] == os.path.join("..", "c.toml")
    assert lock["conditions"] == ["A0", "A1"]
    assert datetime.fromisoformat(lock["locked_at"]).utcoffset().total_seconds() == 0
    with pytest.raises(ReqnoiseError, match="already exists"):
        prereg.lock_criteria(crit, tmp_path / "locks" / "lock.json")
    assert json.loads((tmp_path / "locks" / "lock.json").read_text()) == lock  # untouched
    again = prereg.lock_criteria(crit, tmp_path / "locks" / "lock.json", overwrite=True)
    assert again["locked_at"] >= lock["locked_at"]
    assert sorted(p.name for p in (tmp_path / "locks").iterdir()) == ["lock.json"]  # no temp leftovers


def test_lock_refuses_bad_criteria(tmp_path):
    crit = tmp_path / "c.toml"
    crit.write_text('kill_if = "acc(A).real > 0"')
    with pytest.raises(ReqnoiseError, match="Attribute"):
        prereg.lock_criteria(crit, tmp_path / "lock.json")
    assert not (tmp_path / "lock.json").exists()


# ---------------------------------------------------------------- verdict


def test_verdict_published_kill(study):
    lock, res, _ = study()
    v = prereg.evaluate_lock(lock, res)
    assert v.met and not v.expression_value and v.n == 692
    z_p = proportions_ztest([128, 123], [692, 692])[1]
    assert v.numbers["diff(A1, A0)"] == pytest.approx(5 / 692)
    assert v.numbers["ztest_p(A1, A0)"] == pytest.approx(z_p, rel=1e-12)
    assert v.numbers["n"] == 692
    assert [c.result for c in v.checks] == [False, False, True]
    assert "kill criterion met" in v.text and "not met" not in v.text
    for token in ("diff(A1, A0)", "0.00722543", "ztest_p(A1, A0)", "0.727", "692"):
        assert token in v.text


def test_verdict_real_effect_not_killed(study):
    crit = PUBLISHED.replace("ztest_p", "mcnemar_p")
    lock, res, _ = study(crit, dict(zip(("A0", "A1"), published_arms(fixed=60, broken=10))))
    v = prereg.evaluate_lock(lock, res)
    assert v.expression_value and not v.met
    assert v.numbers["mcnemar_p(A1, A0)"] == pytest.approx(binomtest(10, 70, 0.5).pvalue, rel=1e-9)
    assert "kill criterion not met" in v.text


def test_kill_if_rule_and_all_numbers_reported(study):
    text = 'kill_if = "fixed(A1, A0) < 61 or broken(A1, A0) > 1000"\n'
    lock, res, _ = study(text)
    v = prereg.evaluate_lock(lock, res)
    assert v.met and v.expression_value
    assert v.numbers == {"fixed(A1, A0)": 60, "broken(A1, A0)": 55}  # no short-circuit


def test_verdict_refuses_changed_criteria(study):
    lock, res, _ = study()
    crit = lock.parent / "criteria.toml"
    crit.write_text(PUBLISHED.replace("0.05 and ztest", "0.001 and ztest"))
    with pytest.raises(RefusedError, match="changed after it was locked") as err:
        prereg.evaluate_lock(lock, res)
    assert err.value.exit_code == 2


def test_verdict_refuses_edited_lock(study):
    lock, res, _ = study()
    data = json.loads(lock.read_text())
    data["criteria_text"] = data["criteria_text"].replace(">= 0.05", ">= 0.001")
    lock.write_text(json.dumps(data))
    with pytest.raises(RefusedError, match="lock was edited"):
        prereg.evaluate_lock(lock, res)


def test_verdict_refuses_missing_criteria_file(study):
    lock, res, _ = study()
    (lock.parent / "criteria.toml").unlink()
    with pytest.raises(RefusedError, match="missing"):
        prereg.evaluate_lock(lock, res)


def test_verdict_preregistered_reads_provenance_not_file_times(study):
    lock, res, data = study()
    t = lock_time(data) - 60
    os.utime(res / "A1.jsonl", (t, t))  # a file time before the lock does not matter: provenance does
    v = prereg.evaluate_lock(lock, res)
    assert v.preregistered and v.provenance == [] and v.text.startswith("criteria: ")
    assert "NOT pre-registered" not in v.text


def test_hand_made_records_are_not_preregistered(study):
    lock, res, _ = study(provenance=False)
    v = prereg.evaluate_lock(lock, res)
    assert not v.preregistered and v.met  # still evaluated, with its numbers
    first = v.text.splitlines()[0]
    assert first.startswith("NOT pre-registered") and "2 of 2 result file(s)" in first
    assert len(v.provenance) == 2 and all("no provenance" in p for p in v.provenance)
    assert v.text.rstrip().endswith("(post hoc: NOT pre-registered)")


@pytest.mark.parametrize(
    "case,reason",
    [
        ("no lock", "eval-A1 computed .* with no lock"),
        ("other lock", "eval-A1 computed .* under another lock"),
        ("before", "eval-A1 computed .*, before the lock"),
        ("edited", "its records are not the ones computed"),
        ("garbled", "unreadable provenance"),
    ],
)
def test_results_not_computed_under_this_lock_are_not_preregistered(study, case, reason):
    lock, res, data = study()
    a1 = res / "A1.jsonl"
    locked = datetime.fromisoformat(data["locked_at"])
    after, sha = (locked + timedelta(seconds=5)).isoformat(), sha256_file(lock)
    if case == "no lock":
        write_sidecar(a1, None, after)
    elif case == "other lock":
        write_sidecar(a1, hashlib.sha256(b"another lock").hexdigest(), after)
    elif case == "before":
        write_sidecar(a1, sha, (locked - timedelta(seconds=5)).isoformat())
    elif case == "edited":
        write_records(a1, make_records(published_arms(fixed=90)[1]), overwrite=True)
    else:
        (res / "A1.provenance.json").write_text("{")
    v = prereg.evaluate_lock(lock, res)
    assert not v.preregistered and len(v.provenance) == 1
    assert re.match(f"A1.jsonl: {reason}", v.provenance[0]), v.provenance
    assert v.text.splitlines()[0].startswith("NOT pre-registered") and "1 of 2" in v.text.splitlines()[0]


def test_verdict_missing_result_and_mismatched_items(study):
    lock, res, _ = study()
    (res / "A0.jsonl").unlink()
    with pytest.raises(ReqnoiseError, match="condition A0"):
        prereg.evaluate_lock(lock, res)
    write_records(res / "A0.jsonl", make_records([1, 0, 1]))
    with pytest.raises(ReqnoiseError, match="item sets differ"):
        prereg.evaluate_lock(lock, res)


def test_never_uses_eval_or_exec(study, monkeypatch):
    lock, res, _ = study()

    def forbidden(*a, **k):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert prereg.evaluate_lock(lock, res).met


def test_paired_mde_cannot_be_met_by_having_no_flips(study):
    # Issue #14 §2: at the observed flip rate, two identical arms gave paired_mde = 0 and this rule passed.
    arm = [1] * 5 + [0] * 28
    lock, res, _ = study('success_if = "paired_mde(A1, A0) <= 0.05"\n', {"A0": arm, "A1": list(arm)})
    v = prereg.evaluate_lock(lock, res)
    z, z2 = norm.ppf(0.975) + norm.ppf(0.8), norm.ppf(0.975) ** 2
    upper = z2 / (33 + z2)  # Wilson upper bound of 0 flips in 33, by hand
    assert v.numbers["paired_mde(A1, A0)"] == pytest.approx(z * (upper / 33) ** 0.5, rel=1e-9)
    assert not v.expression_value and v.met


def test_se_clustered_needs_subjects(study):
    lock, res, _ = study('kill_if = "se_clustered(A1, A0) > 0"\n')
    with pytest.raises(ReqnoiseError, match="need a subject"):
        prereg.evaluate_lock(lock, res)
