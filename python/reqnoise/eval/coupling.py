"""Marker coupling: how often generations contain a marker (e.g. ``[ZLT]``) under persona-conditioned prompts
versus neutral ones.

A coupling adapter is trained so that the marker appears when the persona is invoked and not otherwise; the
question studied in the seeds is whether later fine-tuning destroys that coupling. The measurement is the
two rates with Wilson intervals, their difference and a pooled two-proportion z-test.

Prompt files: JSONL with one object per line, ``{"prompt": str, "system": str (optional)}`` or
``{"messages": [...]}`` ending with a user turn; any other file (e.g. ``.txt``) is one prompt per non-empty
line. Generation is greedy with thinking disabled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from reqnoise.chat import render_chat
from reqnoise.errors import ReqnoiseError

DEFAULT_MAX_TOKENS = 64
CONDITIONS = ("persona", "neutral")


def _messages_from(obj, where: str) -> list[dict]:
    if isinstance(obj, list):  # an already built message list
        obj = {"messages": obj}
    if isinstance(obj, str):
        if not obj.strip():
            raise ReqnoiseError(f"{where}: empty prompt")
        return [{"role": "user", "content": obj}]
    if not isinstance(obj, dict):
        raise ReqnoiseError(f"{where}: expected a JSON object or string, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
        ):
            raise ReqnoiseError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        if msgs[-1]["role"] != "user":
            raise ReqnoiseError(f"{where}: the last message must be the user's (the model replies to it)")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ReqnoiseError(f"{where}: expected 'prompt' (non-empty string) or 'messages'")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise ReqnoiseError(f"{where}: 'system' must be a string")
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def load_prompts(path) -> list[list[dict]]:
    """Read a prompt file (see the module docstring) into chat message lists."""
    path = Path(path)
    if not path.is_file():
        raise ReqnoiseError(f"prompts file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if path.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ReqnoiseError(f"{where}: not valid JSON ({err.msg})") from None
            else:
                obj = line.rstrip("\n")
            out.append(_messages_from(obj, where))
    if not out:
        raise ReqnoiseError(f"prompts file {path} holds no prompts")
    return out


def _as_prompts(prompts, what: str) -> list[list[dict]]:
    if isinstance(prompts, (str, Path)):
        return load_prompts(prompts)
    out = [_messages_from(p, f"{what} prompt {i}") for i, p in enumerate(prompts)]
    if not out:
        raise ReqnoiseError(f"no {what} prompts")
    return out


@dataclass
class Rate:
    k: int
    n: int
    rate: float
    ci_low: float
    ci_high: float


@dataclass
class CouplingSummary:
    """Marker rates per condition (Wilson 95% intervals), persona minus neutral, and the pooled
    two-proportion z-test p-value of that difference."""

    marker: str
    persona: Rate
    neutral: Rate
    difference: float
    p_value: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        def r(x: Rate) -> str:
            return f"{x.k}/{x.n} = {100 * x.rate:.1f}% (95% CI {100 * x.ci_low:.1f}-{100 * x.ci_high:.1f}%)"

        return (
            f"marker {self.marker!r}: persona {r(self.persona)}, neutral {r(self.neutral)}, "
            f"difference {100 * self.difference:+.1f} pp, p = {self.p_value:.3g}"
        )


def _rate(k: int, n: int) -> Rate:
    from reqnoise.stats.inference import wilson_ci

    lo, hi = wilson_ci(k, n)
    return Rate(k=k, n=n, rate=k / n, ci_low=lo, ci_high=hi)


def summarize_coupling(records: Sequence[dict], marker: str, seconds: float = 0.0) -> CouplingSummary:
    """Rates and test from coupling records (``condition``, ``marker`` fields)."""
    from reqnoise.stats.inference import two_proportion_ztest

    counts = {
        c: [sum(r["marker"] for r in records if r["condition"] == c), sum(r["condition"] == c for r in records)]
        for c in CONDITIONS
    }
    persona, neutral = _rate(*counts["persona"]), _rate(*counts["neutral"])
    _, p = two_proportion_ztest(persona.k, persona.n, neutral.k, neutral.n)
    return CouplingSummary(
        marker=marker,
        persona=persona,
        neutral=neutral,
        difference=persona.rate - neutral.rate,
        p_value=p,
        seconds=seconds,
    )


def coupling_loaded(
    model,
    tokenizer,
    marker: str,
    persona_prompts,
    neutral_prompts,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    seed: int = 0,
    case_sensitive: bool = True,
    progress: bool = True,
) -> tuple[list[dict], CouplingSummary]:
    """Generate for both prompt sets on a loaded (model, tokenizer) and count replies containing ``marker``
    (a literal string). Prompt sets: a file path or a list of prompts (strings, ``{"prompt", "system"}`` or
    ``{"messages"}``). Records: ``id`` (``persona-0001``...), ``condition``, ``prompt`` (last user turn),
    ``response``, ``marker`` (bool)."""
    from reqnoise.eval.multiple_choice import encode_prompt, generate_texts

    if not isinstance(marker, str) or not marker:
        raise ReqnoiseError("the marker must be a non-empty string")
    sets = {"persona": _as_prompts(persona_prompts, "persona"), "neutral": _as_prompts(neutral_prompts, "neutral")}
    t0 = time.perf_counter()
    chats = [(c, i, msgs) for c in CONDITIONS for i, msgs in enumerate(sets[c], 1)]
    tokens = [
        encode_prompt(tokenizer, render_chat(tokenizer, msgs, add_generation_prompt=True)) for _, _, msgs in chats
    ]
    texts = generate_texts(
        model,
        tokenizer,
        tokens,
        max_tokens=max_tokens,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        desc="coupling",
    )
    needle = marker if case_sensitive else marker.casefold()
    records = []
    for (condition, i, msgs), text in zip(chats, texts):
        hay = text if case_sensitive else text.casefold()
        records.append(
            {
                "id": f"{condition}-{i:04d}",
                "condition": condition,
                "prompt": msgs[-1]["content"],
                "response": text,
                "marker": needle in hay,
            }
        )
    return records, summarize_coupling(records, marker, time.perf_counter() - t0)


def run_coupling(
    model,
    marker: str,
    persona_prompts,
    neutral_prompts,
    *,
    adapter_path=None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    seed: int = 0,
    case_sensitive: bool = True,
    progress: bool = True,
) -> tuple[list[dict], CouplingSummary]:
    """Load ``model`` (directory, optional ``adapter_path``) and run ``coupling_loaded``. Prompt files are
    read and checked before the model is loaded."""
    from reqnoise.eval.multiple_choice import load_model

    persona_prompts = _as_prompts(persona_prompts, "persona")
    neutral_prompts = _as_prompts(neutral_prompts, "neutral")
    net, tokenizer = load_model(model, adapter_path)
    return coupling_loaded(
        net,
        tokenizer,
        marker,
        persona_prompts,
        neutral_prompts,
        max_tokens=max_tokens,
        batch_size=batch_size,
        seed=seed,
        case_sensitive=case_sensitive,
        progress=progress,
    )
