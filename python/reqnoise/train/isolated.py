"""One adapter trained in a child process outside the launched group.

Under ``mlx.launch`` mlx-lm's trainer joins the global group and trains data-parallel, whose sums run in
another order than one process's. The experiment runner instead gives each training step to one rank, which
trains it here, in a child process that does not see the launcher's environment: its adapter is byte for byte
what a single process writes, so a study's results do not depend on how many ranks ran it.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from reqnoise.distributed import without_launcher
from reqnoise.errors import ReqnoiseError


def train_alone(model, data, adapter_path, *, progress: bool = False, **options) -> dict:
    """``train_adapter(model, data, adapter_path, progress=progress, **options)`` in a child process of one
    rank; ``data`` a path and ``options`` JSON values (TrainConfig fields). Returns its summary dict; a
    failure is a ReqnoiseError with the child's one-line reason."""
    env = without_launcher(os.environ)
    with tempfile.TemporaryDirectory(prefix="reqnoise-train-") as tmp:
        result = Path(tmp) / "result.json"
        job = dict(
            model=str(model),
            data=str(data),
            adapter_path=str(adapter_path),
            progress=progress,
            options=options,
            result=str(result),
        )
        proc = subprocess.run(
            [sys.executable, "-m", "reqnoise.train.isolated"],
            input=json.dumps(job),
            env=env,
            stdout=None if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        out = json.loads(result.read_text()) if result.is_file() else None
    if out is None or proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        reason = out["error"] if out and "error" in out else (lines[-1] if lines else f"exit code {proc.returncode}")
        raise ReqnoiseError(f"training {adapter_path} in a child process failed: {reason}")
    return out["summary"]


def _main():
    from reqnoise.train.tuner import train_adapter

    job = json.loads(sys.stdin.read())
    result = Path(job["result"])
    try:
        summary = train_adapter(
            job["model"], job["data"], job["adapter_path"], progress=job["progress"], **job["options"]
        )
    except ReqnoiseError as err:
        result.write_text(json.dumps({"error": str(err)}))
        sys.exit(1)
    result.write_text(json.dumps({"summary": summary}, default=str))


if __name__ == "__main__":
    _main()
