"""Direct preference optimisation (DPO) as a custom loss on mlx-lm's own trainer.

Why not mlx-lm-lora's DPO trainer: it resolves beside mlx 0.32.4 / mlx-lm 0.32.2 (``pip install --dry-run``
adds only datasets, pyarrow, dill, multiprocess, xxhash), but its ``train_dpo`` (5.10.2) starts with
``mx.device_info()["max_recommended_working_set_size"]``, a key MLX's CPU backend does not report, so it
raises KeyError on Linux, where CI and the embedded model run; its batcher is hard-wired (no seeded batches:
it permutes with NumPy's global generator), skips the ``len % batch_size`` longest pairs, and never yields
when there are fewer pairs than ``batch_size``. mlx-lm's ``train`` accepts a loss and a batch iterator, so
the DPO objective (Rafailov et al. 2023, the "sigmoid" loss) is that loss here and the loop stays mlx-lm's.

- Pairs: ``{"prompt": str, "chosen": str, "rejected": str}`` with an optional ``"system": str``, one JSON
  object per line (``train.jsonl``, optional ``valid.jsonl``). Each reply is rendered after the prompt by
  ``reqnoise.chat.render_chat`` (thinking off, as SFT and evaluation render); the loss covers reply tokens only.
- Reference log-probabilities are computed once, before the adapter exists, on the reference model (the
  stage's base unless ``TrainConfig.reference`` names another directory) and travel with the batches: the
  reference never needs to sit in memory beside the policy.
- Loss per pair: ``-log sigmoid(beta * ((pc - pr) - (rc - rr)))`` with p/r the policy/reference summed
  reply log-probabilities of the chosen (c) and rejected (r) replies; the reported loss is its mean over pairs.
"""

import json
import math
from pathlib import Path

import numpy as np

from reqnoise.atomic import atomic_dir, check_target
from reqnoise.chat import render_chat
from reqnoise.errors import ReqnoiseError
from reqnoise.jsonl import iter_jsonl
from reqnoise.train.clean_data import DEFAULT_DROP_PATTERNS, _check_messages, _drop_reason
from reqnoise.train.data import seeded_index_batches

PAIR_KEYS = ("prompt", "chosen", "rejected")
_PAD_TO = 8  # as reqnoise.train.data: 1 + a multiple of 8 tokens per row


def check_pair(ex, where: str) -> dict:
    """One preference pair, checked; returns ``{"prompt", "chosen", "rejected", "system"?}``."""
    if not isinstance(ex, dict):
        raise ReqnoiseError(f"{where}: expected a JSON object with {', '.join(PAIR_KEYS)}")
    missing = [k for k in PAIR_KEYS if k not in ex]
    if missing:
        raise ReqnoiseError(f"{where}: a DPO pair needs {', '.join(PAIR_KEYS)}; missing {', '.join(missing)}")
    for key in (*PAIR_KEYS, "system"):
        if key in ex and not (isinstance(ex[key], str) and ex[key].strip()):
            raise ReqnoiseError(f"{where}: '{key}' must be a non-empty string")
    if ex["chosen"] == ex["rejected"]:
        raise ReqnoiseError(f"{where}: 'chosen' and 'rejected' are the same text; the pair carries no preference")
    return {k: ex[k] for k in (*PAIR_KEYS, "system") if k in ex}


def load_pair_data(data) -> dict:
    """``{"train": [...], "valid": [...]}`` from a directory (train.jsonl, optional valid.jsonl), a JSONL file
    (train only) or a list of pair dicts; every pair checked by ``check_pair``."""
    if isinstance(data, (str, Path)):
        root = Path(data)
        files = {"train": root} if root.is_file() else {s: root / f"{s}.jsonl" for s in ("train", "valid")}
        if not files["train"].is_file():
            raise ReqnoiseError(f"DPO data {root} is neither a pairs JSONL file nor a directory with train.jsonl")
        splits = {
            s: [check_pair(ex, where) for _, where, ex in iter_jsonl(f)] if f.is_file() else []
            for s, f in files.items()
        }
        splits.setdefault("valid", [])
    else:
        splits = {"train": [check_pair(ex, f"data[{i}]") for i, ex in enumerate(data)], "valid": []}
    if not splits["train"]:
        raise ReqnoiseError(f"no DPO pairs in {data if isinstance(data, (str, Path)) else 'data'}")
    return splits


def _messages(pair: dict) -> list:
    sys_msg = [{"role": "system", "content": pair["system"]}] if "system" in pair else []
    return sys_msg + [{"role": "user", "content": pair["prompt"]}]


def tokenize_pairs(pairs, tokenizer, max_seq_length: int, split: str = "train") -> tuple[list, int]:
    """Token rows of each pair: ``[(chosen tokens, offset), (rejected tokens, offset)]`` with ``offset`` the
    rendered prompt's length; refuses a pair with no reply token left within ``max_seq_length``.

    Returns ``(rows, number of truncated replies)``.
    """

    def encode(text):
        return list(tokenizer.encode(text, add_special_tokens=False))

    rows, truncated = [], 0
    for i, pair in enumerate(pairs):
        msgs = _messages(pair)
        offset = len(encode(render_chat(tokenizer, msgs, add_generation_prompt=True)))
        row = []
        for key in ("chosen", "rejected"):
            tokens = encode(
                render_chat(
                    tokenizer, msgs + [{"role": "assistant", "content": pair[key]}], add_generation_prompt=False
                )
            )
            if min(len(tokens), max_seq_length) <= offset:
                raise ReqnoiseError(
                    f"{split} pair {i}: the prompt takes {offset} tokens, leaving no '{key}' token within "
                    f"max_seq_length={max_seq_length}"
                )
            truncated += len(tokens) > max_seq_length
            row.append((tokens[:max_seq_length], offset))
        rows.append(row)
    return rows, truncated


def _pad(seqs) -> tuple[np.ndarray, np.ndarray]:
    """``[(tokens, offset)]`` -> tokens [R, T] int32 (T = 1 + a multiple of 8) and [(offset, length)] [R, 2]."""
    width = 1 + _PAD_TO * math.ceil(max(len(t) for t, _ in seqs) / _PAD_TO)
    arr = np.zeros((len(seqs), width), np.int32)
    for r, (tokens, _) in enumerate(seqs):
        arr[r, : len(tokens)] = tokens
    return arr, np.array([[off, len(t)] for t, off in seqs], np.int32)


def reply_logps(model, tokens, lengths):
    """Summed log-probabilities of the reply tokens, per row: tokens [R, T], lengths [R, 2] = (offset, length)
    with the reply at positions offset..length-1 (mx arrays) -> [R] float32."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(tokens[:, :-1]).astype(mx.float32)
    logp = -nn.losses.cross_entropy(logits, tokens[:, 1:])
    pos = mx.arange(1, tokens.shape[1])  # position of each target token
    mask = (pos >= lengths[:, 0:1]) & (pos < lengths[:, 1:2])
    return (logp * mask).sum(axis=1)


def pair_logps(model, rows, batch_size: int) -> np.ndarray:
    """``reply_logps`` of every pair's chosen and rejected reply: [N, 2] float32, in batches (no gradients)."""
    import mlx.core as mx

    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        arr, lengths = _pad([seq for row in chunk for seq in row])
        scores = reply_logps(model, mx.array(arr), mx.array(lengths))
        mx.eval(scores)
        out.append(np.array(scores).reshape(-1, 2))
    return np.concatenate(out, axis=0)


class PairDataset:
    """Item ``i``: the pair's two token rows and its reference log-probabilities ``[chosen, rejected]``."""

    def __init__(self, rows, reference: np.ndarray):
        self.rows, self.reference = rows, reference

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i], self.reference[i]


def pair_batches(dataset, batch_size, max_seq_length, loop=False, comm_group=None, *, seed=0):
    """mlx-lm's ``iterate_batches`` contract for pairs, seeded as ``reqnoise.train.data.seeded_batches``: each
    epoch a permutation of all pairs from ``seed`` (training, endless) or every pair once in order
    (validation). Yields ``(tokens [2B, T], lengths [2B, 2], reference [B, 2])``, the B chosen rows first."""
    import mlx.core as mx

    if comm_group is not None and comm_group.size() > 1:
        raise ReqnoiseError("DPO training runs in one process; launch it without mlx.launch")
    for idx in seeded_index_batches(len(dataset), batch_size, loop=loop, seed=seed):
        items = [dataset[i] for i in idx]
        arr, lengths = _pad([row[0] for row, _ in items] + [row[1] for row, _ in items])
        yield mx.array(arr), mx.array(lengths), mx.array(np.stack([ref for _, ref in items]))


def dpo_loss(model, tokens, lengths, reference, *, beta: float):
    """The DPO sigmoid loss of a ``pair_batches`` batch, in mlx-lm's loss contract: ``(mean loss, pair count)``."""
    import mlx.core as mx
    import mlx.nn as nn

    scores = reply_logps(model, tokens, lengths)
    b = reference.shape[0]
    margin = (scores[:b] - scores[b:]) - (reference[:, 0] - reference[:, 1])
    return -nn.log_sigmoid(beta * margin).mean(), mx.array(b)


def dpo_datasets(splits: dict, tokenizer, config, reference_model) -> tuple:
    """Tokenized pair datasets with their reference log-probabilities from ``reference_model`` (an mlx-lm
    model before any adapter). Returns ``(train_set, valid_set or None, truncated reply count)``."""
    sets, truncated = {}, 0
    for split, pairs in splits.items():
        if not pairs:
            sets[split] = None
            continue
        rows, t = tokenize_pairs(pairs, tokenizer, config.max_seq_length, split)
        truncated += t
        sets[split] = PairDataset(rows, pair_logps(reference_model, rows, config.batch_size))
    return sets["train"], sets.get("valid"), truncated


def _single_turn(msgs) -> tuple[str | None, str] | None:
    """``(system or None, user prompt)`` of a ``[system?, user, assistant]`` chat, else None."""
    roles = [m["role"] for m in msgs]
    if roles == ["user", "assistant"]:
        return None, msgs[0]["content"]
    if roles == ["system", "user", "assistant"]:
        return msgs[0]["content"], msgs[1]["content"]
    return None


def _greedy_replies(model_dir, prompts: list, max_tokens: int, batch_size: int, progress: bool, desc: str) -> list:
    """Greedy replies of the model at ``model_dir`` to ``[(system, prompt)]``, thinking off; the model is
    released before returning."""
    from mlx_lm.utils import load

    from reqnoise.eval.multiple_choice import encode_prompt, generate_texts

    net, tokenizer = load(str(model_dir))
    encoded = [
        encode_prompt(tokenizer, render_chat(tokenizer, _messages(_as_pair(s, p)), add_generation_prompt=True))
        for s, p in prompts
    ]
    texts = generate_texts(
        net, tokenizer, encoded, max_tokens=max_tokens, batch_size=batch_size, progress=progress, desc=desc
    )
    del net
    return texts


def _as_pair(system, prompt) -> dict:
    return {"prompt": prompt, **({"system": system} if system is not None else {})}


def build_dpo_pairs(
    base,
    data,
    out,
    *,
    model=None,
    prompts=None,
    min_chars: int = 10,
    system: str | None = None,
    drop_patterns=None,
    max_tokens: int = 256,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """DPO pairs after the persona-override recipe: chosen = the real reply in ``data``, rejected = the
    ``base`` model's greedy reply (thinking off) to the same prompt.

    Args:
        base: model directory whose replies are rejected (the model before SFT).
        data: chat JSONL file or directory with train.jsonl (and valid.jsonl); single-turn examples
            ``[system?, user, assistant]`` are used, others counted as ``multi_turn`` and skipped. The
            cleaning recipe of ``reqnoise.train.clean_data`` applies first (``min_chars``, ``drop_patterns``,
            ``system`` replacing the system prompt).
        out: output directory (train.jsonl, valid.jsonl when ``data`` has one), written atomically.
        model: optional model directory (the SFT model); its greedy reply is recorded per pair as
            ``sft_reply`` for inspection (not used by the loss).
        prompts: optional JSONL of ``{"prompt": str}``: only examples whose user prompt is listed are used;
            a listed prompt found nowhere in ``data`` is refused.
    Returns counts: ``{"read", "kept", "skipped": {reason: n}, "pairs": {split: n}}``; pairs whose base reply
    is empty or equals the chosen reply are skipped (``rejected_empty``, ``rejected_is_chosen``).
    """

    drop_patterns = tuple(DEFAULT_DROP_PATTERNS if drop_patterns is None else drop_patterns)
    src = Path(data)
    files = {"train": src} if src.is_file() else {s: src / f"{s}.jsonl" for s in ("train", "valid")}
    if not files["train"].is_file():
        raise ReqnoiseError(f"--chosen-from {src} is neither a chat JSONL file nor a directory with train.jsonl")
    for name, path in (("base", base), ("model", model)):
        if path is not None and not (Path(path) / "config.json").is_file():
            raise ReqnoiseError(f"{name} model directory {path} has no config.json")
    if system is not None and (not system.strip() or "\n" in system.strip()):
        raise ReqnoiseError("system must be one non-empty line")
    check_target(Path(out), overwrite)
    wanted = None
    if prompts is not None:
        wanted = {}
        for _, where, ex in iter_jsonl(Path(prompts)):
            if not isinstance(ex, dict) or not isinstance(ex.get("prompt"), str):
                raise ReqnoiseError(f"{where}: expected {{'prompt': str}}")
            wanted[ex["prompt"]] = where
    counts = {"read": 0, "kept": 0, "skipped": {}, "pairs": {}}

    def skip(reason):
        counts["skipped"][reason] = counts["skipped"].get(reason, 0) + 1

    rows = {}
    for split, path in files.items():
        if not path.is_file():
            continue
        rows[split] = []
        for _, where, ex in iter_jsonl(path):
            msgs = _check_messages(ex, where)
            counts["read"] += 1
            reason = _drop_reason(msgs, min_chars, drop_patterns)
            turn = _single_turn(msgs)
            if reason is None and turn is None:
                reason = "multi_turn"
            if reason is None and wanted is not None and turn[1] not in wanted:
                reason = "not_in_prompts"
            if reason is not None:
                skip(reason)
                continue
            sys_text = system.strip() if system is not None else turn[0]
            rows[split].append({**_as_pair(sys_text, turn[1]), "chosen": msgs[-1]["content"]})
    if wanted is not None:
        found = {r["prompt"] for rs in rows.values() for r in rs}
        absent = [w for p, w in wanted.items() if p not in found]
        if absent:
            raise ReqnoiseError(f"{len(absent)} listed prompt(s) have no usable example in {src}, first {absent[0]}")
    flat = [r for rs in rows.values() for r in rs]
    if not flat:
        raise ReqnoiseError(f"no usable single-turn example in {src} after cleaning ({counts['skipped']})")
    keys = [(r.get("system"), r["prompt"]) for r in flat]
    rejected = _greedy_replies(base, keys, max_tokens, batch_size, progress, "base replies")
    sft = _greedy_replies(model, keys, max_tokens, batch_size, progress, "sft replies") if model else None
    for i, r in enumerate(flat):
        r["rejected"] = rejected[i]
        if sft is not None:
            r["sft_reply"] = sft[i]
    kept = {}
    for split, rs in rows.items():
        kept[split] = []
        for r in rs:
            if not r["rejected"].strip():
                skip("rejected_empty")
            elif r["rejected"].strip() == r["chosen"].strip():
                skip("rejected_is_chosen")
            else:
                kept[split].append(r)
        counts["pairs"][split] = len(kept[split])
        counts["kept"] += len(kept[split])
    if not kept["train"]:
        raise ReqnoiseError(f"no train pair left for {out} (skipped {counts['skipped']})")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for split, rs in kept.items():
            (tmp / f"{split}.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs), encoding="utf-8"
            )
    return counts
