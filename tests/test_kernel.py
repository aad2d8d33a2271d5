"""Native fuse kernel vs independent oracles: MLX's own op chain and the numpy reference."""

import itertools
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_cases import (
    BITS,
    DTYPES,
    FRESH_RANDOM_CODE_TOL,
    GROUPS,
    as_np,
    assert_every_isa_copy_agrees,
    dyadic_factors,
    mlx_chain,
    quantized,
    random_factors,
)
from reqnoise import fuse_quantized
from reqnoise.kernel import reference as ref

GRID = list(itertools.product(BITS, GROUPS, DTYPES))


def assert_same(got, want, what=""):
    for name, g, w in zip(("wq", "scales", "biases"), got, want):
        np.testing.assert_array_equal(as_np(g), as_np(w), err_msg=f"{what} {name}")


@pytest.mark.parametrize("bits,group,dtype", GRID)
@pytest.mark.parametrize("stacked", [False, True], ids=["2d", "3d"])
def test_fresh_bit_identical_to_mlx_chain(bits, group, dtype, stacked):
    rng = np.random.default_rng(bits * 1000 + group)
    lead = (3,) if stacked else ()
    wq, s, b = quantized(rng, lead + (48, 256), bits, group, DTYPES[dtype])
    a, bb = dyadic_factors(rng, lead, 48, 256, rank=4)
    got = fuse_quantized(wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=0.5)
    assert_same(got, mlx_chain(wq, s, b, group, bits, a, bb, 0.5), f"{bits}b g{group} {dtype}")
    for x, y in zip(got, (wq, s, b)):
        assert x.dtype == y.dtype and x.shape == y.shape


@pytest.mark.parametrize("bits,group,dtype", GRID)
def test_zero_delta_reproduces_the_artifact(bits, group, dtype):
    rng = np.random.default_rng(7 + bits)
    wq, s, b = quantized(rng, (2, 32, 512), bits, group, DTYPES[dtype], kind="student")
    got = fuse_quantized(wq, s, b, group_size=group, bits=bits)
    assert_same(got, mlx_chain(wq, s, b, group, bits))


@pytest.mark.parametrize("bits,group,dtype", GRID)
def test_keep_grid_zero_delta_is_identity(bits, group, dtype):
    rng = np.random.default_rng(11 + group)
    wq, s, b = quantized(rng, (2, 32, 256), bits, group, DTYPES[dtype], kind="student")
    got = fuse_quantized(wq, s, b, group_size=group, bits=bits, requant="keep-grid")
    assert_same(got, (wq, s, b))


def assert_codes_within_tolerance(got, want, bits, what=""):
    """Codes of two fuses of a non-dyadic delta: at most FRESH_RANDOM_CODE_TOL of them differ (plus one, so a
    small case may hold a single boundary code), and as large a share of scales and of biases. Returns the
    code mismatch rate."""
    codes_got = ref.unpack_codes(np.array(got[0]), bits)
    codes_want = ref.unpack_codes(np.array(want[0]), bits)
    rate = np.mean(codes_got != codes_want)
    assert rate <= FRESH_RANDOM_CODE_TOL + 1.0 / codes_got.size, f"{what} code mismatch rate {rate:.2e}"
    for name, g, w in zip(("scales", "biases"), got[1:], want[1:]):
        share = np.mean(as_np(g) != as_np(w))
        assert share <= FRESH_RANDOM_CODE_TOL + 1.0 / g.size, f"{what} {name} mismatch rate {share:.2e}"
    return rate


@pytest.mark.parametrize("bits,group,dtype", GRID)
def test_fresh_random_delta_within_named_tolerance(bits, group, dtype):
    rng = np.random.default_rng(bits * 1000 + group)
    wq, s, b = quantized(rng, (2, 128, 512), bits, group, DTYPES[dtype])
    a, bb = random_factors(rng, (2,), 128, 512, rank=16, size=0.05)
    got = fuse_quantized(wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=2.0)
    assert_codes_within_tolerance(got, mlx_chain(wq, s, b, group, bits, a, bb, 2.0), bits, f"{bits}b g{group} {dtype}")


# delta_row keeps the first 256 scaled b[k] in a stack buffer and adds the rest in a second loop: ranks on
# both sides of that boundary, with factors exact in float32 (bit-identical) and random (named tolerance).
@pytest.mark.parametrize("rank", [255, 256, 257, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fresh_rank_around_256_bit_identical_to_mlx_chain(rank, dtype):
    rng = np.random.default_rng(rank)
    wq, s, b = quantized(rng, (2, 16, 256), 4, 64, DTYPES[dtype])
    a, bb = dyadic_factors(rng, (2,), 16, 256, rank=rank)
    got = fuse_quantized(wq, s, b, group_size=64, bits=4, lora_a=a, lora_b=bb, scale=2.0**-5)
    assert_same(got, mlx_chain(wq, s, b, 64, 4, a, bb, 2.0**-5), f"rank {rank} {dtype}")
    kg = fuse_quantized(wq, s, b, group_size=64, bits=4, lora_a=a, lora_b=bb, scale=2.0**-5, requant="keep-grid")
    assert_same(kg, ref.fuse(wq, s, b, group_size=64, bits=4, lora_a=a, lora_b=bb, scale=2.0**-5, requant="keep-grid"))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fresh_random_delta_rank_above_256_within_named_tolerance(bits, dtype):
    rng = np.random.default_rng(bits)
    wq, s, b = quantized(rng, (64, 512), bits, 64, DTYPES[dtype])
    a, bb = random_factors(rng, (), 64, 512, rank=300, size=0.01)
    got = fuse_quantized(wq, s, b, group_size=64, bits=bits, lora_a=a, lora_b=bb, scale=2.0)
    assert_codes_within_tolerance(got, mlx_chain(wq, s, b, 64, bits, a, bb, 2.0), bits, f"{bits}b {dtype} rank 300")


@pytest.mark.parametrize("bits,group,dtype", GRID[::2])
def test_native_matches_numpy_reference_all_modes(bits, group, dtype):
    rng = np.random.default_rng(3 * bits + group)
    wq, s, b = quantized(rng, (2, 40, 256), bits, group, DTYPES[dtype])
    a, bb = dyadic_factors(rng, (2,), 40, 256, rank=3)
    for requant in ("fresh", "keep-grid"):
        got = fuse_quantized(wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=0.25, requant=requant)
        want = ref.fuse(wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=0.25, requant=requant)
        assert_same(got, want, requant)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_bits_and_group_match_mlx_chain(dtype):
    rng = np.random.default_rng(5)
    wq, s, b = quantized(rng, (2, 64, 512), 3, 64, DTYPES[dtype])
    a, bb = dyadic_factors(rng, (2,), 64, 512, rank=2)
    for ob, og in [(8, 64), (4, 32), (2, 128), (6, 64)]:
        got = fuse_quantized(wq, s, b, group_size=64, bits=3, lora_a=a, lora_b=bb, out_bits=ob, out_group_size=og)
        assert_same(got, mlx_chain(wq, s, b, 64, 3, a, bb, 1.0, ob, og), f"-> {ob}b g{og}")
        assert got[0].shape == (2, 64, 512 * ob // 32) and got[1].shape == (2, 64, 512 // og)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_grid_moves_codes_only_as_far_as_the_delta_explains(bits, dtype):
    rng = np.random.default_rng(bits)
    wq, s, b = quantized(rng, (3, 64, 256), bits, 64, DTYPES[dtype])
    a, bb = random_factors(rng, (3,), 64, 256, rank=4, size=0.05)
    nwq, ns, nb = fuse_quantized(wq, s, b, group_size=64, bits=bits, lora_a=a, lora_b=bb, requant="keep-grid")
    assert ns is s and nb is b
    s_np = np.repeat(as_np(s), 64, axis=-1)
    b_np = np.repeat(as_np(b), 64, axis=-1)
    w_hat = ref.unpack_codes(np.array(wq), bits) * s_np + b_np
    target = w_hat + ref.low_rank_delta(a, bb, 1.0)
    new = ref.unpack_codes(np.array(nwq), bits)
    deq = new * s_np + b_np
    clipped = (new == 0) | (new == 2**bits - 1)
    err = np.abs(deq - target)[~clipped]
    assert np.all(err <= np.abs(s_np)[~clipped] / 2 * (1 + 1e-5) + 1e-7)
    assert (new != ref.unpack_codes(np.array(wq), bits)).any()


def test_results_identical_for_every_chunk_size_and_thread_count():
    rng = np.random.default_rng(0)
    wq, s, b = quantized(rng, (7, 64, 256), 3, 64, mx.bfloat16)
    a, bb = random_factors(rng, (7,), 64, 256, rank=8)
    base = fuse_quantized(wq, s, b, group_size=64, bits=3, lora_a=a, lora_b=bb, num_threads=1)
    for chunk, threads in [(1, 1), (2, 2), (3, 3), (7, 2), (5, 8), (None, 2)]:
        for requant in ("fresh", "keep-grid"):
            want = (
                base
                if requant == "fresh"
                else fuse_quantized(
                    wq, s, b, group_size=64, bits=3, lora_a=a, lora_b=bb, requant=requant, num_threads=1
                )
            )
            got = fuse_quantized(
                wq,
                s,
                b,
                group_size=64,
                bits=3,
                lora_a=a,
                lora_b=bb,
                requant=requant,
                experts_per_chunk=chunk,
                num_threads=threads,
            )
            assert_same(got, want, f"chunk={chunk} threads={threads} {requant}")


def _edge_weights(kind: str, rows: int, group: int, rng) -> np.ndarray:
    n = group * 4
    if kind == "constant":
        return np.full((rows, n), 0.037, np.float32)
    if kind == "zero":
        return np.zeros((rows, n), np.float32)
    if kind == "positive":
        return np.abs(rng.standard_normal((rows, n))).astype(np.float32) * 0.02 + 0.01
    if kind == "negative":
        return -np.abs(rng.standard_normal((rows, n))).astype(np.float32) * 0.02 - 0.01
    if kind == "symmetric":  # |min| == |max| in every group
        w = rng.uniform(-0.5, 0.5, (rows, n)).astype(np.float32) * 0.02
        g = w.reshape(rows, -1, group)
        g[..., 0], g[..., 1] = 0.02, -0.02
        return g.reshape(rows, n)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["constant", "zero", "positive", "negative", "symmetric"])
@pytest.mark.parametrize("bits,group,dtype", GRID)
def test_edge_case_groups(kind, bits, group, dtype):
    rng = np.random.default_rng(1)
    w = mx.array(_edge_weights(kind, 8, group, rng)).astype(DTYPES[dtype])
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    a, bb = dyadic_factors(rng, (), 8, group * 4, rank=2)
    assert_same(
        fuse_quantized(wq, s, b, group_size=group, bits=bits), mlx_chain(wq, s, b, group, bits), f"{kind} zero delta"
    )
    assert_same(
        fuse_quantized(wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=0.125),
        mlx_chain(wq, s, b, group, bits, a, bb, 0.125),
        f"{kind} delta",
    )
    assert_same(fuse_quantized(wq, s, b, group_size=group, bits=bits, requant="keep-grid"), (wq, s, b))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bits=st.sampled_from(BITS),
    group=st.sampled_from(GROUPS),
    dtype=st.sampled_from(sorted(DTYPES)),
    experts=st.one_of(st.none(), st.integers(1, 4)),
    out_dim=st.integers(1, 24),
    n_groups=st.integers(1, 4),
    rank=st.integers(0, 5),
    log_scale=st.integers(-6, 2),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["normal", "student"]),
)
def test_property_fresh_and_keep_grid(bits, group, dtype, experts, out_dim, n_groups, rank, log_scale, seed, kind):
    rng = np.random.default_rng(seed)
    lead = () if experts is None else (experts,)
    in_dim = group * n_groups
    wq, s, b = quantized(rng, lead + (out_dim, in_dim), bits, group, DTYPES[dtype], kind)
    a = bb = None
    if rank:
        a, bb = dyadic_factors(rng, lead, out_dim, in_dim, rank)
    scale = 2.0**log_scale
    got = fuse_quantized(wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=scale)
    assert_same(got, mlx_chain(wq, s, b, group, bits, a, bb, scale))
    kg = fuse_quantized(wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=scale, requant="keep-grid")
    assert_same(
        kg, ref.fuse(wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=scale, requant="keep-grid")
    )


_ISA_SCRIPT = r"""
import hashlib, itertools, sys
import mlx.core as mx, numpy as np
sys.path.insert(0, sys.argv[1])
from kernel_cases import BITS, DTYPES, dyadic_factors, quantized, random_factors
from reqnoise import _core, fuse_quantized
h = hashlib.sha256()
# Group 32 too: its last groups are the 16-lane copy's tail reads at 2 bits.
for bits, dtype, group in itertools.product(BITS, DTYPES, (32, 64)):
    rng = np.random.default_rng(bits)
    wq, s, b = quantized(rng, (2, 16, 256), bits, group, DTYPES[dtype])
    a, bb = random_factors(rng, (2,), 16, 256, rank=3)
    m = mx.array(rng.uniform(0.1, 1, (2, 16)).astype(np.float32))
    for kw in (dict(), dict(requant="keep-grid"), dict(dora_magnitude=m), dict(out_bits=8, out_group_size=32)):
        for x in fuse_quantized(wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, **kw):
            h.update(np.array(x.view(mx.uint8) if x.dtype != mx.uint32 else x).tobytes())
print(_core.kernel_isa(), h.hexdigest())
"""


def test_every_instruction_set_copy_computes_the_same_bytes(tmp_path):
    assert_every_isa_copy_agrees(_ISA_SCRIPT, str(Path(__file__).parent))
