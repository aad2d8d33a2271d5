"""The floating-point modes (mxfp4, nvfp4, mxfp8) in the native kernel, ggml-style: modes x dtypes x 2-D/3-D x
edge groups, against MLX's own ops on the CPU stream (the oracle) and the numpy reference
(kernel/reference.py, itself checked against MLX here first). docs/mlx-fp-formats.md points at these tests."""

import json
import pathlib
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kernel_cases import DTYPES, dyadic_factors, random_factors
from reqnoise import fuse_quantized
from reqnoise.kernel import reference as R

FP = ("mxfp4", "nvfp4", "mxfp8")
KINDS = ("normal", "zero_groups", "pow2_max", "subnormal", "wide")


@pytest.fixture(autouse=True)
def _cpu():
    with mx.stream(mx.cpu):
        yield


def edge_weights(rng, shape, kind):
    """float32 weights with the named edge groups (every 16/32-value group boundary is a multiple of 16)."""
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    flat = w.reshape(-1, 16)
    if kind == "zero_groups":
        flat[::3] = 0.0
    elif kind == "pow2_max":
        # a group maximum exactly on a power of two (the e8m0 scale is then exact: no rounding up)
        flat[:, 0] = np.float32(2.0) ** rng.integers(-12, 4, flat.shape[0])
        flat[:, 1:] = np.clip(flat[:, 1:], -np.abs(flat[:, :1]), np.abs(flat[:, :1]))
    elif kind == "subnormal":
        flat[::2] *= np.float32(1e-36)  # float32 subnormals once divided by the scale range
    elif kind == "wide":
        flat *= np.exp(rng.uniform(-12, 8, (flat.shape[0], 1))).astype(np.float32)
    return w


def as_np(x):
    if x is None:
        return None
    return np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)


def assert_same(got, want):
    for g, w in zip(got, want):
        if g is None or w is None:
            assert g is None and w is None
            continue
        assert np.array_equal(as_np(g) if isinstance(g, mx.array) else g, as_np(w) if isinstance(w, mx.array) else w)


# --- the reference against MLX: the rules of docs/mlx-fp-formats.md -------------------------------------------


@pytest.mark.parametrize("mode", FP)
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_reference_quantize_and_dequantize_equal_mlx(mode, dt, kind):
    dtype = DTYPES[dt]
    w = mx.array(edge_weights(np.random.default_rng(3), (8, 128), kind)).astype(dtype)
    q, s = mx.quantize(w, mode=mode)
    rq, rs = R.fp_quantize(R.to_f32(w), mode=mode, dtype=dtype)
    assert np.array_equal(np.array(q), rq)
    assert np.array_equal(np.array(s), rs)
    for out in DTYPES.values():
        d = mx.dequantize(q, s, mode=mode, dtype=out)
        assert np.array_equal(R.to_f32(d), R.fp_dequantize(np.array(q), np.array(s), mode=mode, dtype=out))


def test_code_tables_match_mlx():
    # every E2M1 and E4M3 code, decoded by MLX at a unit scale (e8m0 byte 127) vs the reference's tables
    codes4 = np.arange(16, dtype=np.uint32)
    wq4 = R.pack_codes(np.tile(codes4, 2)[None], 4)
    d4 = mx.dequantize(mx.array(wq4), mx.array(np.full((1, 1), 127, np.uint8)), mode="mxfp4", dtype=mx.float32)
    assert np.array_equal(np.array(d4)[0, :16], R.E2M1_VALUES)
    wq8 = R.pack_codes(np.arange(256).reshape(8, 32), 8)
    d8 = mx.dequantize(mx.array(wq8), mx.array(np.full((8, 1), 127, np.uint8)), mode="mxfp8", dtype=mx.float32)
    assert np.array_equal(np.array(d8).reshape(-1), R.E4M3_VALUES, equal_nan=True)
    assert R.E4M3_VALUES[0x7E] == 448 and np.isnan(R.E4M3_VALUES[[0x7F, 0xFF]]).all()


def test_e8m0_scale_is_the_smallest_power_of_two_at_least_amax_over_the_largest_code():
    # hand-computed: amax 4 -> 4/6 = 0.667 -> 2^0 (round(log2) would give 2^-1 and saturate the 4 to 3)
    w = mx.zeros((1, 32))
    w[0, 0] = 4.0
    _, s = mx.quantize(w, mode="mxfp4")
    assert int(np.array(s)[0, 0]) == 127
    w[0, 0] = 6.0 * 2.0**-20  # exactly on a power of two: not rounded up
    assert int(np.array(mx.quantize(w, mode="mxfp4")[1])[0, 0]) == 127 - 20


def test_ties_go_to_the_smaller_magnitude_and_beyond_the_largest_code_clips():
    # a unit scale (amax 6 -> e8m0 2^0): midpoints between E2M1 values, and values far beyond 6 after scaling
    x = np.array([6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0, 0.1, -0.1, -6, 5.9, 0] * 2, np.float32)
    q, _ = mx.quantize(mx.array(x[None]), mode="mxfp4")
    codes = R.unpack_codes(np.array(q), 4)[0, :16]
    assert codes.tolist() == [7, 0, 1, 2, 3, 4, 5, 6, 0, 9, 14, 0, 0, 15, 7, 0]


# --- the kernel -----------------------------------------------------------------------------------------------


def _fp_input(rng, shape, mode, kind="normal"):
    q, s = mx.quantize(mx.array(edge_weights(rng, shape, kind)), mode=mode)
    return q, s


def _chain(q, s, mode, dtype, delta=None, out_mode=None, **out_kw):
    """MLX's own op chain: dequantize -> add the delta cast -> quantize (mlx-lm's fuse)."""
    w = mx.dequantize(q, s, mode=mode, dtype=dtype)
    if delta is not None:
        w = w + delta.astype(dtype)
    out = mx.quantize(w, mode=out_mode or mode, **out_kw)
    return tuple(out) + (None,) * (3 - len(out))


@pytest.mark.parametrize("mode", FP)
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stacked", [False, True])
def test_fresh_equals_the_mlx_op_chain(mode, dt, kind, stacked):
    dtype = DTYPES[dt]
    rng = np.random.default_rng(11)
    shape = (3, 8, 128) if stacked else (8, 128)
    q, s = _fp_input(rng, shape, mode, kind)
    assert_same(fuse_quantized(q, s, None, mode=mode, dtype=dtype), _chain(q, s, mode, dtype))
    lead = shape[:-2]
    a, b = dyadic_factors(rng, lead, shape[-2], shape[-1], 3)
    b = b * 2.0 ** int(rng.integers(-8, 4))  # the delta exceeds the largest code of some groups
    got = fuse_quantized(q, s, None, mode=mode, dtype=dtype, lora_a=a, lora_b=b)
    assert_same(got, _chain(q, s, mode, dtype, delta=b @ a))


@pytest.mark.parametrize("dt", DTYPES)
def test_a_delta_summing_signed_zeros_is_plus_zero_as_in_mlx(dt):
    # -0 weights (E4M3 code 0x80) plus a delta whose every product is -0: MLX's matmul sums from +0, so the
    # sum is +0, -0 + +0 = +0 and the code is 0x00 (E4M3 keeps the sign of a zero). A sum started from the
    # first product would give -0 and code 0x80.
    q = mx.array(R.pack_codes(np.full((2, 32), 0x80), 8))
    s = mx.array(np.full((2, 1), 127, np.uint8))
    a = mx.zeros((2, 32))
    b = mx.full((2, 2), -1.0)
    got = fuse_quantized(q, s, mode="mxfp8", dtype=DTYPES[dt], lora_a=a, lora_b=b)
    want = _chain(q, s, "mxfp8", DTYPES[dt], delta=b @ a)
    assert not np.array_equal(np.array(want[0]), np.array(q))  # the oracle really flips the zeros' sign
    assert_same(got, want)


@pytest.mark.parametrize("mode", FP)
@pytest.mark.parametrize("dt", DTYPES)
def test_fresh_random_delta_equals_the_reference_and_nearly_the_chain(mode, dt):
    dtype = DTYPES[dt]
    rng = np.random.default_rng(12)
    q, s = _fp_input(rng, (4, 16, 256), mode)
    a, b = random_factors(rng, (4,), 16, 256, 8)
    got = fuse_quantized(q, s, None, mode=mode, dtype=dtype, lora_a=a, lora_b=b, scale=2.0)
    ref = R.fuse_any(q, s, None, mode=mode, dtype=dtype, lora_a=a, lora_b=b, scale=2.0)
    assert_same(got, ref)
    # against MLX's matmul the delta's summation order may differ by an ulp: a tiny fraction of codes
    want = _chain(q, s, mode, dtype, delta=(2.0 * b) @ a)
    assert (np.array(got[0]) != np.array(want[0])).mean() < 0.01


@pytest.mark.parametrize("mode", FP)
@pytest.mark.parametrize("kind", KINDS)
def test_keep_grid_zero_delta_is_the_identity_and_a_delta_matches_the_reference(mode, kind):
    rng = np.random.default_rng(13)
    q, s = _fp_input(rng, (2, 8, 128), mode, kind)
    nq, ns, nb = fuse_quantized(q, s, None, mode=mode, requant="keep-grid")
    assert np.array_equal(np.array(nq), np.array(q)) and ns is s and nb is None
    a, b = random_factors(rng, (2,), 8, 128, 4, size=0.05)
    got = fuse_quantized(q, s, None, mode=mode, requant="keep-grid", lora_a=a, lora_b=b)
    ref = R.fuse_any(q, s, None, mode=mode, requant="keep-grid", lora_a=a, lora_b=b)
    assert np.array_equal(np.array(got[0]), ref[0])


def test_keep_grid_keeps_negative_zero_and_the_nan_codes():
    codes = np.zeros((1, 32), np.int64)
    codes[0, :4] = [0x80, 0x7F, 0xFF, 0x00]
    q = mx.array(R.pack_codes(codes, 8))
    s = mx.array(np.full((1, 1), 120, np.uint8))
    assert np.array_equal(np.array(fuse_quantized(q, s, mode="mxfp8", requant="keep-grid")[0]), np.array(q))
    c4 = np.zeros((1, 32), np.int64)
    c4[0, ::2] = 8  # E2M1 -0
    q4 = mx.array(R.pack_codes(c4, 4))
    assert np.array_equal(np.array(fuse_quantized(q4, s, mode="mxfp4", requant="keep-grid")[0]), np.array(q4))


@pytest.mark.parametrize("mode", FP)
@pytest.mark.parametrize("dt", DTYPES)
def test_requantize_into_affine_and_from_affine(mode, dt):
    dtype = DTYPES[dt]
    rng = np.random.default_rng(14)
    q, s = _fp_input(rng, (2, 8, 128), mode)
    got = fuse_quantized(q, s, None, mode=mode, dtype=dtype, out_mode="affine", out_bits=8, out_group_size=64)
    assert_same(got, _chain(q, s, mode, dtype, out_mode="affine", bits=8, group_size=64))
    w = mx.array(edge_weights(rng, (2, 8, 128), "normal")).astype(dtype)
    aq, as_, ab = mx.quantize(w, bits=4, group_size=32)
    got = fuse_quantized(aq, as_, ab, bits=4, group_size=32, out_mode=mode)
    want = mx.quantize(mx.dequantize(aq, as_, ab, bits=4, group_size=32), mode=mode)
    assert_same(got, (want[0], want[1], None))
    # fp -> another fp mode
    other = "mxfp8" if mode != "mxfp8" else "nvfp4"
    assert_same(fuse_quantized(q, s, mode=mode, dtype=dtype, out_mode=other), _chain(q, s, mode, dtype, out_mode=other))


@pytest.mark.parametrize("mode", FP)
def test_dora_matches_the_reference(mode):
    rng = np.random.default_rng(15)
    q, s = _fp_input(rng, (8, 128), mode)
    a, b = random_factors(rng, (), 8, 128, 4)
    mag = mx.array(rng.uniform(0.5, 1.5, 8).astype(np.float32))
    for requant in ("fresh", "keep-grid"):
        got = fuse_quantized(q, s, mode=mode, lora_a=a, lora_b=b, dora_magnitude=mag, requant=requant)
        ref = R.fuse_any(q, s, None, mode=mode, lora_a=a, lora_b=b, dora_magnitude=mag, requant=requant)
        assert np.array_equal(np.array(got[0]), ref[0])


@pytest.mark.parametrize("mode", FP)
def test_chunked_stacks_and_thread_counts_give_the_same_bytes(mode):
    rng = np.random.default_rng(16)
    q, s = _fp_input(rng, (5, 8, 128), mode)
    a, b = random_factors(rng, (5,), 8, 128, 2)
    whole = fuse_quantized(q, s, mode=mode, lora_a=a, lora_b=b)
    for kw in (dict(experts_per_chunk=2), dict(num_threads=3), dict(experts_per_chunk=1, num_threads=1)):
        assert_same(fuse_quantized(q, s, mode=mode, lora_a=a, lora_b=b, **kw), whole)


def test_bad_input_gets_a_one_line_error():
    q, s = mx.quantize(mx.zeros((4, 64)), mode="mxfp4")
    with pytest.raises(ValueError, match="has no biases"):
        fuse_quantized(q, s, s, mode="mxfp4")
    with pytest.raises(TypeError, match="must be uint8"):
        fuse_quantized(q, s.astype(mx.float16), mode="mxfp4")
    with pytest.raises(ValueError, match="group_size must be one of"):
        fuse_quantized(q, s, mode="mxfp4", group_size=64)
    with pytest.raises(ValueError, match="need requant='fresh'"):
        fuse_quantized(q, s, mode="mxfp4", requant="keep-grid", out_mode="mxfp8")
    with pytest.raises(ValueError, match="scales must have shape"):
        fuse_quantized(q, s[:, :1], mode="mxfp4")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(FP),
    dt=st.sampled_from(list(DTYPES)),
    experts=st.integers(1, 3),
    out_dim=st.integers(1, 6),
    groups=st.integers(1, 4),
    log_size=st.floats(-20, 10),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes_and_magnitudes(mode, dt, experts, out_dim, groups, log_size, seed):
    # float16 overflows near 6.5e4: weights of e^8 standard deviations and more reach inf there, and non-finite
    # weights are outside what the kernel promises to match (docs/mlx-fp-formats.md).
    assume(not (dt == "float16" and log_size > 8))
    dtype = DTYPES[dt]
    rng = np.random.default_rng(seed)
    in_dim = groups * 32
    w = (rng.standard_normal((experts, out_dim, in_dim)) * np.exp(log_size)).astype(np.float32)
    q, s = mx.quantize(mx.array(w), mode=mode)
    a, b = dyadic_factors(rng, (experts,), out_dim, in_dim, 2)
    b = b * np.float32(np.exp2(np.round(log_size)))
    assert_same(fuse_quantized(q, s, mode=mode, dtype=dtype, lora_a=a, lora_b=b), _chain(q, s, mode, dtype, b @ a))
    keep = fuse_quantized(q, s, mode=mode, requant="keep-grid", lora_a=a, lora_b=b)
    ref = R.fuse_any(q, s, None, mode=mode, requant="keep-grid", lora_a=a, lora_b=b)
    assert np.array_equal(np.array(keep[0]), ref[0])


@pytest.mark.parametrize("mode", FP)
@pytest.mark.parametrize("dt", DTYPES)
def test_any_finite_codes_and_scale_bytes_equal_the_mlx_op_chain(mode, dt):
    # Codes and scale bytes that mx.quantize never writes but mx.dequantize reads: every finite code, e8m0 bytes
    # from 0 (2^-127) to near the float32 limit (2^127 is no scale of finite weights: 6 * 2^127 overflows),
    # nvfp4 scales of either sign, subnormal and zero; group counts that leave a partial chunk of eight groups;
    # a delta that pushes some groups far beyond their old range. Every dequantized value is finite, so MLX's
    # chain is the oracle.
    dtype = DTYPES[dt]
    rng = np.random.default_rng(21)
    g = 16 if mode == "nvfp4" else 32
    rows, groups = 5, 22
    in_dim = g * groups
    if mode == "mxfp8":
        codes = rng.choice(np.setdiff1d(np.arange(256), [0x7F, 0xFF]), (rows, in_dim)).astype(np.uint8)
        wq = codes.view(np.uint32)
        edge = [0, 1, 9, 10, 29, 30, 31, 60, 100, 120, 127, 150, 200, 246]
    else:
        codes = rng.integers(0, 16, (rows, in_dim), dtype=np.uint8)
        wq = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.uint32)
        if mode == "nvfp4":
            edge = [0x00, 0x01, 0x07, 0x08, 0x30, 0x38, 0x55, 0x7E, 0x80, 0x81, 0xB8, 0xFE]
        else:
            edge = [0, 1, 2, 30, 100, 127, 128, 200, 240, 250, 252]  # 6 * 2^126 overflows
    scales = rng.choice(np.array(edge, np.uint8), (rows, groups))
    if dtype == mx.float16:  # float16's range: no dequantized value may overflow
        scales = np.minimum(scales, 127 + 7) if mode != "nvfp4" else scales
    q, s = mx.array(wq), mx.array(scales)
    want = _chain(q, s, mode, dtype)
    assert np.isfinite(np.array(mx.dequantize(q, s, mode=mode, dtype=dtype).astype(mx.float32))).all()
    assert_same(fuse_quantized(q, s, None, mode=mode, dtype=dtype), want)
    a, b = dyadic_factors(rng, (), rows, in_dim, 2)
    b = b * 2.0 ** int(rng.integers(2, 10))
    got = fuse_quantized(q, s, None, mode=mode, dtype=dtype, lora_a=a, lora_b=b)
    assert_same(got, _chain(q, s, mode, dtype, delta=b @ a))


def test_nvfp4_quotients_by_the_rounded_reciprocal_give_the_chains_codes_for_every_value_and_scale(tmp_path):
    # Pass 3 encodes nvfp4 quotients as x * fl(1/p): for all 65536 bfloat16 x and every positive E4M3 scale p,
    # the code equals the scalar encoder's of round_bf16(x / p) (the chain's), or the lane is flagged for the
    # exact path (tests/native/nvfp4_reciprocal_check.cpp).
    if shutil.which("g++") is None:
        pytest.skip("g++ not installed")
    root = pathlib.Path(__file__).resolve().parent.parent
    exe = tmp_path / "nvr"
    cmd = ["g++", "-std=c++20", "-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-Wno-psabi"]
    cmd += ["-DREQNOISE_ISA=baseline", f"-I{root / 'csrc'}", f"-I{pathlib.Path(mx.__file__).parent / 'include'}"]
    cmd += [str(root / "tests" / "native" / "nvfp4_reciprocal_check.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    counts = json.loads(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)
    assert counts["checked"] == 65536 * 126, counts
    assert counts["wrong"] == 0 and counts["far_missed"] == 0, counts
