"""Running a reqnoise command as N ranks on this host, for the scaling benchmarks.

``via_launch`` uses ``mlx.launch --backend ring``. ``direct`` starts the ranks the way mlx.launch starts them on
one host (a ring hostfile, ``MLX_RANK``, ``MLX_HOSTFILE``) but without its I/O relay: per rank, that relay polls
the rank's stdin pipe in a loop that never blocks (its ``select`` includes that always-writable pipe) and takes
most of a core, which a 2-core machine cannot spare. Both return the ranks' combined stdout + stderr.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def via_launch(args, n=2) -> str:
    launcher = str(Path(sys.executable).parent / "mlx.launch")
    p = subprocess.run(
        [launcher, "--backend", "ring", "-n", str(n), "--python", sys.executable] + args,
        check=True,
        capture_output=True,
        text=True,
    )
    return p.stdout + p.stderr


def direct(args, n=2, port=5610) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump([[f"127.0.0.1:{port + r}"] for r in range(n)], fh)
    procs = [
        subprocess.Popen(
            [sys.executable] + args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, MLX_RANK=str(r), MLX_HOSTFILE=fh.name),
        )
        for r in range(n)
    ]
    outs = [p.communicate() for p in procs]
    os.unlink(fh.name)
    for r, (p, (_out, err)) in enumerate(zip(procs, outs)):
        if p.returncode:
            raise SystemExit(f"rank {r} failed:\n{err[-3000:]}")
    return "".join(o + e for o, e in outs)
