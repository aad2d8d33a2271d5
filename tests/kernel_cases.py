"""Deterministic weight generators for the kernel tests (ggml-style: named, reproducible data)."""

import mlx.core as mx
import numpy as np

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# Fraction of codes allowed to differ from the MLX op chain when the float32 delta is not exactly
# representable (summation order inside the matmul may differ from the kernel's by an ulp).
FRESH_RANDOM_CODE_TOL = 1e-5


def weights(rng: np.random.Generator, shape, kind: str = "normal") -> np.ndarray:
    """float32 weights of a named distribution."""
    if kind == "normal":
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)
    if kind == "student":
        return (rng.standard_t(3, shape) * 0.01).astype(np.float32)
    raise ValueError(kind)


def quantized(rng, shape, bits, group, dtype, kind="normal"):
    w = mx.array(weights(rng, shape, kind)).astype(dtype)
    return mx.quantize(w, group_size=group, bits=bits)


def dyadic_factors(rng, lead, out_dim, in_dim, rank):
    """LoRA factors that are small multiples of 2^-6: every product and partial sum of scale*B@A is exact in
    float32, so summation order cannot matter."""
    a = rng.integers(-8, 9, size=lead + (rank, in_dim)).astype(np.float32) / 64
    b = rng.integers(-8, 9, size=lead + (out_dim, rank)).astype(np.float32) / 64
    return mx.array(a), mx.array(b)


def random_factors(rng, lead, out_dim, in_dim, rank, size=0.01):
    a = (rng.standard_normal(lead + (rank, in_dim)) * size).astype(np.float32)
    b = (rng.standard_normal(lead + (out_dim, rank)) * size).astype(np.float32)
    return mx.array(a), mx.array(b)


def mlx_chain(wq, scales, biases, group, bits, a=None, b=None, scale=1.0, out_bits=None, out_group=None):
    """What mlx-lm's fuse runs: MLX's own ops, the independent oracle for requant='fresh'."""
    w = mx.dequantize(wq, scales, biases, group_size=group, bits=bits)
    if a is not None:
        w = w + (scale * b.astype(mx.float32) @ a.astype(mx.float32)).astype(w.dtype)
    return mx.quantize(w, group_size=out_group or group, bits=out_bits or bits)


def as_np(x):
    """mx or numpy array -> numpy (16-bit floats widened exactly to float32)."""
    if isinstance(x, mx.array) and x.dtype != mx.uint32:
        return np.array(x.astype(mx.float32))
    return np.asarray(x)


def assert_every_isa_copy_agrees(script: str, *args: str) -> None:
    """Run ``python -c script *args`` under ``REQNOISE_KERNEL_ISA=auto``, ``=v3`` and ``=baseline``; each run
    prints ``<isa copy used> <digest of its outputs>``. The copies must give one digest (skip where auto is
    baseline)."""
    import os
    import subprocess
    import sys

    import pytest

    outs = {}
    for isa in ("auto", "v3", "baseline"):
        env = dict(os.environ, REQNOISE_KERNEL_ISA=isa)
        res = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=True)
        name, digest = res.stdout.split()
        outs[name] = digest
    if set(outs) == {"baseline"}:
        pytest.skip("this CPU runs the baseline copy under auto too: only one instruction-set copy to compare")
    # x86-64-v4 (the 16-lane copy) where the CPU has AVX-512.
    assert set(outs) in ({"baseline", "x86-64-v3"}, {"baseline", "x86-64-v3", "x86-64-v4"}), outs
    assert len(set(outs.values())) == 1, outs
