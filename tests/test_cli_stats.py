"""CLI smoke tests for compare, power, decompose, preregister and verdict through reqnoise.cli.main."""

import json
import os
from datetime import datetime

import numpy as np
import pytest
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

from reqnoise.cli import main
from reqnoise.eval.records import write_records


def write_arm(path, correct, subjects=None):
    subjects = subjects or [None] * len(correct)
    write_records(
        path,
        [
            {
                "id": f"q{i}",
                "subject": subjects[i],
                "correct": bool(c),
                "parsed": True,
                "prediction": "A",
                "answer": "A",
            }
            for i, c in enumerate(correct)
        ],
    )


@pytest.fixture
def arms(tmp_path):
    """A0 123/692, A1 128/692 (60 fixed, 55 broken), base 0/692, with 14 subjects."""
    rng = np.random.default_rng(0)
    order = rng.permutation(692)
    a0 = np.zeros(692, bool)
    a0[order[:123]] = True
    a1 = a0.copy()
    a1[order[:55]] = False
    a1[order[123:183]] = True
    subjects = [f"s{i % 14}" for i in range(692)]
    paths = {}
    for name, c in (("A0", a0), ("A1", a1), ("base", np.zeros(692, bool))):
        paths[name] = tmp_path / f"{name}.jsonl"
        write_arm(paths[name], c, subjects)
    return paths


def test_compare_text_and_json(arms, capsys):
    assert main(["compare", str(arms["A0"]), str(arms["A1"])]) == 0
    out = capsys.readouterr().out
    for token in (
        "692",
        "17.77%",
        "18.50%",
        "+0.72 pp",
        "p = 0.727",
        "fixed 60",
        "broken 55",
        "clustered by subject (14)",
        "MDE",
    ):
        assert token in out
    assert main(["compare", str(arms["A0"]), str(arms["A1"]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["n"] == 692 and d["fixed"] == 60 and d["broken"] == 55
    assert d["b"]["ci"] == pytest.approx(list(proportion_confint(128, 692, method="wilson")))
    assert d["ztest_p"] == pytest.approx(0.7272, abs=1e-4)
    assert d["difference_ci_method"].startswith("Newcombe hybrid score")
    assert d["difference_ci"][0] < d["difference"] < d["difference_ci"][1]
    assert "equivalence" not in d


def test_compare_identical_files_reports_a_ci_not_a_zero_mde(arms, capsys):
    # Issue #14 §2: this printed "MDE ... paired 0.00 pp at the observed flip rate".
    assert main(["compare", str(arms["A0"]), str(arms["A0"])]) == 0
    out = capsys.readouterr().out
    assert "0.00 pp at" not in out and "observed flip rate" not in out
    assert "95% CI of the difference: [" in out and "Newcombe hybrid score interval for paired data" in out
    assert "observed discordance rate, 0 of 692" in out
    assert main(["compare", str(arms["A0"]), str(arms["A0"]), "--json", "--flip-rate", "0.1", "--margin", "0.05"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["paired_mde_flip_rate"] == 0.1 and d["paired_mde_flip_rate_source"] == "declared"
    assert d["paired_mde"] == pytest.approx((norm.ppf(0.975) + norm.ppf(0.8)) * (0.1 / 692) ** 0.5, rel=1e-12)
    lo, hi = d["difference_ci"]
    assert lo < 0 < hi
    assert d["equivalence"]["verdict"] == "equivalent"  # 692 items, no flips: inside +-5 pp
    assert main(["compare", str(arms["A0"]), str(arms["A1"]), "--margin", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "equivalence (TOST, alpha 0.05): " in out


def test_compare_refuses_bad_fractions(arms, capsys):
    for opt in ("--flip-rate", "--margin"):
        with pytest.raises(SystemExit):
            main(["compare", str(arms["A0"]), str(arms["A1"]), opt, "0"])
        assert "expected a fraction in (0, 1]" in capsys.readouterr().err


def test_compare_refuses_mismatch(arms, tmp_path, capsys):
    other = tmp_path / "short.jsonl"
    write_arm(other, [True] * 10)
    assert main(["compare", str(arms["A0"]), str(other)]) == 1
    err = capsys.readouterr().err
    assert "item sets differ" in err and "'q10'" in err


def test_power_mde_and_n(capsys):
    assert main(["power", "--n", "692", "--p", "0.18", "--flip-rate", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "5.79 pp" in out and "3.37 pp" in out
    assert main(["power", "--mde", "0.05", "--p", "0.18", "--flip-rate", "0.1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["unpaired_n"] == 927 and d["paired_n"] == 314
    assert main(["power", "--n", "692"]) == 1
    assert "--flip-rate" in capsys.readouterr().err


def test_decompose_table(arms, capsys):
    assert (
        main(
            [
                "decompose",
                "--base",
                str(arms["base"]),
                "--trained",
                str(arms["A1"]),
                "--zero-control",
                str(arms["A0"]),
                "--random-control",
                str(arms["A0"]),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| Requantization artifact (zero_control - base) | +17.77 pp | 96.1% |" in out
    assert "| Content-specific (trained - zero_control) | +0.72 pp | 3.9% |" in out
    assert "R=1" in out


def test_preregister_and_verdict(arms, tmp_path, capsys):
    crit = tmp_path / "criteria.toml"
    crit.write_text('title = "Set-G"\nsuccess_if = "diff(A1, A0) >= 0.05 and ztest_p(A1, A0) < 0.05 and n >= 692"\n')
    lock = tmp_path / "lock.json"
    assert main(["preregister", str(crit), "--out", str(lock)]) == 0
    assert "SHA-256" in capsys.readouterr().out
    assert main(["preregister", str(crit), "--out", str(lock)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["preregister", str(crit), "--out", str(lock), "--overwrite"]) == 0
    capsys.readouterr()

    res = tmp_path / "results"
    res.mkdir()
    t = datetime.fromisoformat(json.loads(lock.read_text())["locked_at"]).timestamp()
    for name in ("A0", "A1"):
        (res / f"{name}.jsonl").write_bytes(arms[name].read_bytes())
        os.utime(res / f"{name}.jsonl", (t + 5, t + 5))
    assert main(["verdict", str(lock), "--results", str(res)]) == 0
    out = capsys.readouterr().out
    assert "kill criterion met" in out and "diff(A1, A0)" in out and "0.727" in out
    # Hand-made records carry no provenance: the verdict says, first, that it is not a pre-registered one.
    assert out.startswith("NOT pre-registered")

    assert main(["verdict", str(lock), "--results", str(res), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["met"] is True and d["numbers"]["n"] == 692
    assert d["preregistered"] is False and "A0.jsonl" in d["provenance"][0]

    crit.write_text(crit.read_text().replace("0.05 and z", "0.01 and z"))
    assert main(["verdict", str(lock), "--results", str(res)]) == 2
    assert "changed after it was locked" in capsys.readouterr().err
