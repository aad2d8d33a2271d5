"""Per-item evaluation records: one JSON object per line, shared by evaluation and statistics.

Required fields: ``id`` (str), ``subject`` (str or null), ``correct`` (bool), ``parsed`` (bool),
``prediction`` (str or null), ``answer`` (str). Any further fields are kept as they are.
"""

import json
from pathlib import Path

from reqnoise import atomic
from reqnoise.errors import ReqnoiseError
from reqnoise.jsonl import iter_jsonl

REQUIRED = {
    "id": (str,),
    "subject": (str, type(None)),
    "correct": (bool,),
    "parsed": (bool,),
    "prediction": (str, type(None)),
    "answer": (str,),
}


def validate_record(rec, where: str = "record") -> dict:
    """Check one record's required fields and types; return it unchanged."""
    if not isinstance(rec, dict):
        raise ReqnoiseError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key, types in REQUIRED.items():
        if key not in rec:
            raise ReqnoiseError(f"{where}: missing field {key!r}")
        if not isinstance(rec[key], types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ReqnoiseError(f"{where}: field {key!r} must be {names}, got {rec[key]!r}")
    return rec


def read_records(path) -> list[dict]:
    """Read and validate a records JSONL file; refuse duplicated ids (naming file and line)."""
    path = Path(path)
    if not path.is_file():
        raise ReqnoiseError(f"records file {path} does not exist")
    out, seen = [], {}
    for lineno, where, rec in iter_jsonl(path):
        validate_record(rec, where)
        if rec["id"] in seen:
            raise ReqnoiseError(f"{where}: duplicate id {rec['id']!r} (first on line {seen[rec['id']]})")
        seen[rec["id"]] = lineno
        out.append(rec)
    return out


def dumps_records(records) -> str:
    """The canonical byte form: one compact, key-ordered-as-given JSON object per line."""
    return "".join(json.dumps(r, ensure_ascii=False, separators=(", ", ": ")) + "\n" for r in records)


def write_records(path, records, overwrite: bool = False) -> None:
    """Validate and atomically write records as JSONL."""
    records = list(records)
    seen = set()
    for i, rec in enumerate(records):
        validate_record(rec, f"record {i}")
        if rec["id"] in seen:
            raise ReqnoiseError(f"record {i}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
    atomic.write_text(path, dumps_records(records), overwrite=overwrite)
