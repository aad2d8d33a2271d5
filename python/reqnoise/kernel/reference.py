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
