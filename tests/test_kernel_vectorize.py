"""The affine kernel's hot loops vectorize on AArch64 (NEON) and x86-64, as the compilers themselves report.

The row kernel's plain loops (dequantize, quantize, keep-grid encode) are marked ``// hot-loop: <name>`` in
csrc/; each marked loop must get a vectorized-loop remark (GCC's -fopt-info-vec-optimized, Clang's
-Rpass=loop-vectorize) at least once per scales dtype (float32, float16, bfloat16) when fuse_kernel.cpp is
compiled with the flags CMakeLists.txt uses. Bit (un)packing, the group min/max and the delta tiles are
written with vector types and need no remark. AArch64 is checked by cross-compiling with Debian's
g++-aarch64-linux-gnu and with clang --target=aarch64-linux-gnu; a target whose compiler is absent skips
with the reason. The AArch64 copy computes the x86-64 copy's bytes (qemu), and pass 1's float-only bfloat16
rounding equals MLX's conversion wherever pass 1 uses it (all 2^32 float32 patterns).
"""

import json
import pathlib
import re
import shutil
import subprocess

import mlx.core as mx
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
MLX_INCLUDE = pathlib.Path(mx.__file__).parent / "include"
# As CMakeLists.txt's REQNOISE_FP_FLAGS plus the kernel copies' -fno-trapping-math; the copy compiled on AArch64
# is the baseline one.
FLAGS = ["-std=c++20", "-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
N_SCALE_DTYPES = 3

# name: (compiler, its flags, the remark that names a vectorized loop)
GCC_REMARKS = ["-fopt-info-vec-optimized"], r"optimized: loop vectorized"
CLANG_REMARKS = ["-Rpass=loop-vectorize"], r"remark: vectorized loop"
TARGETS = {
    "gcc-aarch64": ("aarch64-linux-gnu-g++", ["-DREQNOISE_ISA=baseline"], GCC_REMARKS),
    "clang-aarch64": ("clang++", ["--target=aarch64-linux-gnu", "-DREQNOISE_ISA=baseline"], CLANG_REMARKS),
    "gcc-x86-64-v3": ("g++", ["-DREQNOISE_ISA=v3", "-march=x86-64-v3"], GCC_REMARKS),
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
    compiler, extra, (remark_flags, remark) = TARGETS[target]
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} not installed (apt-get install g++-aarch64-linux-gnu clang)")
    if (
        target == "gcc-x86-64-v3"
        and "x86_64" not in subprocess.run([compiler, "-dumpmachine"], capture_output=True, text=True).stdout
    ):
        pytest.skip(f"{compiler} does not target x86-64")
    cmd = [compiler, *FLAGS, *extra, f"-I{CSRC}", f"-I{MLX_INCLUDE}", "-c", str(CSRC / "fuse_kernel.cpp")]
    cmd += ["-o", str(tmp_path / "k.o"), *remark_flags]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode and target.startswith("clang") and "aarch64" in res.stderr and "not found" in res.stderr:
        pytest.skip(f"clang found no AArch64 headers (they come with g++-aarch64-linux-gnu): {res.stderr[:200]}")
    assert res.returncode == 0, res.stderr[-2000:]
    counts = {}
    for m in re.finditer(r"([\w./-]+):(\d+):\d+: " + remark, res.stderr):
        key = (pathlib.Path(m.group(1)).name, int(m.group(2)))
        counts[key] = counts.get(key, 0) + 1
    loops = hot_loops()
    assert len(loops) >= 6, loops  # the markers themselves must not silently disappear
    missing = {f"{f}:{n} ({name})": counts.get((f, n), 0) for (f, n), name in loops.items()}
    missing = {k: v for k, v in missing.items() if v < N_SCALE_DTYPES}
    assert not missing, f"{target}: hot loops vectorized fewer than {N_SCALE_DTYPES} times: {missing}"


def assert_matches_chain_where_finite(got, want, what):
    """Codes equal to MLX's chain everywhere; bfloat16 scales and biases bit for bit where MLX's scale and bias
    are both finite (elsewhere the kernel's may differ: a NaN for MLX's -inf, its own scale arithmetic).
    Returns how many groups were left out."""
    import numpy as np

    np.testing.assert_array_equal(np.array(got[0]), np.array(want[0]), err_msg=what)
    finite = np.isfinite(np.array(want[1].astype(mx.float32))) & np.isfinite(np.array(want[2].astype(mx.float32)))
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(np.array(g.view(mx.uint16))[finite], np.array(w.view(mx.uint16))[finite])
    return int((~finite).sum())


# The vectorized bfloat16 dequantize rounds without its NaN case and falls back to the exact rounding for a
# group with any non-finite value; the packer masks every code to its width. Groups whose scales or biases are
# infinite, NaN or near the float32 limit (so that q*s overflows) take those paths; MLX's op chain is the oracle.
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_non_finite_groups_match_mlx_chain(bits, group):
    import numpy as np

    from kernel_cases import dyadic_factors, mlx_chain, quantized
    from reqnoise import fuse_quantized

    rng = np.random.default_rng(bits * 7 + group)
    wq, s, b = quantized(rng, (2, 16, 256), bits, group, mx.bfloat16)
    s = np.array(s.astype(mx.float32))
    b = np.array(b.astype(mx.float32))
    s[0, 0, 0], s[0, 1, 0], s[1, 2, 1], s[1, 5, 0] = np.inf, np.nan, -np.inf, 3e38
    b[1, 3, 0], b[0, 4, 0], b[1, 6, 0] = np.nan, np.inf, -3e38
    s, b = mx.array(s).astype(mx.bfloat16), mx.array(b).astype(mx.bfloat16)
    a, bb = dyadic_factors(rng, (2,), 16, 256, rank=2)
    a = np.array(a)
    a[0, 0, 5], a[1, 1, 7] = 3e38, -3e38
    a = mx.array(a)
    for kw in ({}, dict(lora_a=a, lora_b=bb, scale=0.5)):
        got = fuse_quantized(wq, s, b, group_size=group, bits=bits, **kw)
        want = mlx_chain(wq, s, b, group, bits, kw.get("lora_a"), kw.get("lora_b"), kw.get("scale", 1.0))
        assert_matches_chain_where_finite(got, want, f"codes {kw.keys()}")


# Pass 2 of the bfloat16 rows runs over chunks of up to 64 groups, each with its own flags for the groups that
# take the exact path: rows of 70 and 130 groups put such groups in later batches of eight and in every chunk.
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("in_dim", [32 * 70, 32 * 130])
def test_rows_of_several_chunks_with_non_finite_groups_match_mlx_chain(bits, in_dim):
    import numpy as np

    from kernel_cases import dyadic_factors, mlx_chain, weights
    from reqnoise import fuse_quantized

    rng = np.random.default_rng(bits + in_dim)
    w = weights(rng, (4, in_dim))
    for row, group in ((0, 13), (1, 30), (1, 66), (2, 77), (3, 127)):
        w[row, 32 * min(group, in_dim // 32 - 1) + 5] = (np.inf, np.nan, -np.inf)[group % 3]
    wq, s, b = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=32, bits=bits)
    a, bb = dyadic_factors(rng, (), 4, in_dim, rank=2)
    got = fuse_quantized(wq, s, b, group_size=32, bits=bits, lora_a=a, lora_b=bb, scale=0.5)
    want = mlx_chain(wq, s, b, 32, bits, a, bb, 0.5)
    # the data make MLX's own scale or bias non-finite in most of those groups
    assert assert_matches_chain_where_finite(got, want, "codes") >= 3


# (mode, experts, bits, rank) of bench/kernel_phases.cpp's "hash" run: every affine width (fresh with and
# without a delta, the rank-16 tile) and every fp mode.
HASH_CASES = [("affine", 2, b, 2) for b in (2, 3, 4, 5, 6, 8)] + [
    ("affine", 2, 3, 0),
    ("affine", 2, 3, 16),
    ("mxfp4", 2, 4, 16),
    ("nvfp4", 2, 4, 16),
    ("mxfp8", 2, 8, 16),
]


def test_the_aarch64_copy_computes_the_bytes_of_the_x86_copy(tmp_path):
    """The AArch64 build (NEON byte shuffles, its own vector paths) runs under qemu-user and must write the
    bytes the x86-64-v3 copy writes, which tests/test_kernel.py holds to MLX's op chain: the row loop over a
    bfloat16 [2, 2048, 768] stack, hashed by bench/kernel_phases.cpp."""
    tools = {"aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu", "qemu-aarch64-static": "qemu-user-static"}
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install {package})")
    src = ROOT / "bench" / "kernel_phases.cpp"
    flags = [*FLAGS, f"-I{CSRC}", f"-I{MLX_INCLUDE}", str(src), "-lpthread"]
    builds = {
        "x86": ["g++", "-DREQNOISE_ISA=v3", "-march=x86-64-v3", *flags, "-o", str(tmp_path / "x86")],
        "a64": ["aarch64-linux-gnu-g++", "-DREQNOISE_ISA=baseline", "-static", *flags, "-o", str(tmp_path / "a64")],
    }
    for cmd in builds.values():
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
    run = {"x86": [str(tmp_path / "x86")], "a64": ["qemu-aarch64-static", str(tmp_path / "a64")]}
    for case in HASH_CASES:
        args = [str(x) for x in case] + ["1", "hash"]
        out = {
            k: subprocess.run([*v, *args], capture_output=True, text=True, check=True).stdout for k, v in run.items()
        }
        assert '"hash"' in out["x86"] and out["a64"] == out["x86"], case


def _has_avx512():
    try:
        flags = set(pathlib.Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"} <= flags


def test_the_16_lane_copy_computes_the_bytes_of_the_8_lane_copy(tmp_path):
    """The x86-64-v4 copy (16-lane vectors, its own unpack, tables and tail reads) writes the x86-64-v3
    copy's bytes for every hash case; the extension runs it wherever the CPU has AVX-512, so the rest of the
    suite holds it to MLX's op chain there."""
    if shutil.which("g++") is None or not _has_avx512():
        pytest.skip("needs g++ and a CPU with AVX-512 (F, BW, DQ, VL, CD)")
    src = ROOT / "bench" / "kernel_phases.cpp"
    flags = [*FLAGS, f"-I{CSRC}", f"-I{MLX_INCLUDE}", str(src), "-lpthread"]
    for isa in ("v3", "v4"):
        cmd = ["g++", f"-DREQNOISE_ISA={isa}", f"-march=x86-64-{isa}", *flags, "-o", str(tmp_path / isa)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
    for case in HASH_CASES:
        args = [str(x) for x in case] + ["1", "hash"]
        out = {
            isa: subprocess.run([str(tmp_path / isa), *args], capture_output=True, text=True, check=True).stdout
            for isa in ("v3", "v4")
        }
        assert '"hash"' in out["v3"] and out["v4"] == out["v3"], case


def test_the_split_rounding_of_pass_1_equals_mlx_bfloat16_on_every_float32(tmp_path):
    # Pass 1 rounds products q * s and sums of two bfloat16 values by Veltkamp's split (three float operations);
    # MLX's own float -> bfloat16 conversion is the oracle, over all 2^32 bit patterns (tests/native/).
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    exe = tmp_path / "split"
    cmd = ["g++", *FLAGS, "-DREQNOISE_ISA=baseline", f"-I{CSRC}", f"-I{MLX_INCLUDE}"]
    cmd += [str(ROOT / "tests" / "native" / "bf16_split_check.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    counts = json.loads(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)
    assert counts["checked"] == 2**32 - 2**24, counts  # every pattern but inf and NaN
    assert counts["bad_normal"] == 0 and counts["bad_grid_subnormal"] == 0, counts
    # From 2^111 up the split overflows to a non-finite value (the exact path's cue), never a wrong finite one.
    assert counts["bad_large_finite"] == 0 and counts["large_non_finite"] > 0, counts
