"""Multiple-choice evaluation of an mlx-lm model: greedy generation with ``\\boxed{X}`` extraction, the
log-likelihood of each option letter after the prompt, or of each option as a whole answer sentence (cloze).

The first two render the same prompt with the model's chat template (thinking disabled, ``reqnoise.chat``):

* ``generate``: temperature 0 (``make_sampler(temp=0.0)``), each batch decoded in its own mlx-lm
  ``BatchGenerator`` (what ``batch_generate`` runs), the answer read by ``reqnoise.eval.items.extract_answer``.
  An unreadable reply is recorded with ``parsed: false`` and counted apart from wrong answers.
* ``loglik``: the assistant turn is pre-filled with ``\\boxed{`` and each option letter's log-probability
  as the next token is read from one forward pass per batch; the prediction is the argmax over the item's
  options. Rows are right-padded: with a causal mask and positions counted from each row's start, a real
  token never sees padding, so a padded row scores what it scores alone (tested against unpadded forwards).
* ``cloze``: the bare question as the user turn and, for each option, the item's ``cloze`` sentence holding
  that option as the assistant's reply; the option's score is the reply's summed log-probability. What a
  model recalls is read without the two-hop step from recalled value to option letter (lm-eval's
  continuation scoring of multiple-choice tasks, with the item's own answer sentence as the continuation).

The tokens every prompt starts with (chat header and instruction, about half of a short question's prompt)
are run once and reused as a KV cache by both modes (``PrefixCache``; attention-only caches, otherwise full
prompts). Items are batched by prompt length (less padding) and records come back in the items' order.

Batches are planned before anything runs (``plan_eval``): which items share a batch, hence its padding width
and, in generate mode, which replies decode side by side, and the shared prefix, all follow from the whole item
list and the options alone. A batch is then always computed whole, the same way, whichever process runs it,
so an item's scores and reply depend on its batch only and never on how the batches are spread over
``mlx.launch`` ranks (``reqnoise.eval.sharded``). Same model, items and options give the same records, byte
for byte, with any number of ranks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from reqnoise.chat import render_chat
from reqnoise.errors import ReqnoiseError
from reqnoise.eval.items import (
    ANSWER_PREFIX,
    DEFAULT_MAX_TOKENS,
    MODES,
    Item,
    as_items,
    build_messages,
    extract_answer,
)

LOGPROB_DECIMALS = 5  # record size only: rank-count independence comes from the batch plan, not from rounding


# --------------------------------------------------------------------------------------------- loading


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def load_model(model_path, adapter_path=None):
    """``mlx_lm.load`` with failures turned into one-line ``ReqnoiseError`` reasons. Returns (model, tokenizer)."""
    from mlx_lm import load

    model_path = Path(model_path)
    if not model_path.is_dir():
        raise ReqnoiseError(f"model directory {model_path} does not exist")
    if not (model_path / "config.json").is_file():
        raise ReqnoiseError(f"model directory {model_path} has no config.json")
    if adapter_path is not None:
        adapter_path = Path(adapter_path)
        if not adapter_path.is_dir():
            raise ReqnoiseError(f"adapter directory {adapter_path} does not exist")
        for name in ("adapter_config.json", "adapters.safetensors"):
            if not (adapter_path / name).is_file():
                raise ReqnoiseError(f"adapter directory {adapter_path} has no {name}")
    try:
        return load(str(model_path), adapter_path=None if adapter_path is None else str(adapter_path))
    except Exception as err:  # mlx-lm raises anything from ValueError to KeyError on a bad directory
        what = f"model {model_path}" + ("" if adapter_path is None else f" with adapter {adapter_path}")
        raise ReqnoiseError(f"could not load {what}: {_first_line(err)}") from None


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered chat; a BOS is added only when the template did not already write it
    (mlx-lm's rule in ``generate``)."""
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos)))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------- shared prefix

MIN_SHARED_PREFIX = 8  # tokens; below this, computing the prefix once is not worth a second code path


def shared_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all lists (a list may be that prefix entirely)."""
    n = min(len(t) for t in token_lists)
    first = token_lists[0]
    return next((i for i in range(n) if any(t[i] != first[i] for t in token_lists)), n)


def common_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by all lists, leaving at least one token of each list."""
    return max(0, min(shared_prefix_length(token_lists), min(len(t) for t in token_lists) - 1))


class PrefixCache:
    """The KV cache of a token prefix every prompt shares (chat header + instruction), computed once.

    Only for models whose cache is plain ``KVCache`` per layer (attention-only models); ``build`` returns
    None otherwise (rotating/SSM caches), and callers then run full prompts.
    """

    def __init__(self, length: int, kv: list):
        self.length = length
        self._kv = kv  # per layer: (keys [1, H, P, Dk], values [1, H, P, Dv])

    @classmethod
    def build(cls, model, tokens: Sequence[int]) -> PrefixCache | None:
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        if len(tokens) < MIN_SHARED_PREFIX:
            return None
        cache = make_prompt_cache(model)
        if not cache or not all(type(c) is KVCache for c in cache):
            return None
        model(mx.array([list(tokens)], dtype=mx.int32), cache=cache)
        kv = [(c.keys[..., : c.offset, :], c.values[..., : c.offset, :]) for c in cache]
        mx.eval(kv)
        return cls(len(tokens), kv)

    def caches(self, batch: int = 1) -> list:
        """Fresh per-layer ``KVCache`` objects holding the prefix for ``batch`` rows."""
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache

        out = []
        for k, v in self._kv:
            c = KVCache()
            c.state = (
                (mx.repeat(k, batch, axis=0), mx.repeat(v, batch, axis=0), self.length)
                if batch > 1
                else (k, v, self.length)
            )
            out.append(c)
        return out


# ------------------------------------------------------------------------------------------ generation


def length_batches(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices ``0..len(lengths)-1`` longest first (ties by index), cut into consecutive batches of ``size``:
    rows of similar length share a batch, so little of a batch is padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[k : k + size] for k in range(0, len(order), size)]


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    seed: int = 0,
    share_prefix: bool = True,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Greedy (temperature 0) completions of token-id ``prompts``, batched with mlx-lm's ``BatchGenerator``.

    Prompts are cut into batches of at most ``batch_size``, longest first (``length_batches``); each batch
    decodes to its end in a generator of its own. With ``share_prefix`` the tokens all prompts share are run
    once and handed to the generator as each prompt's cache. Returns the decoded texts in the order of
    ``prompts``; the stop token (eos) is not part of a text.
    """
    if max_tokens < 1:
        raise ReqnoiseError(f"max_tokens must be at least 1, got {max_tokens}")
    if batch_size < 1:
        raise ReqnoiseError(f"batch_size must be at least 1, got {batch_size}")
    prompts = [list(p) for p in prompts]
    if not prompts:
        return []
    prefix = prompts[0][: common_prefix_length(prompts)] if share_prefix and len(prompts) > 1 else []
    texts = _generate_batches(
        model,
        tokenizer,
        prompts,
        length_batches([len(p) for p in prompts], batch_size),
        prefix,
        max_tokens=max_tokens,
        seed=seed,
        progress=progress,
        desc=desc,
    )
    return [texts[i] for i in range(len(prompts))]


def _generate_batches(model, tokenizer, prompts, batches, prefix_tokens, *, max_tokens, seed, progress, desc):
    """``{prompt index: text}`` for the prompts in ``batches`` (lists of indices into ``prompts``), each batch
    decoded whole in a fresh ``BatchGenerator``. A finished reply is not replaced by a prompt from another
    batch (as continuous batching over all prompts would): which replies decode side by side, and so the
    numerics of every step, then depend on the batch alone, not on which batches this process was given."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    prefix = PrefixCache.build(model, prefix_tokens)
    skip = prefix.length if prefix else 0
    texts: dict[int, str] = {}
    with _progress(sum(map(len, batches)), desc, progress) as bar:
        for batch in batches:
            # Greedy decoding draws nothing; seeded per batch anyway so a sampler's draws would not depend on
            # which batches ran before in this process.
            mx.random.seed(seed)
            gen = BatchGenerator(
                model,
                max_tokens=max_tokens,
                stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                sampler=make_sampler(temp=0.0),
                completion_batch_size=len(batch),
                prefill_batch_size=len(batch),
            )
            try:
                uids = gen.insert(
                    [prompts[i][skip:] for i in batch], caches=[prefix.caches() for _ in batch] if prefix else None
                )
                index_of = dict(zip(uids, batch))
                tokens: dict[int, list[int]] = {uid: [] for uid in uids}
                while responses := gen.next_generated():
                    for r in responses:
                        if r.finish_reason != "stop":
                            tokens[r.uid].append(r.token)
                        if r.finish_reason is not None:
                            bar.update(1)
            finally:
                gen.close()
            for uid, toks in tokens.items():
                texts[index_of[uid]] = tokenizer.decode(toks)
    return texts


# ---------------------------------------------------------------------------------------- log-likelihood


@dataclass
class _Scoring:
    """How one item is scored: forward ``rows`` (token lists); option k's log-prob is the sum over
    ``queries[k]`` of log p(target | row prefix up to position)."""

    rows: list[list[int]]
    queries: list[list[tuple[int, int, int]]]  # per option: (row in self.rows, position, target token)


def letter_scoring(tokenizer, context: str, letters: str) -> _Scoring:
    """Work out which tokens spell each letter after ``context`` (rendered prompt + answer prefix).

    Each ``context + letter`` is tokenized whole (a letter may merge with the preceding ``{``); the tokens
    shared by all letters are the scored prefix, and each letter's remaining tokens are its continuation.
    A one-token continuation is read off the prefix row's last position; a longer one gets its own row.
    """
    encoded = [encode_prompt(tokenizer, context + letter) for letter in letters]
    n = min(len(e) for e in encoded)
    common = next((i for i in range(n) if len({e[i] for e in encoded}) > 1), n)
    prefix = encoded[0][:common]
    rests = [e[common:] for e in encoded]
    if not prefix or any(not r for r in rests) or len({tuple(r) for r in rests}) < len(rests):
        raise ReqnoiseError(
            f"the tokenizer does not give distinct tokens to the option letters {letters} after "
            f"{context[-40:]!r}; log-likelihood scoring needs them (use --mode generate)"
        )
    rows, queries = [prefix], []
    for rest in rests:
        if len(rest) == 1:
            queries.append([(0, len(prefix) - 1, rest[0])])
        else:
            rows.append(prefix + rest[:-1])
            row = len(rows) - 1
            queries.append([(row, len(prefix) - 1 + j, tok) for j, tok in enumerate(rest)])
    return _Scoring(rows, queries)


def _head(model):
    """A function hidden states -> logits for models built as ``lm_head(model(x))`` (or a tied embedding),
    so that logits are computed at the scored positions only; None when the model is built differently.
    Checked against the full forward on a short probe, so a model with extra output scaling falls back."""
    import mlx.core as mx

    inner = getattr(model, "model", None)
    if inner is None or not callable(inner):
        return None
    head = getattr(model, "lm_head", None)
    if head is None:
        embed = getattr(inner, "embed_tokens", None)
        head = getattr(embed, "as_linear", None)
    if head is None:
        return None
    probe = mx.array([[0, 1, 2, 3]], dtype=mx.int32)
    try:
        fast, full = head(inner(probe, cache=None)), model(probe)
        if fast.shape != full.shape or not mx.allclose(fast, full, rtol=1e-4, atol=1e-4).item():
            return None
    except Exception:
        return None
    return head


def score_rows(
    model,
    rows: Sequence[Sequence[int]],
    queries: Sequence[tuple[int, int, int]],
    *,
    head=None,
    pad_id: int = 0,
    prefix: PrefixCache | None = None,
) -> np.ndarray:
    """Log-probabilities (float64, shape [len(queries)]) of ``target`` at ``(row, position)`` for each query,
    from one forward pass over the right-padded ``rows`` (log p(target | row[:position + 1])).

    With ``prefix``, every row starts with its ``prefix.length`` tokens, which are not run again: the rest of
    the rows continue from the cached keys/values (positions and causal mask offset by the prefix).
    """
    import mlx.core as mx

    skip = prefix.length if prefix else 0
    width = max(len(r) for r in rows) - skip
    x = np.full((len(rows), width), pad_id, dtype=np.int32)
    for i, r in enumerate(rows):
        x[i, : len(r) - skip] = r[skip:]
    q = np.asarray(queries, dtype=np.int64).reshape(-1, 3)
    if (q[:, 1] < skip).any():
        raise ReqnoiseError("internal: a scored position lies inside the shared prefix")
    rows_idx, pos_idx = mx.array(q[:, 0].astype(np.int32)), mx.array((q[:, 1] - skip).astype(np.int32))
    cache = prefix.caches(len(rows)) if prefix else None
    if head is not None:
        hidden = model.model(mx.array(x), cache=cache)
        logits = head(hidden[rows_idx, pos_idx])
    else:
        logits = model(mx.array(x), cache=cache)[rows_idx, pos_idx]
    logits = logits.astype(mx.float32)
    targets = mx.array(q[:, 2].astype(np.int32))
    lp = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)
    return np.array(lp, dtype=np.float64)


def cloze_scoring(tokenizer, context: str, replies: Sequence[str]) -> _Scoring:
    """Score each whole reply after ``context`` (the rendered prompt): option k's log-prob is the sum over
    the tokens of ``context + replies[k]`` past the tokens every candidate and the context share, so a reply
    that merges with the context's last token is still scored from the first token where they differ."""
    encoded = [encode_prompt(tokenizer, context + reply) for reply in replies]
    common = shared_prefix_length([encode_prompt(tokenizer, context)] + encoded)
    if common == 0 or len({tuple(e) for e in encoded}) < len(encoded):
        raise ReqnoiseError(
            f"cloze replies {list(replies)[:2]}... do not tokenize to distinct continuations of {context[-40:]!r}"
        )
    rows = [e[:-1] for e in encoded]
    queries = [[(k, t, e[t + 1]) for t in range(common - 1, len(e) - 1)] for k, e in enumerate(encoded)]
    return _Scoring(rows, queries)


def loglik_option_scores(
    model,
    tokenizer,
    items: Sequence[Item],
    *,
    batch_size: int = 8,
    system: str | None = None,
    share_prefix: bool = True,
    progress: bool = True,
    cloze: bool = False,
) -> list[np.ndarray]:
    """Per item, the log-probability of each option (shape [n_options]): of its letter right after
    ``\\boxed{`` (the multiple-choice prompt), or with ``cloze`` of the item's cloze sentence holding the
    option, as the whole reply to the bare question (natural log, summed over the reply's tokens).

    ``share_prefix`` runs the tokens every prompt starts with once (see ``PrefixCache``); the scores agree
    with full-row scoring to float32 rounding.
    """
    plan = plan_eval(
        tokenizer,
        items,
        mode="cloze" if cloze else "loglik",
        batch_size=batch_size,
        system=system,
        share_prefix=share_prefix,
    )
    scores = run_plan(model, tokenizer, plan, progress=progress)
    return [scores[i] for i in range(len(plan.items))]


def _score_batches(model, tokenizer, scorings, batches, prefix_tokens, *, progress, desc):
    """``{item index: option log-probs}`` for the items in ``batches`` (lists of indices into ``scorings``),
    one forward pass per batch over all the rows of its items."""
    head = _head(model)
    prefix = PrefixCache.build(model, prefix_tokens)
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    out: dict[int, np.ndarray] = {}
    with _progress(sum(map(len, batches)), desc, progress) as bar:
        for batch in batches:
            rows, queries, spans = [], [], []
            for i in batch:
                base = len(rows)
                rows.extend(scorings[i].rows)
                n0 = len(queries)
                for option in scorings[i].queries:
                    queries.extend((base + r, p, t) for r, p, t in option)
                spans.append((i, n0, [len(o) for o in scorings[i].queries]))
            lp = score_rows(model, rows, queries, head=head, pad_id=pad, prefix=prefix)
            for i, n0, sizes in spans:
                bounds = np.cumsum([0] + sizes) + n0
                out[i] = np.array([lp[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])
            bar.update(len(batch))
    return out


# ------------------------------------------------------------------------------------------------- plan


@dataclass
class EvalPlan:
    """Everything about an evaluation that is fixed before a model runs, from the items and options alone.

    ``batches`` lists item indices (each batch is one forward pass, or one generator decoded to its end);
    ``prefix`` holds the tokens every row or prompt starts with, run once (empty: none). Any process that
    runs batch b of the same plan computes the same numbers for its items, so the batches may be spread over
    ranks in any way (``reqnoise.eval.sharded``).
    """

    mode: str
    items: list[Item]
    work: list  # per item: a _Scoring (loglik, cloze) or the prompt's token ids (generate)
    batches: list[list[int]]
    prefix: list[int]
    max_tokens: int
    seed: int

    def batch_costs(self) -> list[int]:
        """Per batch, the tokens its forward passes cover past the prefix (generate: prompt width plus
        ``max_tokens`` per reply): a proxy for its run time, to balance ranks."""
        skip = len(self.prefix)
        if self.mode == "generate":
            return [len(b) * (max(len(self.work[i]) for i in b) - skip + self.max_tokens) for b in self.batches]
        return [
            sum(len(self.work[i].rows) for i in b) * (max(len(r) for i in b for r in self.work[i].rows) - skip)
            for b in self.batches
        ]

    def record(self, i: int, result) -> dict:
        """Item ``i``'s record from its ``run_plan`` result (option log-probs, or the generated text)."""
        item = self.items[i]
        if self.mode == "generate":
            ex = extract_answer(result, item.options)
            rec = _record(item, ex.letter, ex.parsed)
            rec.update(mode=self.mode, response=result, extraction=ex.rule)
            return rec
        rec = _record(item, item.letters[int(np.argmax(result))], True)
        rec["mode"] = self.mode
        rec["option_logprobs"] = [round(float(v), LOGPROB_DECIMALS) for v in result]
        return rec


def plan_eval(
    tokenizer,
    items: Sequence[Item],
    *,
    mode: str = "loglik",
    batch_size: int = 8,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seed: int = 0,
    system: str | None = None,
    share_prefix: bool = True,
) -> EvalPlan:
    """Tokenize ``items`` for ``mode`` and fix the batches (``length_batches``: longest first; a cloze item
    brings one row per option, so cloze batches hold ``batch_size // 4`` items to keep a batch's row count near
    the letter mode's) and the shared prefix, over the whole item list (``Item``s, already checked)."""
    items = list(items)
    if mode == "cloze":
        missing = [it.id for it in items if it.cloze is None]
        if missing:
            raise ReqnoiseError(
                f"cloze mode needs a 'cloze' sentence in every item; {len(missing)} of {len(items)} "
                f"lack one (e.g. {missing[:3]})"
            )
    if mode == "generate":
        work = [
            encode_prompt(tokenizer, render_chat(tokenizer, build_messages(it, system), add_generation_prompt=True))
            for it in items
        ]
        lengths, rows, per_batch = [len(p) for p in work], work, batch_size
    else:
        cloze = mode == "cloze"
        work = []
        for item in items:
            prompt = render_chat(tokenizer, build_messages(item, system, cloze=cloze), add_generation_prompt=True)
            work.append(
                cloze_scoring(tokenizer, prompt, item.cloze_replies())
                if cloze
                else letter_scoring(tokenizer, prompt + ANSWER_PREFIX, item.letters)
            )
        lengths = [max(map(len, sc.rows)) for sc in work]
        rows = [r for sc in work for r in sc.rows]
        per_batch = max(1, batch_size // 4) if cloze else batch_size
    prefix = list(rows[0][: common_prefix_length(rows)]) if share_prefix and len(items) > 1 else []
    return EvalPlan(mode, items, work, length_batches(lengths, per_batch), prefix, max_tokens, seed)


def run_plan(model, tokenizer, plan: EvalPlan, batch_ids: Sequence[int] | None = None, *, progress: bool = True):
    """Run the plan's batches numbered ``batch_ids`` (all by default) on a loaded model; returns ``{item index:
    result}``: option log-probabilities (float64 array) or, in generate mode, the reply's text."""
    batches = plan.batches if batch_ids is None else [plan.batches[b] for b in batch_ids]
    if plan.mode == "generate":
        return _generate_batches(
            model,
            tokenizer,
            plan.work,
            batches,
            plan.prefix,
            max_tokens=plan.max_tokens,
            seed=plan.seed,
            progress=progress,
            desc="generate",
        )
    return _score_batches(model, tokenizer, plan.work, batches, plan.prefix, progress=progress, desc=plan.mode)


# ---------------------------------------------------------------------------------------------- records


@dataclass
class EvalSummary:
    """Accuracy over all items (unparsed answers count as wrong), its Wilson interval, the unparsed count
    and the throughput. ``seconds`` covers scoring/generation, not model loading."""

    mode: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    unparsed: int
    seconds: float
    items_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (
            f"{self.mode}: accuracy {100 * self.accuracy:.1f}% ({self.correct}/{self.n}, 95% Wilson CI "
            f"{100 * self.ci_low:.1f}-{100 * self.ci_high:.1f}%), unparsed {self.unparsed}, "
            f"{self.items_per_s:.1f} items/s"
        )


def summarize(records: Sequence[dict], mode: str, seconds: float) -> EvalSummary:
    """Summary of per-item records (``correct`` counts only with ``parsed``)."""
    from reqnoise.stats.inference import wilson_ci

    n = len(records)
    k = sum(1 for r in records if r["correct"] and r["parsed"])
    lo, hi = wilson_ci(k, n)
    return EvalSummary(
        mode=mode,
        n=n,
        correct=k,
        accuracy=k / n,
        ci_low=lo,
        ci_high=hi,
        unparsed=sum(1 for r in records if not r["parsed"]),
        seconds=seconds,
        items_per_s=n / seconds if seconds > 0 else float("inf"),
    )


def _record(item: Item, prediction: str | None, parsed: bool) -> dict:
    return {
        "id": item.id,
        "subject": item.subject,
        "correct": bool(parsed and prediction == item.answer),
        "parsed": parsed,
        "prediction": prediction,
        "answer": item.answer,
    }


def check_options(mode, batch_size, max_tokens, limit):
    """Refuse a bad mode, batch size, token budget or limit (before a model is loaded)."""
    if mode not in MODES:
        raise ReqnoiseError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1:
        raise ReqnoiseError(f"batch_size must be at least 1, got {batch_size}")
    if max_tokens < 1:
        raise ReqnoiseError(f"max_tokens must be at least 1, got {max_tokens}")
    if limit is not None and limit < 1:
        raise ReqnoiseError(f"limit must be at least 1, got {limit}")


def evaluate_loaded(
    model,
    tokenizer,
    items,
    *,
    mode: str = "loglik",
    batch_size: int = 8,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    limit: int | None = None,
    seed: int = 0,
    system: str | None = None,
    progress: bool = True,
) -> tuple[list[dict], EvalSummary]:
    """Evaluate an already loaded mlx-lm (model, tokenizer) on ``items`` (path, ``Item``s or item dicts).

    ``limit`` keeps the first N items (file order). ``system`` adds a system turn to every prompt.
    Records (in item order): ``id, subject, correct, parsed, prediction, answer, mode`` plus
    ``response, extraction`` (generate: the raw reply and the rule that read it) or ``option_logprobs``
    (loglik, cloze: natural-log probabilities of A, B, ... rounded to 5 decimals). ``max_tokens`` applies to
    generate only.
    """
    check_options(mode, batch_size, max_tokens, limit)
    items = as_items(items)[:limit]
    t0 = time.perf_counter()
    plan = plan_eval(
        tokenizer, items, mode=mode, batch_size=batch_size, max_tokens=max_tokens, seed=seed, system=system
    )
    results = run_plan(model, tokenizer, plan, progress=progress)
    records = [plan.record(i, results[i]) for i in range(len(items))]
    return records, summarize(records, mode, time.perf_counter() - t0)


def evaluate_items(
    model,
    items,
    *,
    adapter_path=None,
    mode: str = "loglik",
    batch_size: int = 8,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    limit: int | None = None,
    seed: int = 0,
    system: str | None = None,
    progress: bool = True,
) -> tuple[list[dict], EvalSummary]:
    """Load ``model`` (an mlx-lm model directory, optionally with ``adapter_path``) and evaluate ``items``.

    Inputs are checked before the model is loaded. See ``evaluate_loaded`` for the arguments and records;
    to evaluate many conditions on one loaded model, load once with ``load_model`` and call that.
    """
    check_options(mode, batch_size, max_tokens, limit)
    items = as_items(items)
    net, tokenizer = load_model(model, adapter_path)
    return evaluate_loaded(
        net,
        tokenizer,
        items,
        mode=mode,
        batch_size=batch_size,
        max_tokens=max_tokens,
        limit=limit,
        seed=seed,
        system=system,
        progress=progress,
    )
