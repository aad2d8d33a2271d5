"""Pure numpy reference of the three fuse semantics: the test oracle for the native kernel.

Written for clarity, not speed, and independently of csrc/: bit packing goes through numpy's bit
(un)packing, rounding to 16-bit types through numpy casts and explicit bit arithmetic. All values are
returned as numpy arrays; 16-bit scales and biases are returned as float32 arrays holding exactly the
representable values.
"""

import mlx.core as mx
import numpy as np

from reqnoise.kernel.formats import check_width, logical_in_dim

_EPS = np.float32(1e-7)


def to_f32(x) -> np.ndarray:
    """An mx.array or array-like as a float32 numpy array (exact for float16/bfloat16 inputs)."""
    if isinstance(x, mx.array):
        return np.array(x.astype(mx.float32))
    return np.asarray(x, dtype=np.float32)


def round_to(x: np.ndarray, dtype) -> np.ndarray:
    """Round float32 values to ``dtype`` (round to nearest even) and return them as float32."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == mx.float32:
        return x
    if dtype == mx.float16:
        return x.astype(np.float16).astype(np.float32)
    if dtype == mx.bfloat16:
        u = x.view(np.uint32).astype(np.uint64)
        u = (u + ((u >> 16) & 1) + 0x7FFF) & 0xFFFF0000
        out = u.astype(np.uint32).view(np.float32)
        return np.where(np.isnan(x), np.float32(np.nan), out)
    raise TypeError(f"unsupported dtype {dtype}")


def unpack_codes(wq: np.ndarray, bits: int) -> np.ndarray:
    """uint32 ``[..., W]`` packed rows -> int64 codes ``[..., W*32/bits]``."""
    wq = np.ascontiguousarray(np.asarray(wq, dtype="<u4"))
    stream = np.unpackbits(wq.view(np.uint8), axis=-1, bitorder="little")
    n = logical_in_dim(wq.shape[-1], bits)
    stream = stream.reshape(wq.shape[:-1] + (n, bits)).astype(np.int64)
    return (stream << np.arange(bits)).sum(-1)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """int codes ``[..., n]`` in ``[0, 2^bits)`` -> uint32 ``[..., n*bits/32]`` packed rows."""
    codes = np.asarray(codes, dtype=np.int64)
    bitplanes = ((codes[..., None] >> np.arange(bits)) & 1).astype(np.uint8)
    bitplanes = bitplanes.reshape(codes.shape[:-1] + (codes.shape[-1] * bits,))
    return np.ascontiguousarray(np.packbits(bitplanes, axis=-1, bitorder="little")).view("<u4")


def quantize(w: np.ndarray, *, bits: int, group_size: int, dtype):
    """MLX's CPU affine quantizer: float32 ``w [..., in]`` -> (wq uint32, scales, biases) as float32 arrays
    holding ``dtype``-rounded values."""
    check_width(bits, group_size)
    w = np.asarray(w, dtype=np.float32)
    g = w.reshape(w.shape[:-1] + (w.shape[-1] // group_size, group_size))
    n_bins = np.float32(2**bits - 1)
    w_max = g.max(-1)
    w_min = g.min(-1)
    mask = np.abs(w_min) > np.abs(w_max)
    scale = np.maximum((w_max - w_min) / n_bins, _EPS)
    scale = np.where(mask, scale, -scale)
    edge = np.where(mask, w_min, w_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        q0 = np.rint(edge / scale)
        nz = q0 != 0
        scale = np.where(nz, edge / np.where(nz, q0, 1), scale).astype(np.float32)
    bias = np.where(nz, edge, np.float32(0)).astype(np.float32)
    codes = np.clip(np.rint((g - bias[..., None]) / scale[..., None]), 0, n_bins).astype(np.int64)
    codes = codes.reshape(w.shape)
    return pack_codes(codes, bits), round_to(scale, dtype), round_to(bias, dtype)


def dequantize(wq, scales, biases, *, bits: int, group_size: int, dtype) -> np.ndarray:
    """MLX's dequantize on the CPU stream: ``q * s`` then ``+ b``, each rounded to ``dtype``."""
    codes = unpack_codes(wq, bits).astype(np.float32)
    g = codes.reshape(codes.shape[:-1] + (-1, group_size))
    s = to_f32(scales)[..., None]
    b = to_f32(biases)[..., None]
    w = round_to(round_to(g * s, dtype) + b, dtype)
    return w.reshape(codes.shape)


def low_rank_delta(lora_a, lora_b, scale: float) -> np.ndarray:
    """``scale * lora_b @ lora_a`` in float32: ``[out, r] x [r, in]`` or batched ``[E, ...]``."""
    a = to_f32(lora_a)
    b = to_f32(lora_b)
    return np.matmul(np.float32(scale) * b, a).astype(np.float32)


def dora_rows(w: np.ndarray, magnitude) -> np.ndarray:
    """``m * w / ||w||_row`` with the row norm in float64 and the row factor rounded to float32."""
    norm = np.sqrt((w.astype(np.float64) ** 2).sum(-1))
    factor = (to_f32(magnitude).astype(np.float64) / norm).astype(np.float32)
    return (factor[..., None] * w).astype(np.float32)


def fuse(
    wq,
    scales,
    biases,
    *,
    group_size,
    bits,
    lora_a=None,
    lora_b=None,
    scale=1.0,
    requant="fresh",
    out_bits=None,
    out_group_size=None,
    dora_magnitude=None,
):
    """Reference of :func:`reqnoise.fuse_quantized`; returns numpy (wq uint32, scales f32, biases f32)."""
    dtype = scales.dtype
    wq_np = np.array(wq)
    delta = None if lora_a is None else low_rank_delta(lora_a, lora_b, scale)
    if requant == "fresh":
        w = dequantize(wq_np, scales, biases, bits=bits, group_size=group_size, dtype=dtype)
        if delta is not None:
            w = round_to(w + round_to(delta, dtype), dtype)
        if dora_magnitude is not None:
            w = dora_rows(w, dora_magnitude)
        return quantize(w, bits=out_bits or bits, group_size=out_group_size or group_size, dtype=dtype)
    if requant != "keep-grid":
        raise ValueError(f"requant must be 'fresh' or 'keep-grid', got {requant!r}")
    codes = unpack_codes(wq_np, bits)
    g = codes.reshape(codes.shape[:-1] + (-1, group_size)).astype(np.float32)
    s = to_f32(scales)[..., None]
    b = to_f32(biases)[..., None]
    w = (g * s + b).reshape(codes.shape)
    if delta is not None:
        w = w + delta
    if dora_magnitude is not None:
        w = dora_rows(w, dora_magnitude)
    wg = w.reshape(g.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        new = np.clip(np.rint((wg - b) / s), 0, 2**bits - 1)
    new = np.where(s == 0, g, new).astype(np.int64).reshape(codes.shape)
    return pack_codes(new, bits), to_f32(scales), to_f32(biases)


# --- The floating-point modes (mxfp4, nvfp4, mxfp8), as measured in docs/mlx-fp-formats.md -----------------
# Written from the rules, by table search in float64, independently of csrc/fp_codec.h's bit arithmetic.

E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)


def _e4m3_table() -> np.ndarray:
    codes = np.arange(256)
    e, m = (codes >> 3) & 15, (codes & 7).astype(np.float64)
    mag = np.where(e == 0, m * 2.0**-9, (1 + m / 8) * 2.0 ** (e - 7.0))
    mag = np.where((codes & 0x7F) == 0x7F, np.nan, mag)
    return np.where(codes & 0x80, -mag, mag).astype(np.float32)


E4M3_VALUES = _e4m3_table()  # codes 0x7F/0xFF are NaN (MLX's from_fp8 agrees); the encoder never makes them


def to_e4m3(x) -> np.ndarray:
    """Nearest E4M3 code (uint8), ties to the even code; |x| >= 464, inf and NaN saturate to +-448 (0x7E)."""
    x = np.asarray(x, dtype=np.float32)
    a = np.abs(x).astype(np.float64)
    table = E4M3_VALUES[:0x7F].astype(np.float64)  # increasing: 0 .. 448
    hi = np.clip(np.searchsorted(table, np.nan_to_num(a, nan=1e9)), 1, 0x7E)
    lo = hi - 1
    d_lo, d_hi = a - table[lo], table[hi] - a
    code = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)
    code = np.where(a >= table[0x7E], 0x7E, code)
    code = np.where(~(a < 464), 0x7E, code)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def to_e2m1(x, dist_dtype=mx.float32) -> np.ndarray:
    """MLX's E2M1 code: the first entry of the code table at the smallest distance ``|x - value|``, each
    distance rounded to ``dist_dtype`` (ties go to the smaller magnitude, |x| <= 0.25 to +0, inf and NaN to 0;
    far beyond 6 the rounded distances decide)."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        d = np.abs(round_to(x[..., None] - E2M1_VALUES, dist_dtype))
    return np.argmin(d, axis=-1).astype(np.int64)


FP_MODES = {"mxfp4": (4, 32, 6.0), "nvfp4": (4, 16, 6.0), "mxfp8": (8, 32, 448.0)}  # bits, group, largest code


def _ceil_pow2_exponent(s: np.ndarray) -> np.ndarray:
    m, e = np.frexp(s.astype(np.float64))
    return np.where(s == 0, 0, np.where(m == 0.5, e - 1, e)).astype(np.int64)


def fp_scale_values(scales, mode: str) -> np.ndarray:
    """The float32 value of each stored scale byte: 2^(byte-127) (e8m0) or the e4m3 value (nvfp4)."""
    b = np.asarray(scales).astype(np.int64)
    if mode == "nvfp4":
        return E4M3_VALUES[b]
    with np.errstate(over="ignore"):
        return np.ldexp(np.float32(1), b - 127).astype(np.float32)


def fp_code_values(codes, mode: str) -> np.ndarray:
    return (E4M3_VALUES if mode == "mxfp8" else E2M1_VALUES)[np.asarray(codes, dtype=np.int64)]


def fp_quantize(w: np.ndarray, *, mode: str, dtype):
    """MLX's CPU op chain mx.quantize(w, mode=...) for ``w`` already holding ``dtype`` values:
    -> (wq uint32, scales uint8)."""
    bits, group, top = FP_MODES[mode]
    w = np.asarray(w, dtype=np.float32)
    g = w.reshape(w.shape[:-1] + (-1, group))
    s = round_to(np.abs(g).max(-1) / np.float32(top), dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if mode == "nvfp4":
            sb = to_e4m3(s)
            p = round_to(E4M3_VALUES[sb.astype(np.int64)], dtype)
        else:
            n = _ceil_pow2_exponent(s)
            sb = ((n + 127) & 0xFF).astype(np.uint8)
            p = round_to(np.ldexp(np.float32(1), n).astype(np.float32), dtype)
        x = round_to(g / p[..., None], dtype)
    # nvfp4's chain multiplies by a float32 1.0 (its global-scale hook) before the table search: float32
    # distances; the e8m0 modes search in the weights' dtype.
    dist = mx.float32 if mode == "nvfp4" else dtype
    codes = (to_e4m3(x).astype(np.int64) if mode == "mxfp8" else to_e2m1(x, dist)).reshape(w.shape)
    return pack_codes(codes, bits), sb


def fp_dequantize(wq, scales, *, mode: str, dtype) -> np.ndarray:
    """mx.dequantize(wq, scales, mode=..., dtype=dtype) on the CPU stream: code * scale, both as ``dtype``,
    the product rounded to it."""
    bits, group, _ = FP_MODES[mode]
    codes = unpack_codes(np.asarray(wq), bits)
    v = fp_code_values(codes, mode).reshape(codes.shape[:-1] + (-1, group))
    p = round_to(fp_scale_values(scales, mode), dtype)[..., None]
    with np.errstate(invalid="ignore", over="ignore"):
        return round_to(v * p, dtype).reshape(codes.shape)


def _any_dequantize(wq, scales, biases, mode, bits, group_size, dtype):
    if mode == "affine":
        return dequantize(np.asarray(wq), scales, biases, bits=bits, group_size=group_size, dtype=dtype)
    return fp_dequantize(wq, scales, mode=mode, dtype=dtype)


def fuse_any(
    wq,
    scales,
    biases,
    *,
    mode="affine",
    group_size=None,
    bits=None,
    dtype=None,
    lora_a=None,
    lora_b=None,
    scale=1.0,
    requant="fresh",
    out_mode=None,
    out_bits=None,
    out_group_size=None,
    dora_magnitude=None,
):
    """Reference of :func:`reqnoise.fuse_quantized` for every mode. Returns numpy arrays: (wq, scales, biases)
    with ``biases`` None for an fp output mode; fp scales are uint8, affine ones float32 holding ``dtype``
    values. ``dtype``: the values' dtype (affine input: its scales' dtype; fp input: default bfloat16)."""
    if mode == "affine" and (out_mode in (None, "affine")):
        return fuse(
            wq,
            scales,
            biases,
            group_size=group_size,
            bits=bits,
            lora_a=lora_a,
            lora_b=lora_b,
            scale=scale,
            requant=requant,
            out_bits=out_bits,
            out_group_size=out_group_size,
            dora_magnitude=dora_magnitude,
        )
    if mode != "affine":
        bits, group_size, _ = FP_MODES[mode]
    dtype = scales.dtype if mode == "affine" else (dtype or mx.bfloat16)
    out_mode = out_mode or mode
    delta = None if lora_a is None else low_rank_delta(lora_a, lora_b, scale)
    if requant == "keep-grid":
        codes = unpack_codes(np.asarray(wq), bits)
        shape = codes.shape[:-1] + (-1, group_size)
        s = fp_scale_values(scales, mode)[..., None]
        old = fp_code_values(codes, mode).reshape(shape)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            w = (old * s).reshape(codes.shape)
            if delta is not None:
                w = w + delta
            if dora_magnitude is not None:
                w = dora_rows(w, dora_magnitude)
            top = FP_MODES[mode][2]
            x = np.clip(w.reshape(shape) / s, -top, top)
        new = to_e4m3(x).astype(np.int64) if mode == "mxfp8" else to_e2m1(x)
        keep = (x == old) | np.isnan(old) | ~np.isfinite(s) | (s == 0)
        new = np.where(keep, codes.reshape(shape), new).reshape(codes.shape)
        return pack_codes(new, bits), np.asarray(scales), None
    w = _any_dequantize(wq, scales, biases, mode, bits, group_size, dtype)
    if delta is not None:
        w = round_to(w + round_to(delta, dtype), dtype)
    if dora_magnitude is not None:
        w = dora_rows(w, dora_magnitude)
    if out_mode == "affine":
        return quantize(w, bits=out_bits or 8, group_size=out_group_size or 64, dtype=dtype)
    return (*fp_quantize(w, mode=out_mode, dtype=dtype), None)
