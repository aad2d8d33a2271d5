"""Held-out prompts for the noise report's output-space measures, kept apart from the calibration data, and the
model-level measures over their token positions.

Which prompts: ``--heldout-data`` (an mlx-lm dataset file: chat, completions or text; a directory: its
valid.jsonl), a list of plain prompts, or by default the built-in probe prompts (``PROBE_PROMPTS``) minus every
one that overlaps the calibration data a ``--requant calibrated`` fuse with the same options reads (its
``--calib-data``, else the adapter's training data, else ``fuse.calibration.BUILTIN_PROMPTS``). The default set
is the same in every requant mode, so fresh, keep-grid and calibrated reports of one adapter are measured on
the same positions.

Overlap is decided on token ids, by hashing: a held-out sequence overlaps a calibration example when the two
are equal or one is a prefix of the other (a causal model then computes the same activations at the shared
positions, so those rows were calibration rows). Every calibration example counts, also those past the
``--calib-tokens`` cap. Under ``--requant calibrated`` an explicit held-out set that overlaps is refused (one
line, naming both examples); the default set drops the overlapping probes and says how many.
"""

import hashlib
from dataclasses import dataclass, field

import numpy as np
from scipy.special import log_softmax

from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.calibration import (
    DEFAULT_CALIB_TOKENS,
    CalibrationData,
    load_calibration,
    prompt_examples,
    read_calibration_file,
    tokenize_examples,
)

# Held-out tokens at most. The output measures keep the adapter's and the base model's logits of every
# held-out position (2 x tokens x vocab float32: 1.2 GB for a 150k vocabulary at this cap).
DEFAULT_HELDOUT_TOKENS = 1024

PROBE_PROMPTS = [
    "Who are you?",
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "What is 17 times 23?",
    "Name three prime numbers.",
    "Which planet is closest to the sun?",
    "Translate 'good morning' into Spanish.",
    "What causes rain?",
    "Give one tip for learning to code.",
    "Who wrote Hamlet?",
    "What is the boiling point of water in Celsius?",
    "Describe a cat in five words.",
    "What is an atom?",
    "Answer with a letter: which option is largest? A) 2 B) 9 C) 4",
    "Tell me something about yourself.",
]


@dataclass
class HeldOut:
    """The held-out sequences and what they were checked against."""

    data: CalibrationData  # tokenized held-out sequences (``sequences``: what the models run)
    source: str  # "builtin-probes", "prompts" or a file path
    dropped: list = field(default_factory=list)  # default probes left out: they overlap the calibration data
    checked_against: dict | None = None  # the calibration data's source and sha256; None: not checked

    def to_dict(self) -> dict:
        return dict(
            source=self.source,
            sha256=self.data.sha256,
            sequences=len(self.data.sequences),
            tokens=self.data.tokens,
            dropped_overlapping_calibration=list(self.dropped),
            disjoint_from=self.checked_against,
        )


def _digest(ids) -> bytes:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).digest()


def overlaps(heldout: list, calibration: list) -> dict:
    """``{held-out index: calibration index}`` for every held-out token sequence equal to, a prefix of, or
    extended by a calibration sequence (lists of token ids). Hashes of the calibration prefixes at the held-out
    lengths and of the held-out prefixes against whole calibration sequences: no pairwise comparison."""
    whole = {}
    for j, c in enumerate(calibration):
        whole.setdefault(_digest(c), j)
    lengths = {len(h) for h in heldout}
    prefix = {}
    for j, c in enumerate(calibration):
        for n in lengths:
            if len(c) >= n:
                prefix.setdefault(_digest(c[:n]), j)
    found = {}
    for i, h in enumerate(heldout):
        j = prefix.get(_digest(h))
        for n in range(1, len(h)) if j is None else ():
            j = whole.get(_digest(h[:n]))
            if j is not None:
                break
        if j is not None:
            found[i] = j
    return found


def _calibration_for(model_dir, adapter_path, options) -> CalibrationData:
    return load_calibration(model_dir, adapter_path, options.calib_data, options.calib_tokens or DEFAULT_CALIB_TOKENS)


def heldout_set(
    model_dir, adapter_path, options, *, prompts=None, data=None, max_tokens=DEFAULT_HELDOUT_TOKENS, calibration=None
) -> HeldOut:
    """Choose, tokenize and check the held-out set (see the module docstring).

    Args:
        options: the report's FuseOptions (its requant and calibration options decide what is checked).
        prompts: plain user prompts (rendered with the chat template and the generation prompt); or
        data: an mlx-lm dataset file (a directory: its valid.jsonl); neither: the built-in probe prompts.
        max_tokens: held-out tokens at most (sequences are cut, in order).
        calibration: the calibration data already loaded for this report (calibrated), or None.
    """
    if prompts is not None and data is not None:
        raise ReqnoiseError("give the held-out prompts either as prompts or as a data file, not both")
    calibrated = options.requant == "calibrated"
    if calibration is None and calibrated:
        calibration = _calibration_for(model_dir, adapter_path, options)
    if prompts is None and data is None:
        if calibration is None:
            try:
                calibration = _calibration_for(model_dir, adapter_path, options)
            except ReqnoiseError:
                # No calibration runs in this mode: unreadable default calibration data only means the probes
                # cannot be filtered against it, which the report then says (disjoint_from: None).
                calibration = None
        checked = None if calibration is None else dict(source=calibration.source, sha256=calibration.sha256)
        ex = prompt_examples(PROBE_PROMPTS)
        probes = tokenize_examples(model_dir, ex, "builtin-probes", "", max_tokens, what="held-out")
        hit = {} if calibration is None else overlaps(probes.examples, calibration.examples)
        keep = [p for i, p in enumerate(PROBE_PROMPTS) if i not in hit]
        if not keep:
            raise ReqnoiseError(
                f"every built-in probe prompt is in the calibration data {calibration.source}: pass --heldout-data"
            )
        digest = hashlib.sha256("\n".join(keep).encode()).hexdigest()
        tok = tokenize_examples(model_dir, prompt_examples(keep), "builtin-probes", digest, max_tokens, "held-out")
        return HeldOut(tok, "builtin-probes", [PROBE_PROMPTS[i] for i in sorted(hit)], checked)
    if prompts is not None:
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise ReqnoiseError("the held-out prompt list is empty")
        ex, digest, source = (
            prompt_examples(prompts),
            hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            "prompts",
        )
    else:
        ex, digest = read_calibration_file(data, what="held-out", split="valid")
        source = str(data)
    tok = tokenize_examples(model_dir, ex, source, digest, max_tokens, what="held-out")
    if not calibrated:
        return HeldOut(tok, source, [], None)
    checked = dict(source=calibration.source, sha256=calibration.sha256)
    hit = overlaps(tok.examples, calibration.examples)
    if hit:
        i, j = next(iter(sorted(hit.items())))
        raise ReqnoiseError(
            f"held-out example {i + 1} of {source} overlaps calibration example {j + 1} of {calibration.source} "
            f"({len(hit)} of {len(tok.examples)} held-out examples do: same tokens, or one a prefix of the other); "
            "held-out prompts must not be calibration prompts"
        )
    return HeldOut(tok, source, [], checked)


def _logits(model_dir, sequences):
    """Each sequence's logits, float32 numpy [L, vocab], one at a time; the model is released at the end."""
    import mlx.core as mx
    import mlx_lm

    model, _ = mlx_lm.load(str(model_dir))
    for seq in sequences:
        yield np.array(model(mx.array(seq)[None])[0].astype(mx.float32))
    del model
    mx.clear_cache()


def _kl_sum(p_log, q_log) -> float:
    """Sum over positions of KL(p || q) in nats; rows are log-probabilities [positions, vocab] (float64)."""
    return float(np.sum(np.exp(p_log) * (p_log - q_log)))


def output_measures(adapter_logits, base_dir, fused_dir, sequences) -> dict:
    """Model-level measures over every token position of the held-out ``sequences``.

    ``adapter_logits``: the adapter model's (base + unfused adapter) logits per sequence, float32 [L, vocab];
    the base and fused models are loaded from ``base_dir`` and ``fused_dir`` one at a time.

    Returns (KL in nats, mean over positions; a position is one next-token distribution):
        ``kl_adapter_fused`` = KL(adapter || fused), ``kl_adapter_base``, ``kl_fused_base``; ``kl_ratio`` =
        kl_adapter_fused / kl_adapter_base (0: the fuse kept the adapter's outputs exactly, 1: as far from them
        as the base is, above 1: further; None when the adapter does not change the outputs);
        ``logit_change_cosine``: cosine, pooled over positions and vocabulary, between the fused model's
        change (fused - base) and the adapter's change (adapter - base) of the logits, each position's mean
        over the vocabulary removed first (logits are defined up to a constant per position); None when
        either change is zero; ``top1_*``: the share of positions whose arg-max tokens agree.
    """
    base_logits = list(_logits(base_dir, sequences))
    kl = dict(adapter_fused=0.0, adapter_base=0.0, fused_base=0.0)
    dot = fused_sq = adapter_sq = 0.0
    top = dict(fused_adapter=0, fused_base=0, adapter_base=0)
    positions = 0
    for a, b, f in zip(adapter_logits, base_logits, _logits(fused_dir, sequences), strict=True):
        a, b, f = (x.astype(np.float64) for x in (a, b, f))
        la, lb, lf = (log_softmax(x, axis=-1) for x in (a, b, f))
        kl["adapter_fused"] += _kl_sum(la, lf)
        kl["adapter_base"] += _kl_sum(la, lb)
        kl["fused_base"] += _kl_sum(lf, lb)
        ca, cb, cf = (x - x.mean(axis=-1, keepdims=True) for x in (a, b, f))
        dot += float(np.sum((cf - cb) * (ca - cb)))
        fused_sq += float(np.sum((cf - cb) ** 2))
        adapter_sq += float(np.sum((ca - cb) ** 2))
        ta, tb, tf = a.argmax(-1), b.argmax(-1), f.argmax(-1)
        top["fused_adapter"] += int(np.sum(tf == ta))
        top["fused_base"] += int(np.sum(tf == tb))
        top["adapter_base"] += int(np.sum(ta == tb))
        positions += a.shape[0]
    kl = {k: v / positions for k, v in kl.items()}
    return dict(
        prompts=len(sequences),
        positions=positions,
        kl_adapter_fused=kl["adapter_fused"],
        kl_adapter_base=kl["adapter_base"],
        kl_fused_base=kl["fused_base"],
        kl_ratio=kl["adapter_fused"] / kl["adapter_base"] if kl["adapter_base"] > 0 else None,
        logit_change_cosine=dot / np.sqrt(fused_sq * adapter_sq) if fused_sq > 0 and adapter_sq > 0 else None,
        top1_fused_vs_adapter=top["fused_adapter"] / positions,
        top1_fused_vs_base=top["fused_base"] / positions,
        top1_adapter_vs_base=top["adapter_base"] / positions,
    )
