"""Chat training data for mlx-lm's tuner: reading and checking, rendering with thinking off, seeded batches.

- Chat examples are rendered by ``reqnoise.chat.render_chat`` (the tokenizer's template with
  ``enable_thinking=False``, the rendering evaluation uses) through a tokenizer wrapper handed to mlx-lm's
  ``ChatDataset``. With ``mask_prompt`` the loss covers only the last assistant message: the prompt is the
  conversation before it plus the generation prompt (for Qwen3 templates that includes the empty think block).
- Batches come from a seeded generator that uses every example once per epoch (mlx-lm's own batcher sorts by
  length and never trains on the ``len % batch_size`` longest examples, and seeds NumPy's global state).
- Under ``mlx.launch`` the batches are split across ranks and the loss rescaled so the gradient is the
  single-process one (``seeded_batches``, ``global_mean_loss``).
"""

import json
import math
from pathlib import Path

import numpy as np

from reqnoise.chat import render_chat
from reqnoise.distributed import rank_and_size
from reqnoise.errors import ReqnoiseError
from reqnoise.jsonl import iter_jsonl

DATA_SPLITS = ("train", "valid")
_ROLES = ("system", "user", "assistant", "tool")
_PAD_TO = 8  # pad to 1 + a multiple of 8: little wasted compute, few distinct shapes (one compile each)


def _check_example(ex, where: str) -> dict:
    if not isinstance(ex, dict) or "messages" not in ex:
        raise ReqnoiseError(f"{where}: expected a JSON object with a 'messages' list (mlx-lm chat format)")
    if "tools" in ex:
        raise ReqnoiseError(
            f"{where}: tool definitions ('tools') are not supported; reqnoise renders chats without tools"
        )
    msgs = ex["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ReqnoiseError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ReqnoiseError(
                f"{where}: messages[{i}] must be {{'role': one of {_ROLES}, 'content': str}}, got {json.dumps(m)[:120]}"
            )
    if msgs[-1]["role"] != "assistant":
        raise ReqnoiseError(
            f"{where}: the last message must be the assistant's (the trained response), got role {msgs[-1]['role']!r}"
        )
    return {"messages": msgs}


def read_chat_jsonl(path) -> list[dict]:
    """Read and validate a chat JSONL file (``{"messages": [...]}`` per line; blank lines skipped)."""
    return [_check_example(ex, where) for _, where, ex in iter_jsonl(Path(path))]


def load_chat_data(data) -> dict:
    """``{"train": [...], "valid": [...]}`` from a directory (train.jsonl, optional valid.jsonl) or a list."""
    if isinstance(data, (str, Path)):
        root = Path(data)
        if not (root / "train.jsonl").is_file():
            raise ReqnoiseError(f"data directory {root} has no train.jsonl")
        splits = {
            s: read_chat_jsonl(root / f"{s}.jsonl") if (root / f"{s}.jsonl").is_file() else [] for s in DATA_SPLITS
        }
    else:
        splits = {"train": [_check_example(ex, f"data[{i}]") for i, ex in enumerate(data)], "valid": []}
    if not splits["train"]:
        raise ReqnoiseError(f"no training examples in {data if isinstance(data, (str, Path)) else 'data'}")
    return splits


class _NoThinkingTokenizer:
    """What mlx-lm's ChatDataset calls, answered with ``render_chat`` (thinking off) + plain encoding, so
    training sees the exact text evaluation renders. Everything else is forwarded."""

    def __init__(self, tokenizer):
        self._wrapped = tokenizer

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=False, tokenize=True, **_):
        text = render_chat(self._wrapped, messages, add_generation_prompt=add_generation_prompt)
        return self._wrapped.encode(text, add_special_tokens=False) if tokenize else text

    def __getattr__(self, name):
        return getattr(self._wrapped, name)


def chat_dataset(examples, tokenizer, mask_prompt: bool):
    """mlx-lm's ChatDataset (in a CacheDataset) over ``render_chat``: item ``i`` is ``(tokens, offset)``,
    the loss covering ``tokens[offset:]`` (offset 0 without ``mask_prompt``)."""
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset

    return CacheDataset(ChatDataset(examples, _NoThinkingTokenizer(tokenizer), mask_prompt=mask_prompt))


def count_truncated(dataset, max_seq_length: int, split: str) -> int:
    """Tokenize every example now (CacheDataset keeps the tokens); refuse examples with no trained token
    left after truncation; return how many get truncated."""
    truncated = 0
    for i in range(len(dataset)):
        tokens, offset = dataset[i]
        n = min(len(tokens), max_seq_length)
        truncated += len(tokens) > max_seq_length
        if offset >= n or n < 2:
            raise ReqnoiseError(
                f"{split} example {i}: {len(tokens)} tokens with the prompt ending at {offset}; "
                f"max_seq_length={max_seq_length} leaves no response token to train on"
            )
    return truncated


def misaligned_prompts(dataset, tokenizer) -> int:
    """Examples whose prompt tokens are not a prefix of the whole conversation's tokens (a BPE merge across
    the boundary): there mlx-lm's offset-based mask is off by a token or so."""
    wrapped = _NoThinkingTokenizer(tokenizer)
    bad = 0
    for i in range(len(dataset)):
        tokens, offset = dataset[i]
        prompt = wrapped.apply_chat_template(dataset._data[i]["messages"][:-1], add_generation_prompt=True)
        bad += tokens[:offset] != prompt
    return bad


def seeded_index_batches(n: int, batch_size: int, *, loop: bool, seed: int):
    """Index batches over ``n`` examples: every example once in order (``loop=False``; the last batch may be
    short), or an endless stream of per-epoch permutations drawn from ``seed`` (batches straddle epochs), the
    same for every process and thread count. Shared by the SFT and DPO batchers."""
    rng = np.random.Generator(np.random.PCG64(seed))

    def index_stream():
        if not loop:
            yield from range(n)
            return
        while True:
            yield from rng.permutation(n).tolist()

    stream = index_stream()
    while True:
        idx = [i for _, i in zip(range(batch_size), stream)]
        if not idx:
            return
        yield idx


def seeded_batches(dataset, batch_size, max_seq_length, loop=False, comm_group=None, *, seed=0):
    """mlx-lm's ``iterate_batches`` contract, seeded and using every example.

    ``loop=True`` (training): an endless stream of per-epoch permutations drawn from ``seed``, cut into
    batches of ``batch_size`` (a batch may straddle two epochs). ``loop=False`` (validation): every example
    once, in order, the last batch possibly smaller. Yields ``(tokens [B, T] int32, [(offset, end)] [B, 2])``
    with T = 1 + a multiple of 8 (mlx-lm pads to 32; 8 wastes less compute on short examples for a few
    more compiled shapes), at most ``max_seq_length``, and ``end`` the row's token count - 1 (mlx-lm's mask
    is inclusive: given the count it would also train the pad after each example).

    Under ``mlx.launch`` (``comm_group`` of N > 1 ranks) the training batches are the single-process ones,
    rank r taking rows r, r + N, ...; each row then carries a third column, the target-token count of the
    whole batch, by which ``global_mean_loss`` divides, so that mlx-lm's gradient average is the
    single-process gradient (up to summation order). Validation batches go whole to every rank: mlx-lm
    sums totals and token counts over ranks, which leaves the mean unchanged.
    """
    import mlx.core as mx

    size = comm_group.size() if comm_group is not None else 1
    rank = comm_group.rank() if comm_group is not None else 0
    if loop and batch_size % size:
        raise ReqnoiseError(
            f"batch_size {batch_size} is not divisible by the {size} launched ranks "
            "(each rank takes batch_size / ranks examples of every step)"
        )
    for idx in seeded_index_batches(len(dataset), batch_size, loop=loop, seed=seed):
        items = [dataset[i] for i in idx]
        lengths = [min(len(t), max_seq_length) for t, _ in items]
        extra = []
        if loop and size > 1:
            total = sum(_target_tokens(off, length, max_seq_length) for (_, off), length in zip(items, lengths))
            items, lengths, extra = items[rank::size], lengths[rank::size], [total]
        width = min(1 + _PAD_TO * math.ceil(max(lengths) / _PAD_TO), max_seq_length)
        arr = np.zeros((len(items), width), np.int32)
        for row, ((tokens, _), length) in enumerate(zip(items, lengths)):
            arr[row, :length] = tokens[:length]
        # mlx-lm's default_loss scores targets at steps offset..L of a row of L tokens, one past its end: the pad
        # (token 0) after every example (mlx-lm PR #1697). Reporting L - 1 keeps exactly the row's own tokens.
        last = [length - 1 for length in lengths]
        yield mx.array(arr), mx.array([[off, end, *extra] for (_, off), end in zip(items, last)])


def _target_tokens(offset: int, length: int, max_seq_length: int) -> int:
    """Tokens mlx-lm's ``default_loss`` scores in a row of ``length`` tokens as ``seeded_batches`` reports it
    (end ``length - 1``): targets at steps max(offset, 1)..length - 1, the row's own tokens after the first."""
    return max(0, min(length, max_seq_length) - max(offset, 1))


def global_mean_loss(model, batch, lengths):
    """mlx-lm's ``default_loss`` rescaled for data-parallel training: this rank's summed cross-entropy times
    the rank count over the whole batch's token count (``lengths[:, 2]``, see ``seeded_batches``); mlx-lm
    averages the ranks' gradients, which then equals the gradient of the mean over the whole batch.
    Two-column ``lengths`` (validation) get ``default_loss`` unchanged."""
    import mlx.core as mx
    from mlx_lm.tuner.trainer import default_loss

    if lengths.shape[1] < 3:
        return default_loss(model, batch, lengths)
    ce, ntoks = default_loss(model, batch, lengths[:, :2])
    size = rank_and_size()[1]
    return ce * ntoks.astype(mx.float32) * size / lengths[0, 2].astype(mx.float32), ntoks
