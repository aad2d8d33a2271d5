"""Mean-prior calibration of option-scored multiple-choice records (per-set prior subtraction).

A small or freshly fine-tuned model often carries a strong prior for one option letter that swamps what it
knows about the item: it then answers most items with that letter, and everything built on its errors (Set G)
inherits the letter. Mean-prior calibration estimates that prior as the mean log-probability of each option
position over a set of scored items, subtracts it from every item's option log-probabilities and takes the
argmax of what is left, so the choice is decided by what distinguishes the item. Records keep the raw choice as
``raw_prediction``.

What this is not: Zhao et al.'s contextual calibration ("Calibrate before use", 2021) estimates the prior from
content-free inputs such as "N/A", so the prior carries no item content. Here the prior is taken from real
items, so it also absorbs whatever the items share (an answer key that favours a letter, a subject's common
option texts). The closest published relative is Batch Calibration (Zhou et al., 2024), which also estimates
the prior from the scored inputs themselves; what is averaged differs, so results are this module's, not that
method's.

Where the prior comes from matters when models are compared item by item:

* by default (``option_prior`` of each model's own records) every model gets its own prior, so two models
  with identical raw scores on an item can get different calibrated answers on it: calibration alone can
  create or remove a flip between paired models;
* with a shared prior (``option_prior`` of a baseline model's records, passed as ``prior=`` for every model
  paired with it; in a spec, ``[evals.X] calibrate_from = "<model>"``) the correction is the same fixed offset
  for all of them, so identical raw scores give identical calibrated answers and every flip between them comes
  from their raw scores.
"""

import numpy as np

from reqnoise.errors import ReqnoiseError

LETTERS = "ABCDEFGHIJ"


def _logprobs(r) -> np.ndarray:
    try:
        lp = np.asarray(r["option_logprobs"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        lp = None
    if lp is None or lp.ndim != 1 or lp.size == 0:
        raise ReqnoiseError(
            f"record {r.get('id')!r}: no option_logprobs (calibration needs loglik or cloze records, one score "
            "per option)"
        )
    if lp.size > len(LETTERS):
        raise ReqnoiseError(f"record {r.get('id')!r}: {lp.size} options, at most {len(LETTERS)}")
    return lp


def option_prior(records, *, by_subject: bool = False) -> dict:
    """The mean option log-probability per position, estimated from ``records``.

    Args:
        records: records with ``option_logprobs`` (a list of k_i floats, nats; loglik or cloze mode).
        by_subject: one prior per ``subject`` (records without one form their own stratum, key None) instead of
            one pooled prior (key None).

    Returns:
        ``{stratum: float64 array of shape (width,)}``, width the most options any record of the stratum has;
        entry j is the mean of ``option_logprobs[j]`` over the stratum's records that have a position j, so item
        order and sharding do not change it.
    """
    records = list(records)
    if not records:
        raise ReqnoiseError("calibration needs at least one record to estimate the option prior from")
    sums, counts = {}, {}
    for r in records:
        lp = _logprobs(r)
        key = r.get("subject") if by_subject else None
        if key not in sums or sums[key].size < lp.size:
            for d in (sums, counts):
                old = d.get(key, np.zeros(0))
                d[key] = np.concatenate([old, np.zeros(lp.size - old.size)])
        sums[key][: lp.size] += lp
        counts[key][: lp.size] += 1
    return {key: sums[key] / counts[key] for key in sums}


def calibrate_records(records, *, by_subject: bool = False, prior: dict | None = None):
    """Return new records with ``prediction``/``correct`` from prior-subtracted option log-probabilities.

    Args:
        records: records with ``option_logprobs`` (loglik or cloze mode), ``prediction``, ``parsed``, ``answer``.
        by_subject: subtract each record's subject's prior (see ``option_prior``): where a subject's items share
            their options (cloze scores of option texts), the prior is then that of each option's text, not of
            its position averaged over subjects.
        prior: a prior from ``option_prior`` (built with the same ``by_subject``), typically of a baseline
            model's records on the same items: every model calibrated with it gets the same correction.
            Default: the prior of ``records`` themselves (per-set prior subtraction).

    Returns:
        New dicts: the input fields, ``raw_prediction`` (the uncalibrated choice), ``prediction`` (a letter) and
        ``correct`` (``parsed`` and prediction == answer).
    """
    records = list(records)
    if prior is None:
        prior = option_prior(records, by_subject=by_subject)
    out = []
    for r in records:
        lp = _logprobs(r)
        key = r.get("subject") if by_subject else None
        if key not in prior:
            what = f"subject {key!r}" if by_subject else "pooled (by_subject=False) entry"
            raise ReqnoiseError(f"record {r.get('id')!r}: the calibration prior has no {what}")
        if prior[key].size < lp.size:
            raise ReqnoiseError(
                f"record {r.get('id')!r} has {lp.size} options but the calibration prior covers {prior[key].size}"
            )
        pred = LETTERS[int(np.argmax(lp - prior[key][: lp.size]))]
        out.append(
            {
                **r,
                "raw_prediction": r["prediction"],
                "prediction": pred,
                "correct": bool(r["parsed"] and pred == r["answer"]),
            }
        )
    return out
