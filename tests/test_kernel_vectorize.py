"""The affine kernel's hot loops vectorize on AArch64 (NEON) and x86-64, as the compilers themselves report.

The row kernel's plain loops (dequantize, quantize, keep-grid encode) are marked ``// hot-loop: <name>`` in
csrc/; each marked loop must get a "loop vectorized" remark from GCC's -fopt-info-vec-optimized once per scales
dtype (float32, float16, bfloat16) when fuse_kernel.cpp is compiled with the flags CMakeLists.txt uses. Bit
(un)packing and the delta tiles are written with vector types and need no remark. AArch64 is checked by
cross-compiling with Debian's g++-aarch64-linux-gnu; the test skips (with the reason) where it is absent.
"""

import pathlib
import re
import shutil
import subprocess

import mlx.core as mx
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
MLX_INCLUDE = pathlib.Path(mx.__file__).parent / "include"
# As CMakeLists.txt's REQNOISE_FP_FLAGS; the copy compiled on AArch64 is the baseline one.
FLAGS = ["-std=c++20", "-O3", "-ffp-contract=off", "-fno-math-errno"]
N_SCALE_DTYPES = 3

TARGETS = {
    "aarch64-baseline": ("aarch64-linux-gnu-g++", ["-DREQNOISE_ISA=baseline"]),
    "x86-64-v3": ("g++", ["-DREQNOISE_ISA=v3", "-march=x86-64-v3"]),
}


def hot_loops():
    """{(file name, line number): loop name} for every ``// hot-loop:`` marker in the kernel sources."""
    found = {}
    for path in (CSRC / "affine_codec.h", CSRC / "fuse_kernel.cpp"):
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            m = re.search(r"// hot-loop: (.+)$", line)
            if m:
                found[(path.name, i)] = m.group(1).strip()
    return found


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_hot_loops_vectorize(target, tmp_path):
    compiler, extra = TARGETS[target]
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} not installed (apt-get install g++-aarch64-linux-gnu)")
    if (
        target == "x86-64-v3"
        and "x86_64" not in subprocess.run([compiler, "-dumpmachine"], capture_output=True, text=True).stdout
    ):
        pytest.skip(f"{compiler} does not target x86-64")
    cmd = [compiler, *FLAGS, *extra, f"-I{CSRC}", f"-I{MLX_INCLUDE}", "-c", str(CSRC / "fuse_kernel.cpp")]
    cmd += ["-o", str(tmp_path / "k.o"), "-fopt-info-vec-optimized"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    counts = {}
    for m in re.finditer(r"([\w./-]+):(\d+):\d+: optimized: loop vectorized", res.stderr):
        key = (pathlib.Path(m.group(1)).name, int(m.group(2)))
        counts[key] = counts.get(key, 0) + 1
    loops = hot_loops()
    assert len(loops) >= 6, loops  # the markers themselves must not silently disappear
    missing = {f"{f}:{n} ({name})": counts.get((f, n), 0) for (f, n), name in loops.items()}
    missing = {k: v for k, v in missing.items() if v < N_SCALE_DTYPES}
    assert not missing, f"{target}: hot loops vectorized fewer than {N_SCALE_DTYPES} times: {missing}"
