"""Contextual calibration of log-likelihood multiple-choice records (Zhao et al., 2021, "Calibrate before use").

A small or freshly fine-tuned model often carries a strong prior for one option letter that swamps what it
knows about the item: it then answers most items with that letter, and everything built on its errors (Set G)
inherits the letter. Calibration subtracts the model's mean log-probability of each option position over the
evaluated items and takes the argmax of what is left, so the choice is decided by the item. The records keep
the raw choice as ``raw_prediction``.
"""

import numpy as np


def calibrate_records(records, *, by_subject: bool = False):
    """Return new records with ``prediction``/``correct`` from prior-corrected option log-probabilities.

    Records need ``option_logprobs`` (loglik or cloze mode). The prior of position j is the mean of
    ``option_logprobs[j]`` over the records that have a position j, so item order and sharding do not change
    the result. ``by_subject`` takes the prior within each record's subject (records without one form their
    own stratum): where a subject's items share their options (cloze scores of option texts), the prior is
    then that of each option's text, not of its position averaged over subjects."""
    letters = "ABCDEFGHIJ"
    width = max(len(r["option_logprobs"]) for r in records)
    strata = [r.get("subject") if by_subject else None for r in records]
    sums, counts = {}, {}
    for r, key in zip(records, strata):
        lp = np.asarray(r["option_logprobs"], dtype=np.float64)
        sums.setdefault(key, np.zeros(width))[: lp.size] += lp
        counts.setdefault(key, np.zeros(width))[: lp.size] += 1
    priors = {key: sums[key] / np.maximum(counts[key], 1) for key in sums}
    out = []
    for r, key in zip(records, strata):
        lp = np.asarray(r["option_logprobs"], dtype=np.float64)
        pred = letters[int(np.argmax(lp - priors[key][: lp.size]))]
        out.append(
            {
                **r,
                "raw_prediction": r["prediction"],
                "prediction": pred,
                "correct": bool(r["parsed"] and pred == r["answer"]),
            }
        )
    return out
