"""An independent numpy implementation of fixed-grid GPTQ (the calibrated fuse) for small cases.

Written from the algorithm (Frantar et al. 2022, Alg. 1: lazy-batch blocks, Cholesky factor of the inverse
Hessian), onto each group's stored affine grid, with the float32 order of operations the kernel documents:
target = q*s + b (+ delta summed over the rank in order), per column e = (w_i - decode(code)) / U[i, i],
in-block updates w[j] -= e * U[i, j], and per block one sum acc[j] += e_i * U[i, j] over the block's columns in
order, subtracted once. numpy's elementwise float32 ops round each operation, so this is bit-exact by design.
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


def gptq_fixed_grid(codes, scales, biases, group_size, bits, u, delta_a=None, delta_b=None, scale=1.0, block=128):
    """One matrix: codes [out, in] uint32, scales/biases [out, in/gs] float32, u [in, in] float32 upper factor
    (None: no error feedback, i.e. keep-grid); delta = scale * delta_b @ delta_a ([out, r] @ [r, in]).
    Returns the new codes [out, in]."""
    out_dim, in_dim = codes.shape
    n_bins = (1 << bits) - 1
    q = codes.astype(F)
    sc = np.repeat(scales.astype(F), group_size, axis=1)
    bi = np.repeat(biases.astype(F), group_size, axis=1)
    w = q * sc + bi
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
            new[r] = [_encode(wr[i], sc[r, i], bi[r, i], n_bins, q[r, i]) for i in range(in_dim)]
            continue
        for b0 in range(0, in_dim, block):
            b1 = min(b0 + block, in_dim)
            err = np.zeros(b1 - b0, dtype=F)
            for i in range(b0, b1):
                c = _encode(wr[i], sc[r, i], bi[r, i], n_bins, q[r, i])
                new[r, i] = c
                e = (wr[i] - (c * sc[r, i] + bi[r, i])) / u[i, i]
                err[i - b0] = e
                wr[i + 1 : b1] = wr[i + 1 : b1] - e * u[i, i + 1 : b1]
            acc = np.zeros(in_dim - b1, dtype=F)
            for i in range(b0, b1):
                acc = acc + err[i - b0] * u[i, b1:]
            wr[b1:] = wr[b1:] - acc
    return new.astype(np.uint32)
