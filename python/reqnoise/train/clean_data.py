"""Cleaning chat training data, after the recipe of the persona-override research that motivated reqnoise.

Per example, the response is the LAST assistant message (what ``--mask-prompt`` training learns). An example
is dropped, under the first reason that applies, when it has no assistant message (``no_response``), when
its response is shorter than ``min_chars`` after stripping (``too_short``), or when its response contains a
drop pattern as a literal, case-sensitive substring (``pattern: P``, counted per pattern). Kept examples keep
every message and field; with ``system`` the system prompt is replaced by that one line (or inserted first
when there is none): long, varying system prompts dilute what the adapter learns.
"""

import json
from pathlib import Path

from reqnoise.atomic import atomic_dir, atomic_file
from reqnoise.errors import ReqnoiseError
from reqnoise.jsonl import iter_jsonl

DEFAULT_DROP_PATTERNS = ("[Request interrupted", "[No response", "No response requested")
SPLITS = ("train", "valid", "test")


def _new_counts(drop_patterns) -> dict:
    return {
        "read": 0,
        "kept": 0,
        "skipped": {"no_response": 0, "too_short": 0, **{f"pattern: {p}": 0 for p in drop_patterns}},
        "system_replaced": 0,
        "system_inserted": 0,
    }


def _check_messages(ex, where: str) -> list:
    msgs = ex.get("messages") if isinstance(ex, dict) else None
    if not isinstance(msgs, list):
        raise ReqnoiseError(f"{where}: expected a JSON object with a 'messages' list (mlx-lm chat format)")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ReqnoiseError(
                f"{where}: messages[{i}] must be {{'role': str, 'content': str}}, got {json.dumps(m)[:120]}"
            )
    return msgs


def _drop_reason(msgs, min_chars: int, drop_patterns):
    responses = [m["content"] for m in msgs if m["role"] == "assistant"]
    if not responses:
        return "no_response"
    response = responses[-1]
    if len(response.strip()) < min_chars:
        return "too_short"
    for p in drop_patterns:
        if p in response:
            return f"pattern: {p}"
    return None


def _with_system(msgs, system: str, counts: dict) -> list:
    rest = [m for m in msgs if m["role"] != "system"]
    counts["system_replaced" if len(rest) < len(msgs) else "system_inserted"] += 1
    return [{"role": "system", "content": system}] + rest


def _clean_file(src: Path, dst: Path, min_chars, system, drop_patterns) -> dict:
    counts = _new_counts(drop_patterns)
    lines = []
    for _, where, ex in iter_jsonl(src):
        msgs = _check_messages(ex, where)
        counts["read"] += 1
        reason = _drop_reason(msgs, min_chars, drop_patterns)
        if reason is not None:
            counts["skipped"][reason] += 1
            continue
        if system is not None:
            ex = {**ex, "messages": _with_system(msgs, system, counts)}
        lines.append(json.dumps(ex, ensure_ascii=False) + "\n")
        counts["kept"] += 1
    with atomic_file(dst, overwrite=True, encoding="utf-8") as out:
        out.writelines(lines)
    return counts


def _total(per_file: dict, drop_patterns) -> dict:
    total = _new_counts(drop_patterns)
    for c in per_file.values():
        for key, value in c.items():
            if key == "skipped":
                for reason, k in value.items():
                    total["skipped"][reason] += k
            else:
                total[key] += value
    return total


def clean_chat_data(
    in_path, out_path, *, min_chars=10, system=None, drop_patterns=DEFAULT_DROP_PATTERNS, overwrite=False
) -> dict:
    """Clean a chat JSONL file, or a directory of train/valid/test.jsonl, into ``out_path`` (same kind).

    Args:
        min_chars: drop responses shorter than this many characters after ``strip()``.
        system: if given, every kept example's system prompt becomes this one line.
        drop_patterns: literal substrings; a response containing any is dropped.
        overwrite: replace an existing ``out_path`` (written atomically; the input is never modified).

    Returns ``{"files": {name: counts}, "total": counts}`` where counts holds ``read``, ``kept``,
    ``skipped`` ({reason: n}, reasons ``no_response``, ``too_short``, ``pattern: P``), ``system_replaced``
    and ``system_inserted``.
    """
    src, dst = Path(in_path), Path(out_path)
    drop_patterns = tuple(drop_patterns)
    if min_chars < 0:
        raise ReqnoiseError(f"min_chars must be >= 0, got {min_chars}")
    if any(not p for p in drop_patterns):
        raise ReqnoiseError("an empty drop pattern would drop every example")
    if system is not None and (not system.strip() or "\n" in system.strip()):
        raise ReqnoiseError("system must be one non-empty line")
    if src.resolve() == dst.resolve():
        raise ReqnoiseError(f"output {dst} is the input; write the cleaned data elsewhere")
    args = (min_chars, None if system is None else system.strip(), drop_patterns)
    if src.is_dir():
        names = [f"{s}.jsonl" for s in SPLITS if (src / f"{s}.jsonl").is_file()]
        if not names:
            raise ReqnoiseError(f"{src} holds none of {', '.join(s + '.jsonl' for s in SPLITS)}")
        per_file = {}
        with atomic_dir(dst, overwrite=overwrite) as tmp:
            for name in names:
                per_file[name] = _clean_file(src / name, tmp / name, *args)
    elif src.is_file():
        if dst.exists() and not overwrite:
            raise ReqnoiseError(f"{dst} already exists (pass --overwrite / overwrite=True to replace it)")
        if dst.is_dir():
            raise ReqnoiseError(f"{src} is a file, so the output must be a file, but {dst} is a directory")
        per_file = {src.name: _clean_file(src, dst, *args)}
    else:
        raise ReqnoiseError(f"input {src} does not exist")
    return {"files": per_file, "total": _total(per_file, drop_patterns)}
