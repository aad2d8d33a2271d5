"""Content-addressed step cache for the experiment runner.

A step's key is the SHA-256 of its kind, parameters, the keys of the steps it depends on and the content of
the external files it reads. Its outputs live in ``OUT/steps/<name>/`` with ``step.json`` written last; a
directory whose ``step.json`` holds the current key is reused, anything else is recomputed. A changed step
therefore reruns itself and, through the keys, exactly the steps that depend on it.

``step.json`` also holds the step's provenance (``reqnoise.stats.prereg.step_provenance``: when it was computed,
under which lock), written once when the step is computed; a cache hit serves it unchanged.
"""

import hashlib
import json
import time
from pathlib import Path

from reqnoise import __version__, atomic
from reqnoise.stats.prereg import step_provenance

STEP_FILE = "step.json"


def hash_path(path: Path) -> str:
    """SHA-256 over a file, or over every file of a directory (relative names and bytes, sorted)."""
    h = hashlib.sha256()
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


# Files of a model directory that do not change what the model computes: how the tensors are sharded, and
# reqnoise's own record of how a fuse was made.
LAYOUT_ONLY = ("model.safetensors.index.json", "fuse_report.json")


def model_fingerprint(path: Path) -> str:
    """SHA-256 of what a model directory computes with: every tensor (name, dtype, shape, bytes, in name order,
    whatever shards hold them) and every other file's bytes except ``LAYOUT_ONLY``. Two directories with one
    fingerprint give the same outputs; a keep-grid zero-delta fuse of a model has that model's fingerprint."""
    import mlx.core as mx

    path = Path(path)
    h = hashlib.sha256()
    shards = sorted(path.glob("*.safetensors"))
    digests = {}
    for shard in shards:  # one shard in memory at a time
        for name, arr in mx.load(str(shard)).items():
            t = hashlib.sha256(f"{arr.dtype}{tuple(arr.shape)}".encode())
            t.update(memoryview(arr))
            digests[name] = t.hexdigest()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p not in shards and p.name not in LAYOUT_ONLY):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


_CODE_HASH = None


def code_hash() -> str:
    """SHA-256 of reqnoise's own Python sources: a code change is a change of every step."""
    global _CODE_HASH
    if _CODE_HASH is None:
        root = Path(__file__).parent.parent  # the whole reqnoise package
        h = hashlib.sha256()
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
        _CODE_HASH = h.hexdigest()
    return _CODE_HASH


def step_key(kind: str, params: dict, dep_keys: list, inputs: list) -> str:
    payload = {
        "kind": kind,
        "params": params,
        "deps": sorted(dep_keys),
        "version": __version__,
        "code": code_hash(),
        "inputs": [hash_path(p) for p in inputs],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class StepCache:
    """Step directories under ``root/steps``. ``lock_sha256``: the SHA-256 of the pre-registration lock in
    force (None: no lock), recorded in the provenance of every step computed from now on."""

    def __init__(self, root: Path, lock_sha256: str | None = None):
        self.root = Path(root) / "steps"
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock_sha256 = lock_sha256

    def dir(self, name: str) -> Path:
        return self.root / name

    def lookup(self, name: str, key: str):
        """The step's summary if its directory holds this key, else None."""
        f = self.dir(name) / STEP_FILE
        if not f.is_file():
            return None
        try:
            rec = json.loads(f.read_text())
        except json.JSONDecodeError:
            return None
        return rec if rec.get("key") == key else None

    def run(self, name: str, key: str, fn):
        """Reuse or compute a step. ``fn(tmp_dir) -> dict`` writes the step's files into ``tmp_dir``.
        Returns (record, cached); the record's ``provenance`` is that of the computation, never of a reuse."""
        hit = self.lookup(name, key)
        if hit is not None:
            return hit, True
        t0 = time.perf_counter()
        provenance = step_provenance(self.lock_sha256)  # the time the computation starts
        with atomic.atomic_dir(self.dir(name), overwrite=True) as tmp:
            summary = fn(tmp) or {}
            rec = {
                "name": name,
                "key": key,
                "seconds": round(time.perf_counter() - t0, 3),
                "summary": summary,
                "provenance": provenance,
            }
            (tmp / STEP_FILE).write_text(json.dumps(rec, indent=2, default=str) + "\n")
        return rec, False
