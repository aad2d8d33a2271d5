"""JSON inputs: line-numbered JSONL reading (records, items, chat data) and single JSON-object files
(configs, indexes, locks), each failing with a message that names the file."""

import json
from pathlib import Path

from reqnoise.errors import ReqnoiseError


def iter_jsonl(path, errors: list | None = None):
    """Yield ``(lineno, where, obj)`` for each non-blank line of ``path``; ``where`` is ``"file:line"``.

    A line that is not valid JSON raises ``ReqnoiseError`` naming ``file:line``, or, when an ``errors`` list is
    given, is appended to it as a message and skipped (for readers that report every bad line at once)."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                msg = f"{where}: not valid JSON ({err.msg})"
                if errors is None:
                    raise ReqnoiseError(msg) from None
                errors.append(msg)
                continue
            yield lineno, where, obj


def read_json(path, what: str) -> dict:
    """A file holding one JSON object; ``what`` names it in errors ("model config", "lock file")."""
    path = Path(path)
    if not path.is_file():
        raise ReqnoiseError(f"{what} {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReqnoiseError(f"{what} {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ReqnoiseError(f"{what} {path} must hold a JSON object")
    return data
