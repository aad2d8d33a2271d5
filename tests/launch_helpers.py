"""Running ``python -m reqnoise ...`` as 2 ring ranks on localhost under mlx.launch, for the distributed tests."""

import subprocess
import sys
from pathlib import Path

import pytest


def launcher():
    """The ``mlx.launch`` beside this interpreter, or None."""
    exe = Path(sys.executable).parent / "mlx.launch"
    return str(exe) if exe.exists() else None


needs_launcher = pytest.mark.skipif(launcher() is None, reason="mlx.launch not installed beside the interpreter")


def launch(args, timeout=600, **kw):
    """``mlx.launch --backend ring -n 2 ... -m reqnoise *args``; the completed process (text output)."""
    return subprocess.run(
        [launcher(), "--backend", "ring", "-n", "2", "--python", sys.executable, "-m", "reqnoise", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )
