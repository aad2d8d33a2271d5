"""DoRA fuse against mlx-lm's DoRALinear.fuse, and the refusal of bad input."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.tuner.dora import DoRALinear

from kernel_cases import as_np, quantized
from reqnoise import fuse_quantized
from reqnoise.kernel import reference as ref
from reqnoise.kernel.quant_format import all_finite


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("stacked", [False, True])
def test_dora_matches_mlx_lm(bits, stacked):
    rng = np.random.default_rng(bits)
    lin = nn.Linear(256, 64, bias=False)
    lin.weight = mx.array((rng.standard_normal((64, 256)) * 0.02).astype(np.float32))
    qlin = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=bits)
    dora = DoRALinear.from_base(qlin, r=4, scale=2.0)
    dora.lora_a = mx.array((rng.standard_normal((256, 4)) * 0.05).astype(np.float32))
    dora.lora_b = mx.array((rng.standard_normal((4, 64)) * 0.05).astype(np.float32))
    dora.m = dora.m * mx.array(rng.uniform(0.8, 1.2, 64).astype(np.float32))
    theirs = dora.fuse()
    want = mx.dequantize(theirs.weight, theirs.scales, theirs.biases, group_size=64, bits=bits)

    args = [qlin.weight, qlin.scales, qlin.biases, dora.lora_a.T, dora.lora_b.T, dora.m]
    if stacked:  # the same layer as a 2-expert stack: the kernel generalises DoRA to switch layers
        args = [mx.stack([x, x]) for x in args]
    wq, s, b = fuse_quantized(
        *args[:3], group_size=64, bits=bits, lora_a=args[3], lora_b=args[4], scale=2.0, dora_magnitude=args[5]
    )
    got = mx.dequantize(wq, s, b, group_size=64, bits=bits)
    got = got[1] if stacked else got
    step = np.repeat(np.abs(as_np(s if not stacked else s[1])), 64, axis=-1)
    diff = np.abs(as_np(got) - as_np(want))
    # The two differ only in how the row norm is accumulated (float64 here, float32 in MLX): a code may
    # land one step apart where a value sits on a rounding boundary, and rarely.
    assert np.all(diff <= step * 1.001)
    assert np.mean(diff > 1e-6) < 0.01
    # Rows have the intended magnitude (up to quantization).
    norms = np.linalg.norm(as_np(got), axis=-1)
    np.testing.assert_allclose(norms, as_np(dora.m), rtol=0.05 if bits == 4 else 0.01)


def test_dora_any_width_matches_reference():
    rng = np.random.default_rng(0)
    for bits in (3, 5, 6):
        wq, s, b = quantized(rng, (2, 32, 256), bits, 64, mx.bfloat16)
        a = mx.array(rng.integers(-4, 5, (2, 2, 256)).astype(np.float32) / 64)
        bb = mx.array(rng.integers(-4, 5, (2, 32, 2)).astype(np.float32) / 64)
        m = mx.array(rng.uniform(0.1, 0.5, (2, 32)).astype(np.float32))
        for requant in ("fresh", "keep-grid"):
            got = fuse_quantized(
                wq, s, b, group_size=64, bits=bits, lora_a=a, lora_b=bb, dora_magnitude=m, requant=requant
            )
            want = ref.fuse(wq, s, b, group_size=64, bits=bits, lora_a=a, lora_b=bb, dora_magnitude=m, requant=requant)
            codes_got = ref.unpack_codes(np.array(got[0]), bits)
            codes_want = ref.unpack_codes(np.array(want[0]), bits)
            # The row norm is a float64 sum in both, but in different orders: allow a boundary code or two.
            assert np.mean(codes_got != codes_want) < 2e-3, (bits, requant)


@pytest.fixture(scope="module")
def q4():
    return quantized(np.random.default_rng(0), (2, 16, 128), 4, 64, mx.bfloat16)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(bits=7), "bits must be one of"),
        (dict(group_size=48), "group_size must be one of"),
        (dict(wq="float"), "wq must be uint32"),
        (dict(wq="1d"), "must be 2-D"),
        (dict(scales="shape"), r"scales must have shape \(2, 16, 2\)"),
        (dict(scales="int"), "scales must be float32"),
        (dict(biases="f16"), "biases dtype"),
        (dict(lora_a="only"), "given together"),
        (dict(lora_a="wrong_in"), r"lora_a must have shape \(2, 3, 128\)"),
        (dict(lora_b="wrong_r"), r"lora_b must have shape \(2, 16, 3\)"),
        (dict(lora_a="nan"), "lora_a contains NaN"),
        (dict(lora_b="inf"), "lora_b contains NaN or Inf"),
        (dict(dora="nan"), "dora_magnitude contains NaN"),
        (dict(dora="shape"), r"dora_magnitude must have shape \(2, 16\)"),
        (dict(out_bits=8, requant="keep-grid"), "need requant='fresh'"),
        (dict(requant="stochastic"), "requant must be one of"),
        (dict(out_group_size=256), "group_size must be one of"),
        (dict(experts_per_chunk=0), "experts_per_chunk"),
        (dict(scale=float("nan")), "scale must be a finite number"),
        (dict(lora_a="int"), "lora_a must be a float array"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(q4, change, match):
    wq, s, b = q4
    a = mx.zeros((2, 3, 128))
    bb = mx.zeros((2, 16, 3))
    kw = dict(group_size=64, bits=4, lora_a=a, lora_b=bb)
    special = {
        "wq": {"float": wq.astype(mx.float32), "1d": wq.reshape(-1)},
        "scales": {"shape": s[..., :1], "int": s.astype(mx.int32)},
        "biases": {"f16": b.astype(mx.float16)},
        "lora_a": {
            "only": None,
            "wrong_in": mx.zeros((2, 3, 64)),
            "nan": a + mx.array(float("nan")),
            "int": a.astype(mx.int32),
        },
        "lora_b": {"wrong_r": mx.zeros((2, 16, 2)), "inf": bb + mx.array(float("inf"))},
        "dora": {"nan": mx.full((2, 16), float("nan")), "shape": mx.ones((16,))},
    }
    for key, val in change.items():
        if key in special:
            val = special[key][val]
            if key == "wq":
                wq = val
            elif key == "scales":
                s = val
            elif key == "biases":
                b = val
            elif key == "dora":
                kw["dora_magnitude"] = val
            else:
                kw[key] = val
        else:
            kw[key] = val
    with pytest.raises((ValueError, TypeError), match=match):
        fuse_quantized(wq, s, b, **kw)


def test_inputs_are_never_modified(q4):
    wq, s, b = q4
    before = [np.array(x.astype(mx.float32) if x.dtype != mx.uint32 else x) for x in q4]
    fuse_quantized(
        wq, s, b, group_size=64, bits=4, lora_a=mx.ones((2, 1, 128)), lora_b=mx.ones((2, 16, 1)), experts_per_chunk=1
    )
    after = [np.array(x.astype(mx.float32) if x.dtype != mx.uint32 else x) for x in q4]
    for x, y in zip(before, after):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
def test_the_finiteness_check_agrees_with_mlx_on_every_pattern(dtype):
    """all_finite (numpy over MLX's buffer, bfloat16 by its exponent bits) against mx.isfinite: every 16-bit
    pattern of the 16-bit dtypes, and float32's extremes; each non-finite pattern alone among finite ones."""
    if dtype == mx.float32:
        edge = np.array([0x7F7FFFFF, 0xFF7FFFFF, 1, 0x80000001, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001,
                         0xFFFFFFFF], dtype=np.uint32)  # fmt: skip
        x = mx.array(edge).view(dtype)
    else:
        x = mx.array(np.arange(1 << 16, dtype=np.uint16)).view(dtype)
    ok = np.array(mx.isfinite(x))
    finite, bad = x[mx.array(np.flatnonzero(ok))], np.flatnonzero(~ok)
    assert finite.size and bad.size
    assert all_finite(finite)
    for i in bad:
        assert not all_finite(mx.concatenate([finite[:7], x[int(i) : int(i) + 1], finite[7:]])), hex(int(i))
