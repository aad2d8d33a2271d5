"""Calibration activations for ``--requant calibrated``: read the data, run the adapter model, keep each target
module's inputs (per expert for a switch stack, from the tokens routed to it), and serve Hessians a chunk of
experts at a time.

The model run is base + the unfused adapter (mlx-lm's own LoRA layers): the function the fuse should keep.
Memory: every target module's input rows (calibration tokens x top-k x in, float32) are held until the fuse
ends; ``--calib-tokens`` bounds them. Hessians are formed per expert only when the kernel asks for them.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from reqnoise.chat import render_chat
from reqnoise.errors import ReqnoiseError

DEFAULT_CALIB_TOKENS = 4096
# Below this many routed tokens an expert's Hessian is too poorly estimated to steer rounding: keep-grid.
MIN_EXPERT_TOKENS = 16

# Built-in calibration prompts: general chat, none of them noise.heldout's held-out probe prompts.
BUILTIN_PROMPTS = [
    "Describe how a river changes from its source to the sea.",
    "What are three things to check before signing a rental agreement?",
    "Explain the difference between weather and climate to a child.",
    "Write a short note thanking a colleague for their help with a project.",
    "List the steps to make a cup of tea.",
    "Why do some metals rust and others do not?",
    "Summarize the plot of a story about a lost dog finding its way home.",
    "What is a prime number? Give two examples.",
    "How does a bicycle stay upright when it moves?",
    "Give advice to someone starting to learn a musical instrument.",
    "What happens to water when it freezes?",
    "Compare trains and planes for a 500 km trip.",
    "Who keeps the records in a library, and how are books ordered?",
    "Translate the idea of 'opportunity cost' into everyday language.",
    "What should a traveller pack for a week in the mountains?",
    "Explain why the sky looks blue during the day.",
]


@dataclass
class CalibrationData:
    """Tokenized calibration sequences, where they came from and the hash of that source."""

    source: str  # a path, or "builtin"
    sha256: str
    sequences: list  # list of token-id lists
    tokens: int = 0
    format: str = "chat"
    # Every example's token ids before the token cap, also those the cap left out: what a held-out set is
    # checked against (noise.heldout), so "held out" means "not in this data", not "not in the part used".
    examples: list = field(default_factory=list)


def _example_messages(ex, where):
    """One mlx-lm dataset line -> (kind, payload): chat messages, a completion pair, or text."""
    if not isinstance(ex, dict):
        raise ReqnoiseError(f"{where}: expected a JSON object (mlx-lm formats: chat, completions, text)")
    if "messages" in ex:
        msgs = ex["messages"]
        ok = (
            isinstance(msgs, list)
            and msgs
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
        )
        if not ok:
            raise ReqnoiseError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
        return "chat", msgs
    if "prompt" in ex or "completion" in ex:
        if not isinstance(ex.get("prompt"), str) or not isinstance(ex.get("completion"), str):
            raise ReqnoiseError(f"{where}: completions format needs string 'prompt' and 'completion'")
        return "completions", [
            {"role": "user", "content": ex["prompt"]},
            {"role": "assistant", "content": ex["completion"]},
        ]
    if "text" in ex:
        if not isinstance(ex["text"], str) or not ex["text"]:
            raise ReqnoiseError(f"{where}: 'text' must be a non-empty string")
        return "text", ex["text"]
    raise ReqnoiseError(
        f"{where}: no 'messages', 'prompt'/'completion' or 'text' key (mlx-lm formats: chat, completions, text)"
    )


def _data_file(path: Path, what: str = "calibration", split: str = "train") -> Path:
    if path.is_dir():
        path = path / f"{split}.jsonl"
    if not path.is_file():
        raise ReqnoiseError(f"{what} data {path} does not exist (a .jsonl file or a directory with {split}.jsonl)")
    return path


def read_calibration_file(path, what: str = "calibration", split: str = "train") -> tuple[list, str]:
    """``[(kind, payload), ...]`` from an mlx-lm dataset file or directory (its ``split``.jsonl), and the
    file's sha256. ``what`` names the data in errors."""
    path = _data_file(Path(path), what, split)
    raw = path.read_bytes()
    examples = []
    for i, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReqnoiseError(f"{path}:{i}: not valid JSON ({err.msg})") from None
        examples.append(_example_messages(ex, f"{path}:{i}"))
    if not examples:
        raise ReqnoiseError(f"{what} data {path} is empty")
    return examples, hashlib.sha256(raw).hexdigest()


def default_source(adapter_path) -> Path | None:
    """The adapter's own training data when its adapter_config.json names it and it exists, else None."""
    cfg_path = Path(adapter_path) / "adapter_config.json"
    try:
        data = json.loads(cfg_path.read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(data, str):
        return None
    p = Path(data)
    for cand in (p, p / "train.jsonl"):
        if cand.is_file():
            return cand
    return None


def _context_length(model_dir) -> int | None:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def load_calibration(model_dir, adapter_path, calib_data=None, calib_tokens=DEFAULT_CALIB_TOKENS) -> CalibrationData:
    """Read, validate and tokenize the calibration data before any fuse work (ReqnoiseError on bad data).

    ``calib_data``: a file or directory in an mlx-lm dataset format; None: the adapter's training data if its
    config names an existing one, else ``BUILTIN_PROMPTS``. Sequences are cut at ``calib_tokens`` in total.
    """
    if calib_data is not None:
        examples, digest = read_calibration_file(calib_data)
        source = str(_data_file(Path(calib_data)))
    elif (found := default_source(adapter_path)) is not None:
        examples, digest = read_calibration_file(found)
        source = str(found)
    else:
        examples = prompt_examples(BUILTIN_PROMPTS)
        digest = hashlib.sha256("\n".join(BUILTIN_PROMPTS).encode()).hexdigest()
        source = "builtin"
    return tokenize_examples(model_dir, examples, source, digest, calib_tokens)


def prompt_examples(prompts) -> list:
    """Plain user prompts as ``(kind, payload)`` examples: one user turn each, rendered with the generation
    prompt (the tokens a model sees before it answers)."""
    return [("chat", [{"role": "user", "content": p}]) for p in prompts]


def tokenize_examples(model_dir, examples, source, digest, max_tokens, what="calibration") -> CalibrationData:
    """Tokenize ``(kind, payload)`` examples with the model's tokenizer and chat template (chat and
    completions rendered, text encoded as is) and cut them at ``max_tokens`` in total. An example longer than
    the model's context is a ReqnoiseError naming it (``what``: the data's name in errors)."""
    from mlx_lm.utils import load_tokenizer

    opt = "--calib-tokens" if what == "calibration" else f"the {what} token cap"
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ReqnoiseError(f"{opt} must be a positive integer, got {max_tokens!r}")
    tok = load_tokenizer(Path(model_dir))
    ctx = _context_length(model_dir)
    seqs, full, total = [], [], 0
    for i, (kind, payload) in enumerate(examples):
        if kind == "text":
            ids = tok.encode(payload)
        else:
            text = render_chat(tok, payload, add_generation_prompt=payload[-1]["role"] != "assistant")
            ids = tok.encode(text, add_special_tokens=False)
        if ctx is not None and len(ids) > ctx:
            raise ReqnoiseError(
                f"{what} example {i + 1} of {source} is {len(ids)} tokens, longer than the model's context {ctx}"
            )
        full.append(list(ids))
        if total < max_tokens and ids:
            ids = ids[: max_tokens - total]
            seqs.append(ids)
            total += len(ids)
    if total == 0:
        raise ReqnoiseError(f"{what} data {source} has no tokens")
    kinds = sorted({k for k, _ in examples})
    return CalibrationData(source, digest, seqs, total, "+".join(kinds), full)


@dataclass
class ModuleInputs:
    """A target module's input rows and, for a switch stack, the expert each row was routed to."""

    rows: list = field(default_factory=list)
    experts: list = field(default_factory=list)
    n_experts: int | None = None
    fallback: list = field(default_factory=list)  # experts the fuse rounded as keep-grid

    def add(self, x, indices):
        d = x.shape[-1]
        if indices is None:
            r = x.reshape(-1, d)
            e = mx.zeros((r.shape[0],), dtype=mx.int32)
        else:
            # SwitchLinear's input is [..., 1, d] against indices [...] (each row once per routed expert), or
            # any shapes gather_mm broadcasts together (deepseek_v41's grouped o_a_proj: x [L, G, d] against
            # group ids [1, G]): each row with the expert index at its position
            x = x.reshape(tuple(x.shape[:-2]) + (d,)) if x.shape[-2] == 1 else x
            lead = np.broadcast_shapes(tuple(x.shape[:-1]), tuple(indices.shape))
            r = mx.broadcast_to(x, lead + (d,)).reshape(-1, d)
            e = mx.broadcast_to(indices, lead).reshape(-1).astype(mx.int32)
        self.rows.append(np.array(r.astype(mx.float32)))
        self.experts.append(np.array(e))

    def finish(self):
        self.rows = np.concatenate(self.rows) if self.rows else np.zeros((0, 0), np.float32)
        self.experts = np.concatenate(self.experts) if self.experts else np.zeros((0,), np.int32)

    def token_counts(self) -> list:
        return np.bincount(self.experts, minlength=self.n_experts or 1).tolist()

    def hessians(self, min_tokens=MIN_EXPERT_TOKENS):
        """The ``hessian`` callable of ``fuse_quantized``: ``X^T X / n`` per expert (float64 sums, float32 out),
        None for an expert with fewer than ``min_tokens`` rows."""

        def get(e0, e1):
            out = []
            for e in range(e0, e1):
                x = self.rows[self.experts == e].astype(np.float64)
                out.append(None if len(x) < min_tokens else mx.array((x.T @ x / len(x)).astype(np.float32)))
            return out

        return get


class _Catcher:
    """Wraps a module's __call__ to record its inputs; the module itself still runs."""

    def __init__(self, store: ModuleInputs):
        self.store = store

    def wrap(self, module):
        store = self.store

        class Caught(type(module)):
            def __call__(self, x, *args, **kwargs):
                store.add(x, args[0] if args else kwargs.get("indices"))
                return super().__call__(x, *args, **kwargs)

        module.__class__ = Caught


def _get_module(model, name):
    m = model
    for part in name.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def collect_inputs(model_dir, adapter_path, targets: dict, data: CalibrationData, outputs=None) -> dict:
    """Run base + unfused adapter on ``data`` and return ``{module name: ModuleInputs}`` for ``targets``
    (name -> ModuleAdapter). ``outputs``: a list to which each sequence's logits (float32 numpy [L, vocab])
    are appended, so a caller that needs them runs the model once. The model is released before returning."""
    import mlx_lm

    model, _ = mlx_lm.load(str(model_dir), adapter_path=str(adapter_path))
    stores = {}
    for name, mod in targets.items():
        try:
            m = _get_module(model, name)
        except (AttributeError, IndexError, KeyError):
            raise ReqnoiseError(f"calibration: module {name} not found in the adapter model") from None
        stores[name] = ModuleInputs(n_experts=mod.experts)
        _Catcher(stores[name]).wrap(m)
    for seq in data.sequences:
        logits = model(mx.array(seq)[None])
        mx.eval(logits)
        if outputs is not None:
            outputs.append(np.array(logits[0].astype(mx.float32)))
    for s in stores.values():
        s.finish()
    del model
    mx.clear_cache()
    return stores
