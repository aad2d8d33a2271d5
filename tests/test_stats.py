"""reqnoise.stats.inference against published numbers, hand formulas, scipy/numpy oracles and simulation."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest, norm

from reqnoise.errors import ReqnoiseError
from reqnoise.stats import inference as stats


def make_records(correct, parsed=None, subjects=None, prefix="q"):
    """Records with ids prefix0..prefixN-1 from a correctness vector."""
    n = len(correct)
    parsed = [True] * n if parsed is None else parsed
    subjects = [None] * n if subjects is None else subjects
    return [
        {
            "id": f"{prefix}{i}",
            "subject": subjects[i],
            "correct": bool(correct[i]),
            "parsed": bool(parsed[i]),
            "prediction": "A" if parsed[i] else None,
            "answer": "A",
        }
        for i in range(n)
    ]


def paired_vectors(both_right, fixed, broken, both_wrong):
    """Correctness vectors (a, b) with the given 2x2 flip counts, in a fixed interleaved order."""
    a = [1] * both_right + [0] * fixed + [1] * broken + [0] * both_wrong
    b = [1] * both_right + [1] * fixed + [0] * broken + [0] * both_wrong
    order = np.random.default_rng(0).permutation(len(a))
    return [a[i] for i in order], [b[i] for i in order]


def wilson_upper(k, n, z=None):
    """Upper end of the Wilson score interval by its closed form (an oracle independent of statsmodels)."""
    z = norm.ppf(0.975) if z is None else z
    p = k / n
    return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)


# ---------------------------------------------------------------- published numbers


def test_published_ztest_128_vs_123_of_692():
    z, p = stats.two_proportion_ztest(128, 692, 123, 692)
    assert z == pytest.approx(0.34, abs=0.015)
    assert p == pytest.approx(0.73, abs=0.005)
    # independent oracle: pooled z by hand, two-sided normal p
    p1, p2, pool = 128 / 692, 123 / 692, 251 / 1384
    z_ref = (p1 - p2) / math.sqrt(pool * (1 - pool) * 2 / 692)
    assert z == pytest.approx(z_ref, rel=1e-12)
    assert p == pytest.approx(2 * norm.sf(z_ref), rel=1e-12)


def test_published_mcnemar_135_fixed_56_broken():
    p = stats.mcnemar(135, 56)
    assert p < 1e-6
    assert p == pytest.approx(binomtest(56, 191, 0.5).pvalue, rel=1e-9)
    assert stats.mcnemar(56, 135) == p


def test_published_mde_at_692():
    mde_u = stats.unpaired_mde(692, 0.18)
    mde_p = stats.paired_mde(692, 0.10)
    assert round(100 * mde_u, 1) == 5.8
    assert 0.032 <= mde_p <= 0.034
    z = norm.ppf(0.975) + norm.ppf(0.8)
    assert mde_u == pytest.approx(z * math.sqrt(2 * 0.18 * 0.82 / 692), rel=1e-4)  # hand formula
    assert mde_p == pytest.approx(z * math.sqrt(0.10 / 692), rel=1e-12)


@pytest.mark.parametrize("k,n,lo,hi", [(18, 20, 0.6990, 0.9721), (2, 20, 0.0279, 0.3010)])
def test_wilson_identity_scores(k, n, lo, hi):
    from statsmodels.stats.proportion import proportion_confint

    got = stats.wilson_ci(k, n)
    assert got == pytest.approx(proportion_confint(k, n, method="wilson"), abs=1e-12)
    assert got == pytest.approx((lo, hi), abs=5e-5)  # hand-computed, 4 decimals
    # Wilson's closed form as a third oracle
    z, p = norm.ppf(0.975), k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert got == pytest.approx((centre - half, centre + half), rel=1e-12)


# ---------------------------------------------------------------- power


@pytest.mark.parametrize("n,p", [(200, 0.18), (692, 0.18), (692, 0.5), (5000, 0.6)])
def test_n_needed_inverts_mde(n, p):
    assert stats.unpaired_n_needed(stats.unpaired_mde(n, p), p) == n
    assert stats.paired_n_needed(stats.paired_mde(n, 0.1), 0.1) == n
    m = stats.unpaired_mde(n, p)
    assert stats.unpaired_mde(n - 1, p) > m  # n is the smallest


def test_n_needed_known_values():
    z = norm.ppf(0.975) + norm.ppf(0.8)
    assert stats.unpaired_n_needed(0.05, 0.18) == math.ceil(2 * 0.18 * 0.82 * (z / 0.05) ** 2)
    assert stats.paired_n_needed(0.05, 0.10) == math.ceil(0.10 * (z / 0.05) ** 2)


def test_unpaired_mde_power_by_simulation():
    # Two binomial arms mde apart around p (so the average variance is ~p(1-p), the design's assumption):
    # the pooled two-proportion z-test rejects ~80% of the time.
    n, p = 692, 0.18
    mde = stats.unpaired_mde(n, p)
    rng = np.random.default_rng(1)
    reps = 20000
    k1 = rng.binomial(n, p - mde / 2, reps)
    k2 = rng.binomial(n, p + mde / 2, reps)
    pool = (k1 + k2) / (2 * n)
    z = (k2 - k1) / n / np.sqrt(pool * (1 - pool) * 2 / n)
    power = np.mean(np.abs(z) > norm.ppf(0.975))
    assert 0.78 <= power <= 0.83


def test_paired_mde_power_by_simulation():
    # Items flip with rate f; at the MDE, a McNemar normal test rejects ~80% of the time.
    n, f = 692, 0.10
    mde = stats.paired_mde(n, f)
    rng = np.random.default_rng(2)
    counts = rng.multinomial(n, [(f + mde) / 2, (f - mde) / 2, 1 - f], size=20000)
    b, c = counts[:, 0], counts[:, 1]
    z = (b - c) / np.sqrt(np.maximum(b + c, 1))
    power = np.mean(np.abs(z) > norm.ppf(0.975))
    assert 0.77 <= power <= 0.84


def test_paired_mde_refuses_zero_flip_rate():
    with pytest.raises(ReqnoiseError, match="flip_rate must be in"):
        stats.paired_mde(692, 0.0)


def test_planning_flip_rate_is_the_wilson_upper_bound():
    assert stats.planning_flip_rate(0, 33) == pytest.approx(wilson_upper(0, 33), rel=1e-12)
    assert stats.planning_flip_rate(0, 33) == pytest.approx(0.1043, abs=1e-4)
    assert stats.planning_flip_rate(115, 692) == pytest.approx(wilson_upper(115, 692), rel=1e-12)


def test_compare_identical_files_has_no_zero_mde():
    # The defect of issue #14 §2: two identical files gave "paired 0.00 pp at the observed flip rate".
    r = make_records([1] * 5 + [0] * 28)
    c = stats.compare(r, r)
    z = norm.ppf(0.975) + norm.ppf(0.8)
    assert c.paired_mde == pytest.approx(z * math.sqrt(wilson_upper(0, 33) / 33), rel=1e-9)
    assert c.paired_mde > 0.15
    text = stats.render_comparison(c)
    assert "0.00 pp at" not in text and "observed flip rate" not in text
    assert "upper end of the 95% Wilson interval of the observed discordance rate, 0 of 33" in text
    assert "95% CI of the difference" in text and "Newcombe" in text


def test_compare_declared_flip_rate():
    a, b = paired_vectors(both_right=68, fixed=60, broken=55, both_wrong=509)
    c = stats.compare(make_records(a), make_records(b), flip_rate=0.1)
    assert c.paired_mde == pytest.approx((norm.ppf(0.975) + norm.ppf(0.8)) * math.sqrt(0.1 / 692), rel=1e-12)
    assert c.paired_mde_flip_rate == 0.1 and c.paired_mde_flip_rate_source == "declared"
    assert "(declared)" in stats.render_comparison(c)


def test_power_input_errors():
    with pytest.raises(ReqnoiseError, match="p must be"):
        stats.unpaired_mde(692, 0.0)
    with pytest.raises(ReqnoiseError, match="alpha"):
        stats.paired_mde(692, 0.1, alpha=1.5)
    with pytest.raises(ReqnoiseError, match="mde"):
        stats.paired_n_needed(0.0, 0.1)


# ---------------------------------------------------------------- single tests, edge cases


@pytest.mark.parametrize(
    "both_right,fixed,broken,both_wrong,lo,hi",
    [
        # Newcombe (1998), Stat Med 17:2635-50, Table II, method 10: examples (a) and (b); 4 decimals.
        (36, 12, 2, 0, 0.0569, 0.3404),
        (263, 15, 3, 87, 0.0095, 0.0563),
        # Fagerland, Lydersen & Laake (2017), ch. 8, Cavo et al. 2012 (Newcombe square-and-add): -0.0621
        # (-0.1186 to -0.0046). Their table's first row/column is "before": A right = 59 + 6, B right = 59 + 16.
        (59, 16, 6, 80, 0.0046, 0.1186),
    ],
)
def test_paired_difference_ci_published(both_right, fixed, broken, both_wrong, lo, hi):
    got = stats.paired_difference_ci(fixed, broken, both_right, both_wrong)
    assert got == pytest.approx((lo, hi), abs=5e-5)


def test_paired_difference_ci_coverage_by_simulation():
    # 95% nominal: the hybrid score interval covers the true paired difference about 95% of the time
    # (Newcombe reports a mean coverage a little above nominal).
    n, probs = 60, [0.35, 0.15, 0.05, 0.45]  # both right, fixed, broken, both wrong
    truth = probs[1] - probs[2]
    rng = np.random.default_rng(5)
    tables = rng.multinomial(n, probs, size=2000)
    covered = 0
    for br, fx, bk, bw in tables:
        lo, hi = stats.paired_difference_ci(int(fx), int(bk), int(br), int(bw))
        covered += lo <= truth <= hi
    assert 0.93 <= covered / len(tables) <= 0.98


def test_paired_difference_ci_no_flips_is_not_a_point():
    # Identical arms: the Wald interval would be [0, 0]; the paired score interval still spans the
    # uncertainty. Both accuracies 0 of 33 (the demo's Set G): phi is 0 and each side is the Wilson upper
    # bound of 0/33, z^2 / (n + z^2).
    lo, hi = stats.paired_difference_ci(0, 0, 0, 33)
    z2 = norm.ppf(0.975) ** 2
    assert (lo, hi) == pytest.approx((-z2 / (33 + z2), z2 / (33 + z2)), rel=1e-9)
    lo, hi = stats.paired_difference_ci(0, 0, 5, 28)
    assert lo < 0 < hi and hi - lo > 0.05


def test_paired_difference_ci_input_errors():
    with pytest.raises(ReqnoiseError, match="broken must be a non-negative integer"):
        stats.paired_difference_ci(1, -1, 3, 4)
    with pytest.raises(ReqnoiseError, match="no items"):
        stats.paired_difference_ci(0, 0, 0, 0)
    with pytest.raises(ReqnoiseError, match="alpha"):
        stats.paired_difference_ci(1, 1, 1, 1, alpha=0)


def test_mcnemar_no_discordant_pairs():
    assert stats.mcnemar(0, 0) == 1.0
    assert stats.mcnemar(0, 0, exact=False) == 1.0


def test_mcnemar_chi2_matches_hand_formula():
    from scipy.stats import chi2

    b, c = 30, 12
    assert stats.mcnemar(b, c, exact=False) == pytest.approx(chi2.sf((abs(b - c) - 1) ** 2 / (b + c), 1))


def test_ztest_degenerate():
    assert stats.two_proportion_ztest(0, 10, 0, 12) == (0.0, 1.0)
    assert stats.two_proportion_ztest(10, 10, 12, 12) == (0.0, 1.0)
    with pytest.raises(ReqnoiseError):
        stats.two_proportion_ztest(11, 10, 1, 10)


def test_flips_counts():
    assert stats.flips([1, 1, 0, 0, 0], [1, 0, 1, 0, 1]) == {"fixed": 2, "broken": 1, "both_right": 1, "both_wrong": 1}
    with pytest.raises(ReqnoiseError):
        stats.flips([1, 0], [1])


# ---------------------------------------------------------------- compare


def test_compare_published_arms():
    a, b = paired_vectors(both_right=68, fixed=60, broken=55, both_wrong=509)
    assert (sum(a), sum(b), len(a)) == (123, 128, 692)
    c = stats.compare(make_records(a), make_records(b))
    assert (c.n, c.a.correct, c.b.correct, c.fixed, c.broken) == (692, 123, 128, 60, 55)
    assert c.difference == pytest.approx(5 / 692)
    assert c.ztest_p == pytest.approx(0.7272, abs=1e-4)
    assert c.z == pytest.approx(0.3488, abs=1e-4)  # positive: B is the more accurate arm
    assert c.mcnemar_p == pytest.approx(binomtest(55, 115, 0.5).pvalue, rel=1e-9)
    assert c.flip_rate == pytest.approx(115 / 692)
    # Paired MDE at the upper end of the Wilson interval of the discordance rate 115/692 (hand Wilson formula),
    # not at the observed 115/692 itself.
    assert c.paired_mde_flip_rate == pytest.approx(wilson_upper(115, 692), rel=1e-12)
    assert c.paired_mde == pytest.approx((norm.ppf(0.975) + norm.ppf(0.8)) * math.sqrt(wilson_upper(115, 692) / 692))
    assert "Wilson" in c.paired_mde_flip_rate_source and "115 of 692" in c.paired_mde_flip_rate_source
    assert c.a.ci == pytest.approx(stats.wilson_ci(123, 692))
    assert c.se_clustered is None and c.n_subjects is None


def test_compare_unparsed_counts_as_wrong():
    a = make_records([1, 1, 0, 1], parsed=[True, True, True, True])
    b = make_records([1, 1, 1, 1], parsed=[True, False, False, True])  # "correct" but unparsed -> wrong
    c = stats.compare(a, b)
    assert c.b.correct == 2 and c.b.unparsed == 2 and c.a.unparsed == 0
    assert c.broken == 1 and c.fixed == 0


def test_compare_pairs_by_id_not_position():
    a = make_records([1, 0, 0, 1])
    b = list(reversed(make_records([1, 0, 0, 1])))
    c = stats.compare(a, b)
    assert c.fixed == 0 and c.broken == 0 and c.difference == 0


def test_compare_refuses_mismatched_items():
    a = make_records([1, 0, 1])
    b = make_records([1, 0, 1])
    b[2] = dict(b[2], id="extra7")
    with pytest.raises(ReqnoiseError, match=r"'q2'.*'extra7'|'extra7'.*'q2'"):
        stats.compare(a, b)


def test_compare_refuses_duplicates():
    a = make_records([1, 0, 1])
    b = make_records([1, 0, 1])
    b[1] = dict(b[1], id="q0")
    with pytest.raises(ReqnoiseError, match="duplicated ids 'q0'"):
        stats.compare(a, b)


def test_compare_refuses_conflicting_subjects():
    a = make_records([1, 0], subjects=["law", "math"])
    b = make_records([1, 0], subjects=["law", "physics"])
    with pytest.raises(ReqnoiseError, match="'q1' has different subjects"):
        stats.compare(a, b)


def test_clustered_se_matches_cr1_by_hand():
    rng = np.random.default_rng(3)
    n = 300
    subjects = [f"s{i}" for i in rng.integers(0, 7, n)]
    a, b = rng.random(n) < 0.4, rng.random(n) < 0.5
    c = stats.compare(make_records(a, subjects=subjects), make_records(b, subjects=subjects))
    d = b.astype(float) - a.astype(float)
    e = d - d.mean()
    groups = np.array(subjects)
    sums = np.array([e[groups == g].sum() for g in np.unique(groups)])
    G = len(sums)
    cr1 = math.sqrt(G / (G - 1) * np.sum(sums**2) / n**2)  # (n-1)/(n-k) = 1 for k = 1
    assert c.n_subjects == G == 7
    assert c.se_clustered == pytest.approx(cr1, rel=1e-10)
    assert c.se_paired == pytest.approx(np.std(d, ddof=1) / math.sqrt(n), rel=1e-12)


def test_holm_against_hand_adjustment():
    p = [0.01, 0.04, 0.03, 0.2]
    reject, adj = stats.holm(p)
    order = np.argsort(p)
    m = len(p)
    ref = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        ref[i] = running
    assert adj == pytest.approx(list(ref))
    assert reject == [bool(x < 0.05) for x in ref]


def test_compare_to_baseline_holm():
    rng = np.random.default_rng(4)
    base = rng.random(400) < 0.3
    conds = {"strong": base | (rng.random(400) < 0.2), "none": base.copy(), "weak": base | (rng.random(400) < 0.02)}
    rows = stats.compare_to_baseline(make_records(base), {k: make_records(v) for k, v in conds.items()})
    assert [r.name for r in rows] == ["strong", "none", "weak"]
    _, adj = stats.holm([r.comparison.mcnemar_p for r in rows])
    assert [r.mcnemar_p_holm for r in rows] == pytest.approx(adj)
    assert rows[0].reject and not rows[1].reject
    assert rows[1].comparison.mcnemar_p == 1.0


# ---------------------------------------------------------------- decomposition


def test_decompose_published_table():
    n = 692
    base = [0] * n
    zero, trained = paired_vectors(both_right=68, fixed=60, broken=55, both_wrong=509)
    randoms = [paired_vectors(both_right=60, fixed=k, broken=63, both_wrong=n - 123 - k)[1] for k in (55, 66, 59)]
    dec = stats.decompose(
        make_records(base), make_records(trained), make_records(zero), [make_records(r) for r in randoms]
    )
    art, content, total, band = dec.components
    assert art.contribution == pytest.approx(123 / n) and total.contribution == pytest.approx(128 / n)
    assert art.share == pytest.approx(123 / 128) and content.share == pytest.approx(5 / 128)
    assert content.mcnemar_p == pytest.approx(binomtest(55, 115, 0.5).pvalue, rel=1e-9)
    assert content.ztest_p == pytest.approx(0.727, abs=1e-3)
    assert dec.random_effects == pytest.approx([(k - 63) / n for k in (55, 66, 59)])
    assert band.band == pytest.approx(((55 - 63) / n, (66 - 63) / n))
    assert dec.trained_outside_band is True  # +5 items beats the best random (+3)
    assert dec.rank_p == pytest.approx(1 / 4)
    table = stats.render_decomposition(dec)
    assert "| Requantization artifact (zero_control - base) | +17.77 pp | 96.1% |" in table
    assert "| Content-specific (trained - zero_control) | +0.72 pp | 3.9% |" in table
    assert "+18.50 pp | 100.0%" in table


def test_decompose_zero_total_has_no_shares():
    r = make_records([1, 0, 1, 0])
    dec = stats.decompose(r, r, r)
    assert all(c.share is None for c in dec.components)
    assert "—" in stats.render_decomposition(dec)


# ---------------------------------------------------------------- equivalence


def test_equivalence_three_verdicts():
    # Large n, few flips either way: the 90% CI is well inside +-5 pp.
    a, b = paired_vectors(both_right=300, fixed=10, broken=12, both_wrong=678)
    eq = stats.equivalence(stats.compare(make_records(a), make_records(b)), 0.05)
    assert eq.verdict == "equivalent" and eq.tost_ci == pytest.approx(stats.paired_difference_ci(10, 12, 300, 678, 0.1))
    assert -0.05 <= eq.tost_ci[0] and eq.tost_ci[1] <= 0.05
    assert eq.describe().startswith("equivalent within ±5 pp (90% CI [")
    # A clear gain: the 95% CI excludes 0 and reaches beyond the margin.
    a, b = paired_vectors(both_right=20, fixed=30, broken=2, both_wrong=48)
    eq = stats.equivalence(stats.compare(make_records(a), make_records(b)))
    assert eq.verdict == "effect" and eq.ci[0] > 0 and eq.excludes_zero
    assert "excludes 0" in eq.describe()
    # The demo's case: 33 items, no flips. Absence of evidence is not equivalence.
    r = make_records([0] * 33)
    eq = stats.equivalence(stats.compare(r, r))
    z2 = norm.ppf(0.95) ** 2  # 90% two-sided Wilson at 0/33, by hand
    assert eq.verdict == "inconclusive" and eq.not_excluded == pytest.approx(z2 / (33 + z2), rel=1e-9)
    assert eq.describe().startswith("inconclusive at n = 33: effects up to 7.6 pp are not excluded")
    # A wider declared margin makes the same data equivalent.
    assert stats.equivalence(stats.compare(r, r), margin=0.08).verdict == "equivalent"


def test_equivalence_reads_stored_comparisons():
    # results.json holds Comparison.to_dict() passed through JSON (tuples become lists).
    import json

    a, b = paired_vectors(both_right=300, fixed=10, broken=12, both_wrong=678)
    c = stats.compare(make_records(a), make_records(b))
    stored = json.loads(json.dumps(c.to_dict()))
    assert stats.equivalence(stored) == stats.equivalence(c)
    with pytest.raises(ReqnoiseError, match="margin"):
        stats.equivalence(c, margin=5)
    with pytest.raises(ReqnoiseError, match="need a comparison"):
        stats.equivalence({"difference": 0.1})


def test_equivalence_tost_size_by_simulation():
    # At a true difference exactly on the margin, TOST at alpha = 0.05 calls "equivalent" at most ~5% of the
    # time (the level of the test), however large n is.
    n, margin = 400, 0.05
    probs = [0.3, 0.125, 0.075, 0.5]  # fixed - broken = 0.05 = the margin
    rng = np.random.default_rng(6)
    hits = 0
    tables = rng.multinomial(n, probs, size=1500)
    for br, fx, bk, bw in tables:
        lo, hi = stats.paired_difference_ci(int(fx), int(bk), int(br), int(bw), alpha=0.1)
        hits += -margin <= lo and hi <= margin
    assert hits / len(tables) <= 0.065


# ---------------------------------------------------------------- properties


@st.composite
def record_pair(draw):
    n = draw(st.integers(1, 40))
    bits = st.lists(st.booleans(), min_size=n, max_size=n)
    a, b, pa, pb = draw(bits), draw(bits), draw(bits), draw(bits)
    subj = draw(st.one_of(st.none(), st.lists(st.sampled_from("xyz"), min_size=n, max_size=n)))
    return make_records(a, pa, subj), make_records(b, pb, subj)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record_pair())
def test_compare_with_itself_is_null(pair):
    a, _ = pair
    c = stats.compare(a, a)
    assert c.difference == 0 and c.fixed == 0 and c.broken == 0
    assert c.ztest_p == 1.0 and c.mcnemar_p == 1.0 and c.z == 0.0
    assert c.paired_mde > 0 and c.difference_ci[0] < 0 < c.difference_ci[1]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record_pair())
def test_swapping_arms_flips_sign_keeps_p(pair):
    a, b = pair
    ab, ba = stats.compare(a, b), stats.compare(b, a)
    assert np.sign(ab.z) == np.sign(ab.difference)
    assert ab.difference == -ba.difference
    assert ab.z == pytest.approx(-ba.z, abs=1e-12)
    assert ab.ztest_p == pytest.approx(ba.ztest_p, rel=1e-12)
    assert ab.mcnemar_p == pytest.approx(ba.mcnemar_p, rel=1e-12)
    assert (ab.fixed, ab.broken) == (ba.broken, ba.fixed)
    assert ab.difference_ci == pytest.approx((-ba.difference_ci[1], -ba.difference_ci[0]), abs=1e-12)
    assert ab.difference_ci[0] <= ab.difference <= ab.difference_ci[1]
    assert ab.a == ba.b and ab.b == ba.a
    if ab.se_clustered is not None:
        assert ab.se_clustered == pytest.approx(ba.se_clustered, rel=1e-9, abs=1e-15)
