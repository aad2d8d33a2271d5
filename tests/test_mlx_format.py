"""The MLX affine-format facts that docs/mlx-format.md states, each checked against mlx itself (CPU stream).

Oracles: hand-computed codes and bit positions, and the numpy reference (reqnoise.kernel.reference), which is
written from the documented algorithm without calling mx.quantize. Where a fact is a choice between two
plausible variants, the test also shows the other variant gives different bytes, so the check can fail.
"""

import itertools
import pathlib

import mlx.core as mx
import numpy as np
import pytest

from kernel_cases import BITS, DTYPES, GROUPS, as_np
from reqnoise.kernel import reference as ref

CPU = mx.cpu


def _group_kinds(rng, rows, n):
    """Named row families: ordinary, heavy-tailed and the edge groups (constant, zero, one-sided)."""
    return {
        "normal": rng.standard_normal((rows, n)) * 0.02,
        "student": rng.standard_t(3, (rows, n)) * 0.01,
        "constant": np.full((rows, n), 0.037),
        "zero": np.zeros((rows, n)),
        "positive": np.abs(rng.standard_normal((rows, n))) * 0.02 + 0.01,
        "negative": -np.abs(rng.standard_normal((rows, n))) * 0.02 - 0.01,
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_shapes_and_dtypes(bits, dtype):
    w = mx.zeros((3, 5, 256), dtype=DTYPES[dtype])
    for group in GROUPS:
        wq, s, b = mx.quantize(w, group_size=group, bits=bits, stream=CPU)
        assert wq.dtype == mx.uint32 and wq.shape == (3, 5, 256 * bits // 32)
        assert s.dtype == b.dtype == DTYPES[dtype] and s.shape == b.shape == (3, 5, 256 // group)


@pytest.mark.parametrize("bits", BITS)
def test_packing_is_one_lsb_first_bitstream_per_row(bits):
    """Code k of a row occupies bits [k*bits, (k+1)*bits) of the row's little-endian byte stream: hand-packed
    rows dequantize (scale 1, bias 0) to exactly those codes."""
    rng = np.random.default_rng(bits)
    rows, n = 4, 128
    codes = rng.integers(0, 2**bits, (rows, n))
    codes[:, ::32], codes[:, 1::32] = 0, 2**bits - 1  # every group spans the full range
    words = np.zeros((rows, n * bits // 32), np.uint32)
    for r in range(rows):
        stream = 0
        for k, c in enumerate(codes[r]):
            stream |= int(c) << (k * bits)
        for i in range(words.shape[1]):
            words[r, i] = (stream >> (32 * i)) & 0xFFFFFFFF
    ones = mx.ones((rows, n // 32), dtype=mx.float32)
    deq = mx.dequantize(mx.array(words), ones, mx.zeros_like(ones), group_size=32, bits=bits, stream=CPU)
    np.testing.assert_array_equal(np.array(deq), codes.astype(np.float32))
    # ... and mx.quantize writes that layout: codes - n_bins puts the minimum -n_bins at the edge with scale 1
    # and bias -n_bins, so quantizing them gives exactly the hand-packed words.
    x = mx.array((codes - (2**bits - 1)).astype(np.float32))
    wq, s, b = mx.quantize(x, group_size=32, bits=bits, stream=CPU)
    assert (np.array(s) == 1).all() and (np.array(b) == -(2**bits - 1)).all()
    np.testing.assert_array_equal(np.array(wq), words)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group", list(itertools.product(BITS, GROUPS)))
def test_quantize_is_the_documented_algorithm(bits, group, dtype):
    """Scale/bias from the extremes, 0.0 on the grid, codes from the float32 scale and bias, round half to even,
    scale and bias stored in the input dtype: the numpy reference of that algorithm equals mx.quantize, for
    ordinary and edge groups."""
    rng = np.random.default_rng(bits * 1000 + group)
    for kind, w in _group_kinds(rng, 6, group * 4).items():
        x = mx.array(w.astype(np.float32)).astype(DTYPES[dtype])
        got = mx.quantize(x, group_size=group, bits=bits, stream=CPU)
        want = ref.quantize(as_np(x), bits=bits, group_size=group, dtype=DTYPES[dtype])
        for name, g, v in zip(("wq", "scales", "biases"), got, want):
            np.testing.assert_array_equal(as_np(g), v, err_msg=f"{kind} {name}")


def test_rounding_is_half_to_even():
    """2 bits, group 32: max 3 is the edge (scale -1, bias 3), so 2.5 and 1.5 land on x.5 before rounding."""
    w = np.full((1, 32), 3.0, np.float32)
    w[0, :4] = [0.0, 0.5, 1.5, 3.0]
    wq, s, b = mx.quantize(mx.array(w), group_size=32, bits=2, stream=CPU)
    assert s.item() == -1.0 and b.item() == 3.0
    # (w - 3) / -1 = [3, 2.5, 1.5, 0]: half-to-even gives 2 and 2 (half away from zero would give 3 and 2).
    np.testing.assert_array_equal(ref.unpack_codes(np.array(wq), 2)[0, :4], [3, 2, 2, 0])


def test_codes_use_the_unrounded_scale_and_bias():
    """In bfloat16 the stored scale and bias are rounded, but the codes were computed before that rounding:
    codes recomputed from the stored (rounded) values differ somewhere, the reference's do not."""
    rng = np.random.default_rng(0)
    x = mx.array((rng.standard_normal((256, 512)) * 0.02).astype(np.float32)).astype(mx.bfloat16)
    wq, s, b = mx.quantize(x, group_size=64, bits=4, stream=CPU)
    codes = ref.unpack_codes(np.array(wq), 4)
    g = as_np(x).reshape(256, -1, 64)
    from_stored = np.clip(np.rint((g - as_np(b)[..., None]) / as_np(s)[..., None]), 0, 15).reshape(codes.shape)
    assert (from_stored != codes).any()
    np.testing.assert_array_equal(
        ref.unpack_codes(ref.quantize(as_np(x), bits=4, group_size=64, dtype=mx.bfloat16)[0], 4), codes
    )


def test_zero_is_a_code_of_every_group_that_spans_it():
    """bias = edge and scale = edge / q0 with q0 an integer: code -q0 dequantizes to 0 up to one rounding
    of edge / q0 (float32)."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 512)) * 0.02).astype(np.float32)
    wq, s, b = mx.quantize(mx.array(w), group_size=64, bits=4, stream=CPU)
    s, b = np.array(s), np.array(b)
    q_zero = -b / s
    np.testing.assert_allclose(q_zero, np.rint(q_zero), atol=1e-4)
    assert ((np.rint(q_zero) >= 0) & (np.rint(q_zero) <= 15)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_groups_by_hand(dtype):
    """Constant, zero and one-sided groups (group 32, 3 bits)."""
    t = DTYPES[dtype]

    def q(values):
        wq, s, b = mx.quantize(
            mx.array(np.asarray(values, np.float32)[None]).astype(t), group_size=32, bits=3, stream=CPU
        )
        return (
            ref.unpack_codes(np.array(wq), 3)[0],
            float(s.astype(mx.float32).item()),
            float(b.astype(mx.float32).item()),
        )

    rnd = lambda v: float(ref.round_to(np.float32(v), t))  # noqa: E731
    c = rnd(0.037)
    codes, s, b = q(np.full(32, c))  # the scale floor eps = 1e-7, bias = the value: every code 0
    assert (codes == 0).all() and b == c and s < 0 and abs(s) == pytest.approx(rnd(1e-7), rel=0.1)
    codes, s, b = q(np.zeros(32))  # q0 = 0: bias 0, scale -eps
    assert (codes == 0).all() and b == 0.0 and s == rnd(-1e-7)
    pos = np.linspace(0.01, 0.08, 32)  # |max| > |min|: the maximum is the edge (code 0), scale negative
    codes, s, b = q(pos)
    assert s < 0 and b == rnd(float(np.float32(rnd(0.08)))) and codes[-1] == 0
    neg = -pos  # |min| > |max|: the minimum is the edge (code 0), scale positive
    codes, s, b = q(neg)
    assert s > 0 and b == rnd(-0.08) and codes[-1] == 0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dequantize_rounds_twice_in_the_scales_dtype(dtype):
    """T(T(q * s) + b) on the CPU stream; one rounding of q * s + b gives different values somewhere."""
    t = DTYPES[dtype]
    rng = np.random.default_rng(2)
    x = mx.array((rng.standard_normal((256, 512)) * 0.02).astype(np.float32)).astype(t)
    wq, s, b = mx.quantize(x, group_size=64, bits=4, stream=CPU)
    got = as_np(mx.dequantize(wq, s, b, group_size=64, bits=4, stream=CPU))
    assert mx.dequantize(wq, s, b, group_size=64, bits=4, stream=CPU).dtype == t
    np.testing.assert_array_equal(got, ref.dequantize(np.array(wq), s, b, bits=4, group_size=64, dtype=t))
    codes = ref.unpack_codes(np.array(wq), 4).reshape(256, -1, 64).astype(np.float32)
    once = ref.round_to(codes * as_np(s)[..., None] + as_np(b)[..., None], t).reshape(got.shape)
    assert (once != got).any()


def test_expert_stacks_quantize_like_flattened_rows():
    rng = np.random.default_rng(3)
    x = mx.array((rng.standard_normal((4, 16, 256)) * 0.02).astype(np.float32)).astype(mx.bfloat16)
    three = mx.quantize(x, group_size=64, bits=3, stream=CPU)
    two = mx.quantize(x.reshape(64, 256), group_size=64, bits=3, stream=CPU)
    for a, b in zip(three, two):
        assert mx.array_equal(a.reshape(b.shape), b).item()


def test_installed_metal_quantizer_differs_from_the_cpu_one():
    """No GPU here: what this checks is the Metal kernel source shipped in the installed wheel, which starts
    w_max at 0 (the CPU quantizer starts at -inf) and rounds edge / scale with round() (half away from zero)."""
    header = pathlib.Path(mx.__file__).parent / "include/mlx/backend/metal/kernels/quantized.h"
    if not header.is_file():
        pytest.skip(f"{header} is not in this mlx install")
    text = header.read_text()
    body = text[text.index("affine_quantize") :]
    body = body[: body.index("\n}\n")]
    assert "float w_max = 0;" in body and "round(edge / scale)" in body


@pytest.mark.skipif(not mx.metal.is_available(), reason="no Metal GPU: the GPU-vs-CPU difference is not measured here")
def test_gpu_quantizer_differs_on_all_negative_groups():
    x = mx.array(-np.abs(np.random.default_rng(4).standard_normal((64, 256))).astype(np.float32) * 0.02 - 0.01)
    cpu = mx.quantize(x, group_size=64, bits=4, stream=mx.cpu)
    gpu = mx.quantize(x, group_size=64, bits=4, stream=mx.gpu)
    assert not all(mx.array_equal(a, b).item() for a, b in zip(cpu, gpu))
