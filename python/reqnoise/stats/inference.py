"""Statistics for per-item evaluation records: is a difference between two conditions real, and could the
design have seen it?

Conventions (all functions):

* Accuracies, differences, MDEs and standard errors are fractions (0.05 = 5 percentage points); only the
  renderers print percentage points.
* An item counts as correct only when its record has ``correct`` true *and* ``parsed`` true: an unparsed
  answer is wrong for accuracy, and the number of unparsed answers is reported separately.
* ``compare(a, b)`` reads "from A to B": ``difference = acc(B) - acc(A)``, *fixed* = wrong in A and right in
  B, *broken* = right in A and wrong in B. A is the reference (baseline / control).
* Items are paired by ``id``. Both arms must hold exactly the same ids, each once.

Tests come from statsmodels / scipy: Wilson intervals (``proportion_confint``), the pooled two-proportion
z-test (``proportions_ztest``, the unpaired test the published study used), McNemar's test
(``contingency_tables.mcnemar``, the paired test for the same items in both arms), cluster-robust standard
errors (``OLS(...).fit(cov_type="cluster")``) and Holm's correction (``multipletests``). Written out by hand,
because statsmodels 0.15 lacks them: the paired MDE, and the confidence interval of a paired difference of
proportions (Newcombe's hybrid score interval for paired data, built on statsmodels' Wilson intervals).

No number here is "observed power": the paired MDE of a comparison is taken at a planning flip rate that is
either declared or the upper confidence bound of the observed discordance rate (never 0), and "no effect" is
only ever said by ``equivalence`` (the paired CI inside a declared margin).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from reqnoise.errors import ReqnoiseError
from reqnoise.eval.records import validate_record

ALPHA = 0.05
POWER = 0.8


# ---------------------------------------------------------------- single tests


def _check_count(k, n, what="count"):
    if not (isinstance(n, (int, np.integer)) and n > 0):
        raise ReqnoiseError(f"{what}: n must be a positive integer, got {n!r}")
    if not (isinstance(k, (int, np.integer)) and 0 <= k <= n):
        raise ReqnoiseError(f"{what}: k must be an integer in [0, {n}], got {k!r}")


def wilson_ci(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Wilson score interval (lower, upper) for k successes out of n, coverage 1 - alpha."""
    from statsmodels.stats.proportion import proportion_confint

    _check_count(k, n, "wilson_ci")
    lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson")
    return float(lo), float(hi)


def two_proportion_ztest(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """Pooled two-sided z-test of k1/n1 against k2/n2 (independent samples); returns (z, p), z > 0 when
    k1/n1 > k2/n2.

    When the pooled proportion is 0 or 1 both samples are identical and the test statistic is 0/0; that case
    returns (0.0, 1.0) instead of NaN.
    """
    from statsmodels.stats.proportion import proportions_ztest

    _check_count(k1, n1, "two_proportion_ztest (first sample)")
    _check_count(k2, n2, "two_proportion_ztest (second sample)")
    if k1 + k2 in (0, n1 + n2):
        return 0.0, 1.0
    z, p = proportions_ztest([k1, k2], [n1, n2], alternative="two-sided")
    return float(z), float(p)


def mcnemar(b: int, c: int, exact: bool = True) -> float:
    """Two-sided McNemar p for b discordant pairs one way and c the other (exact binomial by default,
    otherwise chi-square with continuity correction). b + c = 0 (no discordant pairs) gives p = 1."""
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    for name, v in (("b", b), ("c", c)):
        if not (isinstance(v, (int, np.integer)) and v >= 0):
            raise ReqnoiseError(f"mcnemar: {name} must be a non-negative integer, got {v!r}")
    if b + c == 0:
        return 1.0
    res = sm_mcnemar([[0, b], [c, 0]], exact=exact, correction=True)
    return float(min(1.0, res.pvalue))


# ---------------------------------------------------------------- power


def _check_design(alpha, power):
    if not 0 < alpha < 1:
        raise ReqnoiseError(f"alpha must be in (0, 1), got {alpha!r}")
    if not 0 < power < 1:
        raise ReqnoiseError(f"power must be in (0, 1), got {power!r}")


def _check_rate(p, name):
    if not 0 < p < 1:
        raise ReqnoiseError(f"{name} must be in (0, 1), got {p!r}")


def unpaired_mde(n: int, p: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest difference in accuracy (fraction) that a two-sided two-proportion test with n items per arm
    detects with the given power, for accuracies around p.

    Approximation: normal test with the same Bernoulli variance p(1-p) in both arms, i.e. statsmodels'
    ``NormalIndPower`` solved for the standardized effect d = mde / sqrt(p(1-p)). Equivalent to
    (z_{1-a/2} + z_{power}) * sqrt(2 p (1-p) / n). (Cohen's arcsine h would give a direction-dependent answer:
    at n=692, p=0.18 it is 6.1 pp upward and 5.4 pp downward against 5.8 pp here.)
    """
    from statsmodels.stats.power import NormalIndPower

    _check_design(alpha, power)
    _check_rate(p, "p")
    if n < 2:
        raise ReqnoiseError(f"unpaired_mde: n must be at least 2, got {n!r}")
    d = NormalIndPower().solve_power(effect_size=None, nobs1=n, alpha=alpha, power=power, ratio=1.0)
    return float(d) * math.sqrt(p * (1 - p))


def unpaired_n_needed(mde: float, p: float, alpha: float = ALPHA, power: float = POWER) -> int:
    """Items per arm (rounded up) for ``unpaired_mde(n, p, alpha, power) <= mde``; same approximation."""
    from statsmodels.stats.power import NormalIndPower

    _check_design(alpha, power)
    _check_rate(p, "p")
    if not 0 < mde < 1:
        raise ReqnoiseError(f"mde must be in (0, 1), got {mde!r}")
    d = mde / math.sqrt(p * (1 - p))
    n = max(
        2, _ceil(float(NormalIndPower().solve_power(effect_size=d, nobs1=None, alpha=alpha, power=power, ratio=1.0)))
    )
    # The root finder is good to ~1e-3 items; step so that n is the smallest with unpaired_mde <= mde.
    while unpaired_mde(n, p, alpha, power) > mde * (1 + 1e-9):
        n += 1
    while n > 2 and unpaired_mde(n - 1, p, alpha, power) <= mde * (1 + 1e-9):
        n -= 1
    return n


def _z_sum(alpha, power):
    from scipy.stats import norm

    return float(norm.ppf(1 - alpha / 2) + norm.ppf(power))


def _ceil(x: float) -> int:
    # The solvers return e.g. 691.9999999997 for an exact 692; don't round that up to 693.
    return int(math.ceil(x - 1e-6))


def paired_mde(n: int, flip_rate: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Smallest paired difference in accuracy (fraction) detectable on n items scored in both arms, when a
    fraction ``flip_rate`` of items changes correctness between arms (discordant pairs):
    (z_{1-a/2} + z_{power}) * sqrt(flip_rate / n). Normal approximation to McNemar's test, variance of the
    per-item difference taken under the null (flip_rate); statsmodels has no paired-proportion power.

    ``flip_rate`` is a planning value in (0, 1]: a flip rate of 0 would claim that any effect is detectable.
    For a finished comparison use ``planning_flip_rate`` rather than the observed rate."""
    _check_design(alpha, power)
    if not 0 < flip_rate <= 1:
        raise ReqnoiseError(
            f"flip_rate must be in (0, 1] (a planning value; 0 makes every effect 'detectable'), got {flip_rate!r}"
        )
    if n < 1:
        raise ReqnoiseError(f"paired_mde: n must be positive, got {n!r}")
    return _z_sum(alpha, power) * math.sqrt(flip_rate / n)


def planning_flip_rate(discordant: int, n: int, alpha: float = ALPHA) -> float:
    """Upper end of the two-sided (1 - alpha) Wilson interval of the discordance rate ``discordant / n``: a
    flip rate to plan with that the comparison's own luck cannot push to 0 (0 of 33 discordant gives 0.104)."""
    return wilson_ci(discordant, n, alpha)[1]


def paired_n_needed(mde: float, flip_rate: float, alpha: float = ALPHA, power: float = POWER) -> int:
    """Items (rounded up) for ``paired_mde(n, flip_rate, alpha, power) <= mde``."""
    _check_design(alpha, power)
    _check_rate(flip_rate, "flip_rate")
    if not 0 < mde < 1:
        raise ReqnoiseError(f"mde must be in (0, 1), got {mde!r}")
    return max(1, _ceil(flip_rate * (_z_sum(alpha, power) / mde) ** 2))


# ---------------------------------------------------------------- pairing records


def flips(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict[str, int]:
    """Paired 2x2 counts for item-aligned correctness vectors: fixed (A wrong, B right), broken (A right,
    B wrong), both_right, both_wrong."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ReqnoiseError(f"flips: need two 1-D vectors of equal length, got shapes {a.shape} and {b.shape}")
    return {
        "fixed": int(np.sum(~a & b)),
        "broken": int(np.sum(a & ~b)),
        "both_right": int(np.sum(a & b)),
        "both_wrong": int(np.sum(~a & ~b)),
    }


NEWCOMBE_PAIRED = "Newcombe hybrid score interval for paired data (Newcombe 1998, method 10)"


def paired_difference_ci(
    fixed: int, broken: int, both_right: int, both_wrong: int, alpha: float = ALPHA
) -> tuple[float, float]:
    """Two-sided (1 - alpha) confidence interval (fractions) of acc(B) - acc(A) = (fixed - broken) / n on n
    paired items, by Newcombe's hybrid score interval for paired data (Stat Med 1998;17:2635-50, method 10).

    It combines the Wilson intervals of the two marginal accuracies (statsmodels) with the correlation phi of
    the paired 2x2 table; phi is shrunk towards 0 by n/2 in ad - bc when positive, as Newcombe specifies. Unlike
    a Wald interval it does not collapse to a point when there are no discordant pairs: with 0 flips on n items
    it still spans the uncertainty of the accuracies."""
    counts = {"fixed": fixed, "broken": broken, "both_right": both_right, "both_wrong": both_wrong}
    for name, v in counts.items():
        if not (isinstance(v, (int, np.integer)) and v >= 0):
            raise ReqnoiseError(f"paired_difference_ci: {name} must be a non-negative integer, got {v!r}")
    if not 0 < alpha < 1:
        raise ReqnoiseError(f"alpha must be in (0, 1), got {alpha!r}")
    n = fixed + broken + both_right + both_wrong
    if n == 0:
        raise ReqnoiseError("paired_difference_ci: no items")
    # Newcombe's table: a both right, b right only in B, c right only in A, d both wrong; theta = p1 - p2.
    a, b, c, d = both_right, fixed, broken, both_wrong
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson_ci(a + b, n, alpha)
    l2, u2 = wilson_ci(a + c, n, alpha)
    # statsmodels' Wilson bounds can miss the estimate by a rounding error at k = 0 or n.
    l1, u1, l2, u2 = min(l1, p1), max(u1, p1), min(l2, p2), max(u2, p2)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    if margins == 0:
        phi = 0.0
    elif cross > n / 2:
        phi = (cross - n / 2) / math.sqrt(margins)
    elif cross >= 0:
        phi = 0.0
    else:
        phi = cross / math.sqrt(margins)
    theta = p1 - p2
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, theta - below), min(1.0, theta + above)


def _id_list(ids, limit=10):
    ids = sorted(ids)
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f", ... and {len(ids) - limit} more" if len(ids) > limit else "")


def _index(records, name):
    counts = Counter()
    by_id = {}
    for i, rec in enumerate(records):
        validate_record(rec, f"{name} record {i}")
        counts[rec["id"]] += 1
        by_id[rec["id"]] = rec
    dups = [i for i, c in counts.items() if c > 1]
    if dups:
        raise ReqnoiseError(f"{name}: duplicated ids {_id_list(dups)}")
    if not by_id:
        raise ReqnoiseError(f"{name}: no records")
    return by_id


@dataclass(frozen=True)
class Paired:
    """Item-aligned view of several record sets (same ids, order of the first set)."""

    ids: list
    correct: dict  # name -> bool array (correct and parsed)
    unparsed: dict  # name -> int
    subjects: list | None  # per item, or None when some item has no subject in any arm


def pair_records(named: Mapping[str, Sequence[dict]]) -> Paired:
    """Align record sets by id. Refuses duplicated ids and item sets that differ (naming the ids missing on
    each side) and subjects that disagree between arms for the same id."""
    names = list(named)
    indexed = {name: _index(named[name], name) for name in names}
    ref = names[0]
    ref_ids = set(indexed[ref])
    for name in names[1:]:
        ids = set(indexed[name])
        if ids != ref_ids:
            parts = []
            if ref_ids - ids:
                parts.append(f"{len(ref_ids - ids)} ids in {ref} missing from {name}: {_id_list(ref_ids - ids)}")
            if ids - ref_ids:
                parts.append(f"{len(ids - ref_ids)} ids in {name} missing from {ref}: {_id_list(ids - ref_ids)}")
            raise ReqnoiseError(f"item sets differ ({'; '.join(parts)})")
    ids = [r["id"] for r in named[ref]]
    correct, unparsed = {}, {}
    for name in names:
        recs = [indexed[name][i] for i in ids]
        correct[name] = np.array([bool(r["correct"] and r["parsed"]) for r in recs], dtype=bool)
        unparsed[name] = sum(1 for r in recs if not r["parsed"])
    subjects = []
    for i in ids:
        seen = {indexed[name][i]["subject"] for name in names} - {None}
        if len(seen) > 1:
            raise ReqnoiseError(f"item {i!r} has different subjects across arms: {sorted(seen)}")
        subjects.append(seen.pop() if seen else None)
    if any(s is None for s in subjects):
        subjects = None
    return Paired(ids=ids, correct=correct, unparsed=unparsed, subjects=subjects)


# ---------------------------------------------------------------- comparison


@dataclass
class Arm:
    """One condition's score on the paired items."""

    correct: int
    unparsed: int
    accuracy: float
    ci: tuple[float, float]  # Wilson interval, coverage 1 - alpha


@dataclass
class Comparison:
    """B against A on the same n items; differences are B - A (fractions)."""

    n: int
    a: Arm
    b: Arm
    difference: float
    z: float
    ztest_p: float  # pooled two-proportion z-test, unpaired
    mcnemar_p: float  # exact McNemar, paired
    fixed: int  # A wrong -> B right
    broken: int  # A right -> B wrong
    both_right: int
    both_wrong: int
    flip_rate: float  # (fixed + broken) / n
    difference_ci: tuple[float, float]  # coverage 1 - alpha, by difference_ci_method
    difference_ci_method: str
    se_paired: float | None  # iid SE of the paired difference, sd(d_i) / sqrt(n)
    se_clustered: float | None  # cluster-robust (by subject) SE of the paired difference
    n_subjects: int | None
    paired_mde: float  # at paired_mde_flip_rate, never at the observed flip rate
    paired_mde_flip_rate: float
    paired_mde_flip_rate_source: str  # "declared" or how it was bounded from the observed discordance
    unpaired_mde: float | None  # at A's accuracy; None when that accuracy is 0 or 1
    alpha: float = ALPHA
    power: float = POWER

    def to_dict(self) -> dict:
        return asdict(self)


def _arm(k, unparsed, n, alpha):
    return Arm(correct=k, unparsed=unparsed, accuracy=k / n, ci=wilson_ci(k, n, alpha))


def paired_se(diff: np.ndarray, subjects: Sequence | None) -> tuple[float | None, float | None, int | None]:
    """(iid SE, cluster-robust SE, number of clusters) of the mean of per-item differences ``diff``
    (shape (n,), values in {-1, 0, 1}). The clustered SE is statsmodels' CR1 sandwich from OLS on a constant
    with ``cov_type='cluster'``; it is None without subjects or with fewer than two subjects. Both are None
    for a single item."""
    import statsmodels.api as sm

    n = len(diff)
    se = float(np.std(diff, ddof=1) / math.sqrt(n)) if n > 1 else None
    if subjects is None or n < 2:
        return se, None, None
    _, groups = np.unique(np.asarray(subjects, dtype=object).astype(str), return_inverse=True)
    n_groups = int(groups.max()) + 1
    if n_groups < 2:
        return se, None, n_groups
    fit = sm.OLS(diff.astype(float), np.ones((n, 1))).fit(cov_type="cluster", cov_kwds={"groups": groups})
    return se, float(fit.bse[0]), n_groups


def compare_paired(
    paired: Paired, name_a, name_b, alpha: float = ALPHA, power: float = POWER, flip_rate: float | None = None
) -> Comparison:
    """Compare arm ``name_b`` with reference ``name_a`` of already aligned records (see ``compare``).

    ``flip_rate``: a declared planning flip rate for the paired MDE; None takes the upper end of the (1 - alpha)
    Wilson interval of the observed discordance rate."""
    ca, cb = paired.correct[name_a], paired.correct[name_b]
    n = len(paired.ids)
    ka, kb = int(ca.sum()), int(cb.sum())
    f = flips(ca, cb)
    z, zp = two_proportion_ztest(kb, n, ka, n)
    discordant = f["fixed"] + f["broken"]
    se, se_cl, n_subj = paired_se(cb.astype(int) - ca.astype(int), paired.subjects)
    acc_a = ka / n
    if flip_rate is None:
        plan = planning_flip_rate(discordant, n, alpha)
        source = (
            f"upper end of the {100 * (1 - alpha):g}% Wilson interval of the observed discordance rate, "
            f"{discordant} of {n}"
        )
    else:
        plan, source = flip_rate, "declared"
    return Comparison(
        n=n,
        a=_arm(ka, paired.unparsed[name_a], n, alpha),
        b=_arm(kb, paired.unparsed[name_b], n, alpha),
        difference=(kb - ka) / n,
        z=z,
        ztest_p=zp,
        mcnemar_p=mcnemar(f["fixed"], f["broken"]),
        fixed=f["fixed"],
        broken=f["broken"],
        both_right=f["both_right"],
        both_wrong=f["both_wrong"],
        flip_rate=discordant / n,
        difference_ci=paired_difference_ci(f["fixed"], f["broken"], f["both_right"], f["both_wrong"], alpha),
        difference_ci_method=NEWCOMBE_PAIRED,
        se_paired=se,
        se_clustered=se_cl,
        n_subjects=n_subj,
        paired_mde=paired_mde(n, plan, alpha, power),
        paired_mde_flip_rate=plan,
        paired_mde_flip_rate_source=source,
        unpaired_mde=unpaired_mde(n, acc_a, alpha, power) if 0 < acc_a < 1 and n >= 2 else None,
        alpha=alpha,
        power=power,
    )


def compare(
    records_a: Sequence[dict],
    records_b: Sequence[dict],
    alpha: float = ALPHA,
    power: float = POWER,
    flip_rate: float | None = None,
) -> Comparison:
    """Compare condition B with reference A on the same items (paired by id).

    Returns accuracies with Wilson CIs, difference B - A with its paired (1 - alpha) CI (Newcombe's hybrid
    score), the unpaired z-test and the paired exact McNemar p, flip counts, the paired MDE at a planning flip
    rate (``flip_rate`` if declared, else the upper Wilson bound of the observed discordance rate), the unpaired
    MDE at A's accuracy, and the SE of the paired difference (iid, and clustered by subject when every item has
    one).
    """
    return compare_paired(pair_records({"A": records_a, "B": records_b}), "A", "B", alpha, power, flip_rate)


# ---------------------------------------------------------------- equivalence

MARGIN = 0.05  # the published study's 5 pp


@dataclass
class Equivalence:
    """Is B - A inside [-margin, +margin]? (fractions)

    * ``equivalent``: the (1 - 2 alpha) paired CI lies inside the margin: TOST at level alpha, since each end of
      that two-sided interval is a one-sided (1 - alpha) bound and so each of the two one-sided tests rejects;
    * ``effect``: not equivalent, and the (1 - alpha) paired CI (the one ``compare`` reports) excludes 0;
    * ``inconclusive``: neither. ``not_excluded`` is then the largest |effect| the TOST interval still allows,
      i.e. the smallest margin at which this comparison would have been called equivalent.

    A difference can be detected (``excludes_zero``) and still be equivalent: smaller than the margin.
    """

    verdict: str  # "equivalent" | "effect" | "inconclusive"
    n: int
    margin: float
    alpha: float
    difference: float
    tost_ci: tuple[float, float]  # coverage 1 - 2 alpha
    ci: tuple[float, float]  # coverage 1 - alpha
    excludes_zero: bool  # by the (1 - alpha) CI
    not_excluded: float  # max |end| of tost_ci

    def describe(self) -> str:
        """One clause for a printed line, in pp."""
        tost = f"{100 * (1 - 2 * self.alpha):g}% CI [{100 * self.tost_ci[0]:+.1f}, {100 * self.tost_ci[1]:+.1f}] pp"
        if self.verdict == "equivalent":
            return f"equivalent within ±{100 * self.margin:g} pp ({tost})"
        if self.verdict == "effect":
            return (
                f"an effect: the {100 * (1 - self.alpha):g}% CI [{100 * self.ci[0]:+.1f}, {100 * self.ci[1]:+.1f}] "
                "pp excludes 0"
            )
        return (
            f"inconclusive at n = {self.n}: effects up to {100 * self.not_excluded:.1f} pp are not excluded "
            f"({tost}; margin ±{100 * self.margin:g} pp)"
        )

    def to_dict(self) -> dict:
        return asdict(self)


def classify_interval(tost_ci, ci, margin: float) -> str:
    """The rule of ``Equivalence`` on given intervals (fractions): "equivalent" when ``tost_ci`` (coverage
    1 - 2 alpha) lies inside [-margin, +margin], bounds included; else "effect" when ``ci`` (coverage 1 - alpha)
    excludes 0; else "inconclusive". The one place the three words are decided: the printed checks, the
    report and the figures all come here."""
    (tlo, thi), (lo, hi) = tost_ci, ci
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (tlo, thi, lo, hi)) or tlo > thi or lo > hi:
        raise ReqnoiseError(f"not confidence intervals: {tost_ci!r}, {ci!r}")
    if not margin > 0:
        raise ReqnoiseError(f"equivalence margin must be > 0, got {margin!r}")
    if -margin <= tlo and thi <= margin:
        return "equivalent"
    if lo > 0 or hi < 0:
        return "effect"
    return "inconclusive"


def equivalence(comparison, margin: float = MARGIN, alpha: float | None = None) -> Equivalence:
    """Equivalence of B and A within ``margin`` (fraction, e.g. 0.05) from a ``Comparison`` or its ``to_dict()``
    (as stored in results.json). ``alpha`` defaults to the comparison's; see ``Equivalence`` for the rule."""
    c = comparison.to_dict() if isinstance(comparison, Comparison) else comparison
    if not (isinstance(margin, (int, float)) and 0 < margin < 1):
        raise ReqnoiseError(f"equivalence margin must be a fraction in (0, 1), got {margin!r}")
    try:
        counts = [c[k] for k in ("fixed", "broken", "both_right", "both_wrong")]
        alpha = c.get("alpha", ALPHA) if alpha is None else alpha
    except (KeyError, TypeError, AttributeError):
        raise ReqnoiseError("equivalence: need a comparison with fixed, broken, both_right and both_wrong") from None
    if not 0 < alpha < 0.5:
        raise ReqnoiseError(f"equivalence: alpha must be in (0, 0.5), got {alpha!r}")
    tost = paired_difference_ci(*counts, alpha=2 * alpha)
    ci = paired_difference_ci(*counts, alpha=alpha)
    excludes_zero = ci[0] > 0 or ci[1] < 0
    return Equivalence(
        verdict=classify_interval(tost, ci, margin),
        n=sum(counts),
        margin=float(margin),
        alpha=float(alpha),
        difference=(counts[0] - counts[1]) / sum(counts),
        tost_ci=tost,
        ci=ci,
        excludes_zero=excludes_zero,
        not_excluded=max(abs(tost[0]), abs(tost[1])),
    )


@dataclass
class BaselineRow:
    """One condition against the shared baseline, with Holm-adjusted p-values over all conditions."""

    name: str
    comparison: Comparison
    mcnemar_p_holm: float
    ztest_p_holm: float
    reject: bool  # Holm-adjusted McNemar p < alpha


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> tuple[list[bool], list[float]]:
    """Holm step-down adjustment (statsmodels ``multipletests``): (reject at alpha, adjusted p-values)."""
    from statsmodels.stats.multitest import multipletests

    if len(pvalues) == 0:
        return [], []
    reject, adjusted, _, _ = multipletests(list(pvalues), alpha=alpha, method="holm")
    return [bool(r) for r in reject], [float(p) for p in adjusted]


def compare_to_baseline(
    baseline: Sequence[dict], conditions: Mapping[str, Sequence[dict]], alpha: float = ALPHA, power: float = POWER
) -> list[BaselineRow]:
    """Compare every condition with one baseline on the same items and Holm-correct across conditions
    (separately for the McNemar and the z-test family). Rows keep the order of ``conditions``."""
    if "baseline" in conditions:
        raise ReqnoiseError("a condition may not be named 'baseline'")
    paired = pair_records({"baseline": baseline, **conditions})
    comps = [compare_paired(paired, "baseline", name, alpha, power) for name in conditions]
    reject, mc_adj = holm([c.mcnemar_p for c in comps], alpha)
    _, z_adj = holm([c.ztest_p for c in comps], alpha)
    return [BaselineRow(name, c, m, z, r) for name, c, m, z, r in zip(conditions, comps, mc_adj, z_adj, reject)]


# ---------------------------------------------------------------- decomposition against controls


@dataclass
class Component:
    """One row of a decomposition table; contribution and band are fractions."""

    name: str
    contribution: float | None
    share: float | None  # of the total gain (trained - base); None when the total is 0
    mcnemar_p: float | None
    ztest_p: float | None
    band: tuple[float, float] | None = None
    note: str = ""


@dataclass
class Decomposition:
    """Where the gain of a fused-and-requantized adapter over the base comes from.

    * artifact = zero_control - base: what the fuse + requantize pipeline does with a zero delta;
    * content = trained - zero_control: what the learned weights add beyond that (McNemar p);
    * total = trained - base; share = part / total;
    * random band: min..max of random_control - zero_control over R random-delta adapters of the trained
      adapter's size; ``rank_p`` = (1 + #{random effect >= content}) / (R + 1) is the one-sided Monte Carlo
      p-value of the content effect against "any perturbation of this size" (smallest possible 1/(R+1)).
    """

    n: int
    accuracy: dict  # name -> accuracy
    components: list
    random_effects: list = field(default_factory=list)  # random_i - zero_control
    trained_outside_band: bool | None = None
    rank_p: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def decompose(
    base: Sequence[dict],
    trained: Sequence[dict],
    zero_control: Sequence[dict],
    random_controls: Sequence[Sequence[dict]] = (),
) -> Decomposition:
    """Split trained - base into requantization artifact (zero_control - base) and content-specific effect
    (trained - zero_control), each with paired McNemar and unpaired z-test p, and place the content effect
    in the band of random-delta controls. All record sets must hold the same item ids."""
    named = {"base": base, "trained": trained, "zero_control": zero_control}
    rnames = [f"random_{i}" for i in range(len(random_controls))]
    named.update(zip(rnames, random_controls))
    paired = pair_records(named)
    n = len(paired.ids)
    acc = {name: float(paired.correct[name].mean()) for name in named}

    def part(label, frm, to, total):
        c = compare_paired(paired, frm, to)
        share = c.difference / total if total else None
        return Component(label, c.difference, share, c.mcnemar_p, c.ztest_p)

    total = acc["trained"] - acc["base"]
    comps = [
        part("Requantization artifact (zero_control - base)", "base", "zero_control", total),
        part("Content-specific (trained - zero_control)", "zero_control", "trained", total),
        part("Total (trained - base)", "base", "trained", total),
    ]
    out = Decomposition(n=n, accuracy=acc, components=comps)
    if rnames:
        effects = [acc[r] - acc["zero_control"] for r in rnames]
        content = acc["trained"] - acc["zero_control"]
        out.random_effects = effects
        out.trained_outside_band = bool(content > max(effects) or content < min(effects))
        out.rank_p = (1 + sum(e >= content for e in effects)) / (len(effects) + 1)
        comps.append(
            Component(
                f"Random-delta controls (random - zero_control, R={len(effects)})",
                None,
                None,
                None,
                None,
                band=(min(effects), max(effects)),
                note=f"content {'outside' if out.trained_outside_band else 'inside'} band; rank p = {out.rank_p:.3g}",
            )
        )
    return out


def _pp(x, signed=True):
    return "—" if x is None else (f"{100 * x:+.2f} pp" if signed else f"{100 * x:.2f}%")


def _p(p):
    return "—" if p is None else (f"{p:.2g}" if p < 1e-3 else f"{p:.3f}")


def render_decomposition(dec: Decomposition) -> str:
    """Markdown table (component, contribution in pp, share of total, McNemar p, z-test p) plus accuracies."""
    lines = [
        f"n = {dec.n} paired items; accuracy: "
        + ", ".join(f"{k} {_pp(v, signed=False)}" for k, v in dec.accuracy.items()),
        "",
        "| Component | Contribution | Share of total | p (McNemar, paired) | p (z-test, unpaired) |",
        "|---|---|---|---|---|",
    ]
    for c in dec.components:
        contrib = f"{_pp(c.band[0])} .. {_pp(c.band[1])}" if c.band else _pp(c.contribution)
        share = "—" if c.share is None else f"{100 * c.share:.1f}%"
        p_mc = c.note if c.band else _p(c.mcnemar_p)
        lines.append(f"| {c.name} | {contrib} | {share} | {p_mc} | {_p(c.ztest_p)} |")
    return "\n".join(lines) + "\n"


def render_comparison(c: Comparison, name_a: str = "A", name_b: str = "B") -> str:
    """Plain-text table of a Comparison (percentages and pp)."""
    conf = f"{100 * (1 - c.alpha):g}%"
    rows = [
        ("", name_a, name_b),
        ("n", str(c.n), str(c.n)),
        ("correct", str(c.a.correct), str(c.b.correct)),
        ("unparsed (wrong)", str(c.a.unparsed), str(c.b.unparsed)),
        ("accuracy", f"{100 * c.a.accuracy:.2f}%", f"{100 * c.b.accuracy:.2f}%"),
        (
            f"Wilson {conf} CI",
            f"[{100 * c.a.ci[0]:.2f}, {100 * c.a.ci[1]:.2f}]%",
            f"[{100 * c.b.ci[0]:.2f}, {100 * c.b.ci[1]:.2f}]%",
        ),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    out = [f"{r[0]:<{w0}}  {r[1]:<{w1}}  {r[2]}".rstrip() for r in rows]
    se = "SE —" if c.se_paired is None else f"SE {100 * c.se_paired:.2f} pp"
    if c.se_clustered is not None:
        se += f", clustered by subject ({c.n_subjects}) {100 * c.se_clustered:.2f} pp"
    ci_lo, ci_hi = c.difference_ci
    out += [
        "",
        f"difference ({name_b} - {name_a}): {_pp(c.difference)} ({se})",
        f"{conf} CI of the difference: [{_pp(ci_lo)}, {_pp(ci_hi)}], {c.difference_ci_method}",
        f"two-proportion z-test (unpaired): z = {c.z:+.3f}, p = {_p(c.ztest_p)}",
        f"McNemar exact (paired):           p = {_p(c.mcnemar_p)}",
        f"flips: fixed {c.fixed} (wrong -> right), broken {c.broken} (right -> wrong), "
        f"flip rate {100 * c.flip_rate:.2f}%",
        f"MDE (alpha {c.alpha:g}, power {c.power:g}): paired {100 * c.paired_mde:.2f} pp at a planning flip rate of "
        f"{100 * c.paired_mde_flip_rate:.2f}% ({c.paired_mde_flip_rate_source}); unpaired "
        + ("—" if c.unpaired_mde is None else f"{100 * c.unpaired_mde:.2f} pp")
        + f" at {name_a}'s accuracy",
    ]
    return "\n".join(out) + "\n"
