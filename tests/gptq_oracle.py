"""An independent numpy implementation of fixed-grid GPTQ (the calibrated fuse) for small cases.

Written from the algorithm (Frantar et al. 2022, Alg. 1: lazy-batch blocks, Cholesky factor of the inverse
Hessian), onto each group's stored grid (affine, or an fp mode's scale and code table), with the float32 order of
operations the kernel documents: target = q*s + b or value(q)*s (+ delta summed over the rank in order), per
column e = (w_i - decode(code)) / U[i, i], in-block updates w[j] -= e * U[i, j], and per block one sum
acc[j] += e_i * U[i, j] over the block's columns in order, subtracted once. numpy's elementwise float32 ops round
each operation, so this is bit-exact by design.
"""

import numpy as np

F = np.float32


def unpack(wq: np.ndarray, bits: int) -> np.ndarray:
    """uint32 [..., in*bits/32] -> codes [..., in] (LSB-first bitstream)."""
    by = wq.view(np.uint8)
    bitarr = np.unpackbits(by, axis=-1, bitorder="little")
    n = bitarr.shape[-1] // bits
    bitarr = bitarr.reshape(bitarr.shape[:-1] + (n, bits))
    return (bitarr * (1 << np.arange(bits))).sum(-1).astype(np.uint32)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [..., in] -> uint32 [..., in*bits/32]."""
    bitarr = ((codes[..., None] >> np.arange(bits)) & 1).astype(np.uint8)
    bitarr = bitarr.reshape(codes.shape[:-1] + (-1,))
    return np.packbits(bitarr, axis=-1, bitorder="little").view(np.uint32)


def _encode(x, scale, bias, n_bins, old):
    if scale == 0:
        return F(old)
    v = (F(x) - bias) / scale
    return F(np.rint(np.clip(v, F(0), F(n_bins))))


class AffineGrid:
    """The stored affine grid: code = clip(rint((x - b) / s), 0, 2^bits - 1), value = code * s + b (float32)."""

    def __init__(self, scales, biases, group_size, bits):
        self.sc = np.repeat(scales.astype(F), group_size, axis=1)
        self.bi = np.repeat(biases.astype(F), group_size, axis=1)
        self.n_bins = (1 << bits) - 1

    def values(self, q):
        return q * self.sc + self.bi

    def encode(self, x, r, i, old):
        return _encode(x, self.sc[r, i], self.bi[r, i], self.n_bins, old)

    def error(self, x, r, i, c):
        return x - (c * self.sc[r, i] + self.bi[r, i])


class FpGrid:
    """A stored fp grid (mxfp4 / nvfp4 / mxfp8): the group's scale byte's value (e8m0 or e4m3) times the E2M1 or
    E4M3 code's value. Keep-grid's rules (docs/mlx-fp-formats.md): x / scale clipped to the largest code, the
    old code kept when that equals its value or the old code is NaN, else the nearest code (E2M1: ties to the
    smaller magnitude; E4M3: ties to even); a zero or non-finite scale keeps every code. A code whose value is not
    finite passes no error on. Code tables and encoders: reqnoise.kernel.reference (tested against MLX)."""

    def __init__(self, scales, group_size, mode):
        from reqnoise.kernel import reference as R

        self.R, self.mode = R, mode
        self.sc = np.repeat(R.fp_scale_values(scales, mode), group_size, axis=1)
        self.lim = F(448.0 if mode == "mxfp8" else 6.0)

    def value(self, c):
        return self.R.fp_code_values(np.asarray(c, dtype=np.int64), self.mode)

    def values(self, q):
        return self.value(q.astype(np.int64)) * self.sc

    def encode(self, x, r, i, old):
        s = self.sc[r, i]
        if s == 0 or not np.isfinite(s):
            return F(old)
        v = np.clip(F(x) / s, -self.lim, self.lim)
        ov = self.value(int(old))
        if v == ov or np.isnan(ov):
            return F(old)
        if self.mode == "mxfp8":
            return F(self.R.to_e4m3(v))
        return F(self.R.to_e2m1(v)[()])

    def error(self, x, r, i, c):
        with np.errstate(invalid="ignore", over="ignore"):
            v = self.value(int(c)) * self.sc[r, i]
        return x - v if np.isfinite(v) else F(0)


def gptq_fixed_grid(
    codes, scales, biases, group_size, bits, u, delta_a=None, delta_b=None, scale=1.0, block=128, mode="affine"
):
    """One matrix: codes [out, in] uint32, scales/biases [out, in/gs] float32 (affine) or scales uint8 and biases
    None (mode mxfp4/nvfp4/mxfp8), u [in, in] float32 upper factor (None: no error feedback, i.e. keep-grid);
    delta = scale * delta_b @ delta_a ([out, r] @ [r, in]). Returns the new codes [out, in]."""
    out_dim, in_dim = codes.shape
    q = codes.astype(F)
    grid = AffineGrid(scales, biases, group_size, bits) if mode == "affine" else FpGrid(scales, group_size, mode)
    with np.errstate(invalid="ignore", over="ignore"):
        w = grid.values(q)
    if delta_a is not None:
        a = delta_a.astype(F)
        sb = F(scale) * delta_b.astype(F)
        d = sb[:, :1] * a[0]
        for k in range(1, a.shape[0]):
            d = d + sb[:, k : k + 1] * a[k]
        w = w + d
    new = np.empty_like(q)
    for r in range(out_dim):
        wr = w[r].copy()
        if u is None:
            new[r] = [grid.encode(wr[i], r, i, q[r, i]) for i in range(in_dim)]
            continue
        for b0 in range(0, in_dim, block):
            b1 = min(b0 + block, in_dim)
            err = np.zeros(b1 - b0, dtype=F)
            for i in range(b0, b1):
                c = grid.encode(wr[i], r, i, q[r, i])
                new[r, i] = c
                e = grid.error(wr[i], r, i, c) / u[i, i]
                err[i - b0] = e
                wr[i + 1 : b1] = wr[i + 1 : b1] - e * u[i, i + 1 : b1]
            acc = np.zeros(in_dim - b1, dtype=F)
            for i in range(b0, b1):
                acc = acc + err[i - b0] * u[i, b1:]
            wr[b1:] = wr[b1:] - acc
    return new.astype(np.uint32)
