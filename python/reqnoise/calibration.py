"""Contextual calibration of log-likelihood multiple-choice records (Zhao et al., 2021, "Calibrate before use").

A small or freshly fine-tuned model often carries a strong prior for one option letter that swamps what it
knows about the item: it then answers most items with that letter, and everything built on its errors (Set G)
inherits the letter. Calibration subtracts the model's mean log-probability of each option position over the
evaluated items and takes the argmax of what is left, so the choice is decided by the item. The records keep
the raw choice as ``raw_prediction``.
"""

import numpy as np


def calibrate_records(records):
    """Return new records with ``prediction``/``correct`` from prior-corrected option log-probabilities.

    Records need ``option_logprobs`` (loglik mode). The prior of position j is the mean of ``option_logprobs[j]``
    over the records that have a position j, so item order and sharding do not change the result."""
    letters = "ABCDEFGHIJ"
    width = max(len(r["option_logprobs"]) for r in records)
    sums, counts = np.zeros(width), np.zeros(width)
    for r in records:
        lp = np.asarray(r["option_logprobs"], dtype=np.float64)
        sums[: lp.size] += lp
        counts[: lp.size] += 1
    prior = sums / np.maximum(counts, 1)
    out = []
    for r in records:
        lp = np.asarray(r["option_logprobs"], dtype=np.float64)
        pred = letters[int(np.argmax(lp - prior[: lp.size]))]
        out.append({**r, "raw_prediction": r["prediction"], "prediction": pred,
                    "correct": bool(r["parsed"] and pred == r["answer"])})
    return out
