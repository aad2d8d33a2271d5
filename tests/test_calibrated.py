"""requant='calibrated': fixed-grid error feedback (GPTQ onto the stored grid) from calibration activations."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptq_oracle import gptq_fixed_grid, pack, unpack
from kernel_cases import BITS, DTYPES, GROUPS, as_np, assert_every_isa_copy_agrees, quantized
from reqnoise.kernel.op import fuse_calibrated, fuse_quantized, inverse_hessian_factor


def correlated_acts(rng, n, in_dim, rank=8, basis=None):
    """Low-rank-plus-noise activations with a few outlier channels (the shape real ones have)."""
    basis = rng.standard_normal((rank, in_dim)) if basis is None else basis
    x = rng.standard_normal((n, rank)) @ basis + 0.1 * rng.standard_normal((n, in_dim))
    x[:, ::37] *= 8
    return x.astype(np.float32), basis


def hessian(x):
    return mx.array(x.T @ x / x.shape[0])


def test_oracle_pack_roundtrip():
    rng = np.random.default_rng(0)
    for bits in BITS:
        wq, _, _ = quantized(rng, (4, 128), bits, 32, mx.float32)
        assert np.array_equal(pack(unpack(np.array(wq), bits), bits), np.array(wq))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_zero_delta_bit_identical(bits, group, dtype):
    rng = np.random.default_rng(bits * 1000 + group)
    x, _ = correlated_acts(rng, 512, 256)
    for shape, h in (((16, 256), hessian(x)), ((3, 8, 256), mx.stack([hessian(x), hessian(x[:300]), hessian(x[1:])]))):
        wq, s, b = quantized(rng, shape, bits, group, DTYPES[dtype], kind="student")
        out = fuse_quantized(wq, s, b, group_size=group, bits=bits, requant="calibrated", hessian=h)
        assert np.array_equal(np.array(out[0]), np.array(wq))
        assert out[1] is s and out[2] is b


# blocks of 24 and 40 leave lazy-batch column ranges that are not whole 16-column register tiles
CASES = [
    (2, 32, "float32", 32),
    (3, 64, "float32", 24),
    (4, 32, "bfloat16", 32),
    (5, 64, "float16", 32),
    (8, 32, "float32", 40),
]


@pytest.mark.parametrize("bits,group,dtype,block", CASES)
def test_matches_numpy_fixed_grid_gptq(bits, group, dtype, block):
    """Bit-exact against the numpy oracle, including the lazy-batch split (block < in) and a 3-D stack."""
    rng = np.random.default_rng(bits)
    e, out_dim, in_dim, r = 2, 6, 128, 2
    wq, s, b = quantized(rng, (e, out_dim, in_dim), bits, group, DTYPES[dtype])
    x, _ = correlated_acts(rng, 400, in_dim)
    hs = mx.stack([hessian(x), hessian(x[:200] * 2)])
    a = mx.array(rng.standard_normal((e, r, in_dim)).astype(np.float32))
    bb = mx.array(rng.standard_normal((e, out_dim, r)).astype(np.float32))
    scale = float(np.mean(np.abs(as_np(s)))) * 0.3
    got, _, _, fallback = fuse_calibrated(
        wq, s, b, group_size=group, bits=bits, hessian=hs, lora_a=a, lora_b=bb, scale=scale, block=block
    )
    assert fallback == []
    for k in range(e):
        u = np.array(inverse_hessian_factor(hs[k]))
        ref = gptq_fixed_grid(
            unpack(np.array(wq[k]), bits), as_np(s[k]), as_np(b[k]), group, bits, u, np.array(a[k]),
            np.array(bb[k]), scale, block=block,
        )  # fmt: skip
        assert np.array_equal(unpack(np.array(got[k]), bits), ref)
    assert not np.array_equal(np.array(got), np.array(wq))  # the case is not trivially the zero delta


FP_MODES = ("mxfp4", "nvfp4", "mxfp8")


def fp_quantized(rng, shape, mode, kind="student"):
    from kernel_cases import weights

    return mx.quantize(mx.array(weights(rng, shape, kind)), mode=mode)


@pytest.mark.parametrize("mode", FP_MODES)
def test_fp_zero_delta_bit_identical(mode):
    """The fp modes' fixed grid: scale byte and code table untouched, every code its own nearest, zero error; also
    with -0 codes and (mxfp8) NaN codes, which must neither change nor spread."""
    rng = np.random.default_rng(11)
    x, _ = correlated_acts(rng, 512, 256)
    for shape, h in (((16, 256), hessian(x)), ((3, 8, 256), mx.stack([hessian(x), hessian(x[:300]), hessian(x[1:])]))):
        wq, s = fp_quantized(rng, shape, mode)
        raw = np.array(wq).view(np.uint8).copy()
        if mode == "mxfp8":
            raw.reshape(-1)[::29] = 0x7F  # NaN
            raw.reshape(-1)[5::31] = 0x80  # -0
        else:
            raw.reshape(-1)[::13] = (raw.reshape(-1)[::13] & 0xF0) | 0x08  # a -0 code in the low nibble
        wq = mx.array(raw.view(np.uint32))
        out = fuse_quantized(wq, s, mode=mode, requant="calibrated", hessian=h)
        assert np.array_equal(np.array(out[0]), np.array(wq))
        assert out[1] is s and out[2] is None


@pytest.mark.parametrize("mode", FP_MODES)
def test_fp_matches_numpy_fixed_grid_gptq(mode):
    """Bit-exact against the numpy oracle on each fp mode's stored grid (3-D stack, block 24, rank 2)."""
    rng = np.random.default_rng(12)
    e, out_dim, in_dim, r = 2, 6, 128, 2
    wq, s = fp_quantized(rng, (e, out_dim, in_dim), mode)
    x, _ = correlated_acts(rng, 400, in_dim)
    hs = mx.stack([hessian(x), hessian(x[:200] * 2)])
    a = mx.array(rng.standard_normal((e, r, in_dim)).astype(np.float32))
    bb = mx.array(rng.standard_normal((e, out_dim, r)).astype(np.float32))
    bits = 8 if mode == "mxfp8" else 4
    group = 16 if mode == "nvfp4" else 32
    from reqnoise.kernel.reference import fp_scale_values

    scale = float(np.median(fp_scale_values(np.array(s), mode))) * 0.3
    got, _, _, fallback = fuse_calibrated(
        wq, s, mode=mode, hessian=hs, lora_a=a, lora_b=bb, scale=scale, block=24
    )  # fmt: skip
    assert fallback == []
    for k in range(e):
        u = np.array(inverse_hessian_factor(hs[k]))
        ref = gptq_fixed_grid(
            unpack(np.array(wq[k]), bits), np.array(s[k]), None, group, bits, u, np.array(a[k]), np.array(bb[k]),
            scale, block=24, mode=mode,
        )  # fmt: skip
        assert np.array_equal(unpack(np.array(got[k]), bits), ref)
    assert not np.array_equal(np.array(got), np.array(wq))


@pytest.mark.parametrize("mode", FP_MODES)
def test_fp_held_out_error_below_keep_grid(mode):
    rng = np.random.default_rng(13)
    out_dim, in_dim = 32, 256
    wq, s = fp_quantized(rng, (out_dim, in_dim), mode, kind="normal")
    x, basis = correlated_acts(rng, 8 * in_dim, in_dim)
    x_held, _ = correlated_acts(rng, 4 * in_dim, in_dim, basis=basis)
    a = mx.array(rng.standard_normal((2, in_dim)).astype(np.float32))
    bb = mx.array(rng.standard_normal((out_dim, 2)).astype(np.float32))
    d = bb @ a
    w_hat = mx.dequantize(wq, s, mode=mode, dtype=mx.float32)
    step = float(np.mean(np.abs(np.array(w_hat)))) * 0.25  # ~ a code step near the typical magnitude
    scale = 0.3 * step / float(np.sqrt(np.mean(np.array(d) ** 2)))
    kw = dict(mode=mode, lora_a=a, lora_b=bb, scale=scale)
    res = {}
    for requant in ("calibrated", "keep-grid"):
        new = fuse_quantized(wq, s, requant=requant, hessian=hessian(x) if requant == "calibrated" else None, **kw)
        w_new = mx.dequantize(new[0], s, mode=mode, dtype=mx.float32)
        xt = mx.array(x_held).T
        res[requant] = (mx.linalg.norm((w_new - w_hat - scale * d) @ xt) / mx.linalg.norm(scale * d @ xt)).item()
    assert res["calibrated"] < res["keep-grid"], res


def test_inverse_hessian_factor_against_numpy():
    rng = np.random.default_rng(1)
    x, _ = correlated_acts(rng, 300, 64)
    h = x.astype(np.float64).T @ x / 300
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(64)
    u = np.array(inverse_hessian_factor(mx.array(h.astype(np.float32))), dtype=np.float64)
    assert np.allclose(np.triu(u), u)
    # float32 factorisation of a condition number ~1e4 matrix: relative tolerance 1e-2 on the inverse
    np.testing.assert_allclose(
        u.T @ u, np.linalg.inv(damped), rtol=1e-2, atol=1e-2 * np.abs(np.linalg.inv(damped)).max()
    )
    assert inverse_hessian_factor(mx.zeros((64, 64))) is None


@pytest.mark.parametrize("n", [1, 33, 100, 256])
def test_native_factor_float32_path_against_numpy(n):
    """Blocked float32 factor (panels of 32 columns, sizes that are not multiples of the tiles) vs float64 numpy."""
    from reqnoise import _core

    rng = np.random.default_rng(n)
    x = rng.standard_normal((2 * n + 8, n))
    x[:, ::7] *= 8
    h = (x.T @ x / len(x)).astype(np.float32)
    u, attempt = _core.inverse_hessian_factor(mx.array(h), 0.01)
    assert attempt == 1  # float32 at the asked damping
    u = np.array(u, dtype=np.float64)
    ref = np.linalg.inv(h.astype(np.float64) + 0.01 * np.mean(np.diag(h.astype(np.float64))) * np.eye(n))
    assert np.array_equal(np.triu(u), u)
    # float32 arithmetic on a damped Hessian (condition <= ~100 n): 1e-4 of the inverse's largest entry
    np.testing.assert_allclose(u.T @ u, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_native_factor_goes_to_float64_when_float32_cancels():
    """A rank-4 Hessian with 1e-5 damping: float32 pivots lose more than 12 bits, float64 gives the factor."""
    from reqnoise import _core

    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    h = x.T @ x / 4
    u, attempt = _core.inverse_hessian_factor(mx.array(h), 1e-5)
    assert attempt == 2  # float64 at the asked damping
    u = np.array(u, dtype=np.float64)
    h64 = h.astype(np.float64)
    ref = np.linalg.inv(h64 + 1e-5 * np.mean(np.diag(h64)) * np.eye(64))
    # condition ~1e6: float64 then one float32 rounding of U, ~1e-6 of the inverse's largest entry
    np.testing.assert_allclose(u.T @ u, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # an indefinite float32 matrix: more damping, then none
    assert _core.inverse_hessian_factor(mx.array(h), 1e-7)[1] in (3, 4, 5, 6)
    assert _core.inverse_hessian_factor(mx.array(-np.eye(8, dtype=np.float32)), 0.01) == (None, 0)


_ISA_SCRIPT = """
import hashlib, sys
sys.path.insert(0, sys.argv[1])
import mlx.core as mx, numpy as np
from kernel_cases import DTYPES, quantized
from reqnoise import _core
from reqnoise.kernel.op import fuse_calibrated
h = hashlib.sha256()
rng = np.random.default_rng(0)
x = rng.standard_normal((300, 160)).astype(np.float32)
x[:, ::9] *= 8
hs = [mx.array(x.T @ x / 300), mx.array(x[:40].T @ x[:40] / 40)]
for hh, d in ((hs[0], 0.01), (hs[1], 1e-5)):
    u, attempt = _core.inverse_hessian_factor(hh, d)
    h.update(np.array(u).tobytes() + bytes([attempt]))
for bits, dtype in ((2, "float32"), (3, "bfloat16"), (5, "float16"), (8, "float32")):
    wq, s, b = quantized(rng, (2, 24, 160), bits, 32, DTYPES[dtype])
    a = mx.array(rng.standard_normal((2, 3, 160)).astype(np.float32))
    bb = mx.array(rng.standard_normal((2, 24, 3)).astype(np.float32))
    m = mx.array(rng.uniform(0.1, 1, (2, 24)).astype(np.float32))
    for kw in (dict(), dict(dora_magnitude=m), dict(block=24)):
        out = fuse_calibrated(wq, s, b, group_size=32, bits=bits, hessian=mx.stack(hs), lora_a=a, lora_b=bb,
                              scale=0.05, **kw)
        h.update(np.array(out[0]).tobytes())
print(_core.kernel_isa(), h.hexdigest())
"""


def test_every_instruction_set_copy_computes_the_same_bytes():
    assert_every_isa_copy_agrees(_ISA_SCRIPT, str(Path(__file__).parent))


def test_no_tokens_falls_back_to_keep_grid_and_is_reported():
    rng = np.random.default_rng(2)
    wq, s, b = quantized(rng, (3, 8, 128), 3, 64, mx.float16)
    a = mx.array(rng.standard_normal((3, 2, 128)).astype(np.float32) * 0.05)
    bb = mx.array(rng.standard_normal((3, 8, 2)).astype(np.float32) * 0.05)
    x, _ = correlated_acts(rng, 300, 128)
    h = hessian(x)
    got, _, _, fallback = fuse_calibrated(
        wq, s, b, group_size=64, bits=3, hessian=lambda e0, e1: [None if e == 1 else h for e in range(e0, e1)],
        lora_a=a, lora_b=bb,
    )  # fmt: skip
    keep = fuse_quantized(wq, s, b, group_size=64, bits=3, requant="keep-grid", lora_a=a, lora_b=bb)[0]
    assert fallback == [1]
    assert np.array_equal(np.array(got[1]), np.array(keep[1]))
    assert not np.array_equal(np.array(got[0]), np.array(keep[0]))


def test_bytes_do_not_depend_on_threads_or_chunks():
    rng = np.random.default_rng(3)
    wq, s, b = quantized(rng, (4, 24, 256), 4, 64, mx.bfloat16)
    a = mx.array(rng.standard_normal((4, 2, 256)).astype(np.float32) * 0.02)
    bb = mx.array(rng.standard_normal((4, 24, 2)).astype(np.float32) * 0.02)
    x, _ = correlated_acts(rng, 400, 256)
    hs = mx.stack([hessian(x[i * 50 : i * 50 + 200]) for i in range(4)])
    outs = [
        np.array(
            fuse_quantized(
                wq, s, b, group_size=64, bits=4, requant="calibrated", hessian=hs, lora_a=a, lora_b=bb,
                num_threads=t, experts_per_chunk=c,
            )[0]
        )
        for t, c in ((1, None), (2, 4), (3, 1), (7, 3))
    ]  # fmt: skip
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


def test_calibrated_needs_a_hessian():
    rng = np.random.default_rng(4)
    wq, s, b = quantized(rng, (8, 128), 3, 64, mx.float32)
    with pytest.raises(ValueError, match="needs hessian"):
        fuse_quantized(wq, s, b, group_size=64, bits=3, requant="calibrated")
    with pytest.raises(ValueError, match="shape"):
        fuse_quantized(wq, s, b, group_size=64, bits=3, requant="calibrated", hessian=mx.zeros((64, 64)))
    with pytest.raises(ValueError, match="used by requant='calibrated' only"):
        fuse_quantized(wq, s, b, group_size=64, bits=3, requant="keep-grid", hessian=mx.zeros((128, 128)))


def held_out_residual(wq_new, wq, s, b, group, bits, delta, x):
    w_hat = mx.dequantize(wq, s, b, group_size=group, bits=bits)
    w_new = mx.dequantize(wq_new, s, b, group_size=group, bits=bits)
    xt = mx.array(x).T
    return (mx.linalg.norm((w_new - w_hat - delta) @ xt) / mx.linalg.norm(delta @ xt)).item()


@settings(max_examples=12, deadline=None)
@given(
    out_dim=st.sampled_from([16, 32]),
    in_dim=st.sampled_from([128, 256]),
    bits=st.sampled_from([2, 3, 4]),
    steps=st.floats(0.1, 1.0),
    seed=st.integers(0, 2**16),
)
def test_held_out_error_below_keep_grid(out_dim, in_dim, bits, steps, seed):
    """For a delta of 0.1-1 quantization step (RMS), error feedback beats keep-grid on activations it never saw."""
    rng = np.random.default_rng(seed)
    wq, s, b = quantized(rng, (out_dim, in_dim), bits, 64, mx.float32)
    x, basis = correlated_acts(rng, 8 * in_dim, in_dim)
    x_held, _ = correlated_acts(rng, 4 * in_dim, in_dim, basis=basis)
    a = mx.array(rng.standard_normal((2, in_dim)).astype(np.float32))
    bb = mx.array(rng.standard_normal((out_dim, 2)).astype(np.float32))
    d = bb @ a
    step = float(np.mean(np.abs(np.array(s))))
    scale = steps * step / float(np.sqrt(np.mean(np.array(d) ** 2)))
    kw = dict(group_size=64, bits=bits, lora_a=a, lora_b=bb, scale=scale)
    cal = fuse_quantized(wq, s, b, requant="calibrated", hessian=hessian(x), **kw)[0]
    keep = fuse_quantized(wq, s, b, requant="keep-grid", **kw)[0]
    r_cal = held_out_residual(cal, wq, s, b, 64, bits, scale * d, x_held)
    r_keep = held_out_residual(keep, wq, s, b, 64, bits, scale * d, x_held)
    assert r_cal < r_keep


# ---- the model-level fuse on the toy MoE model ----


@pytest.fixture(scope="module")
def toy_adapter(toy_model_dir, tmp_path_factory):
    from fuse_helpers import make_adapter

    return make_adapter(toy_model_dir, tmp_path_factory.mktemp("cal") / "adapter", dyadic=False, size=0.05)


def test_zero_control_gives_the_identical_model_and_reports_calibration(toy_model_dir, toy_adapter, tmp_path):
    from fuse_helpers import weights
    from reqnoise.fuse.model import fuse_model

    rep = fuse_model(toy_model_dir, toy_adapter, tmp_path / "z", requant="calibrated", control="zero", progress=False)
    ours, base = weights(tmp_path / "z"), weights(toy_model_dir)
    assert set(ours) == set(base)
    for k in base:
        assert mx.array_equal(ours[k], base[k]).item() and ours[k].dtype == base[k].dtype, k
    saved = json.loads((tmp_path / "z" / "fuse_report.json").read_text())
    assert saved["calibration"]["source"] == "builtin" and len(saved["calibration"]["sha256"]) == 64
    assert saved["calibration"]["tokens"] == rep.calibration["tokens"] > 0
    stack = [m for m in saved["modules"] if m["experts"]]
    assert stack and all(len(m["calibration"]["tokens_per_expert"]) == m["experts"] for m in stack)
    # top-k routing: each token reaches k experts of a stack
    assert sum(stack[0]["calibration"]["tokens_per_expert"]) == 2 * saved["calibration"]["tokens"]


def test_experts_without_tokens_fall_back_and_are_reported(toy_model_dir, toy_adapter, tmp_path):
    from reqnoise.fuse.model import fuse_model

    rep = fuse_model(toy_model_dir, toy_adapter, tmp_path / "f", requant="calibrated", calib_tokens=6, progress=False)
    for m in rep.modules:
        counts = m["calibration"]["tokens_per_expert"]
        starved = [e for e, n in enumerate(counts) if n < 16]
        assert m["calibration"]["keep_grid_fallback"] == starved
    assert any(m["calibration_fallback_experts"] for m in rep.modules if m["experts"])


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "is empty"),
        ('{"text": "fine"}\nnot json\n', r":2: not valid JSON"),
        ('{"question": "no known key"}\n', "no 'messages'"),
        (json.dumps({"text": "word " * 5000}) + "\n", "longer than the model's context"),
    ],
)
def test_bad_calibration_data_fails_before_any_work(toy_model_dir, toy_adapter, tmp_path, content, match):
    from reqnoise.errors import ReqnoiseError
    from reqnoise.fuse.model import fuse_model

    data = tmp_path / "calib.jsonl"
    data.write_text(content)
    with pytest.raises(ReqnoiseError, match=match) as err:
        fuse_model(
            toy_model_dir, toy_adapter, tmp_path / "o", requant="calibrated", calib_data=str(data), progress=False
        )
    assert "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()


def test_calib_options_need_calibrated():
    from reqnoise.errors import ReqnoiseError
    from reqnoise.fuse.options import FuseOptions

    with pytest.raises(ReqnoiseError, match="need --requant calibrated"):
        FuseOptions(requant="keep-grid", calib_tokens=100).check()
