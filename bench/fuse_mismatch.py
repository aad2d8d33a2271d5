"""Bench: how often `fuse_quantized(requant="fresh")` differs from MLX's own op chain and from mlx-lm's fuse.

For every dtype, width and group size, one dense layer (N(0, 0.02) weights, quantized by MLX) gets a LoRA delta
from random normal factors, rescaled so that the dense delta's RMS is a given fraction of the layer's mean
quantization step (|scale|). Three fuses of the same data are compared:

- ``reqnoise``: ``reqnoise.fuse_quantized(..., requant="fresh")``;
- ``mlx_ops``: ``mx.dequantize`` -> ``+ (scale * B @ A).astype(dtype)`` -> ``mx.quantize``, CPU stream;
- ``mlx_lm``: mlx-lm's own ``LoRALinear.fuse()`` on a ``QuantizedLinear`` (its factors stored transposed, as
  mlx-lm trains them), CPU stream.

Per case it prints the share of codes, scales and biases that differ. Random factors make ``B @ A`` inexact in
float32, so a different summation order can move a value by an ulp and, rarely, a code across a rounding
boundary. The ``dyadic`` rows use factors that are small multiples of 2^-6 and a power-of-two scale, so every
partial sum is exact and the shares must be 0.

    python bench/fuse_mismatch.py [--rows 2048] [--cols 1024] [--quick]

Prints one JSON object: the settings, every case, and a summary (largest share per dtype and width).
"""

import argparse
import itertools
import json
import platform
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.lora import LoRALinear

from reqnoise import fuse_quantized
from reqnoise.kernel.reference import unpack_codes

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
LORA_SCALE = 2.0


def random_factors(rng, rows, cols, rank, target_rms):
    """float32 A [rank, cols], B [rows, rank] with RMS(LORA_SCALE * B @ A) = target_rms (float64 numpy)."""
    a = rng.standard_normal((rank, cols)).astype(np.float32)
    b = rng.standard_normal((rows, rank)).astype(np.float32)
    rms = np.sqrt(np.mean((LORA_SCALE * b.astype(np.float64) @ a.astype(np.float64)) ** 2))
    return a, (b * np.float32(target_rms / rms)).astype(np.float32), LORA_SCALE


def dyadic_factors(rng, rows, cols, rank, target_rms):
    """Factors in {-8..8}/64 and a power-of-two scale near target_rms: every product and sum is exact."""
    a = (rng.integers(-8, 9, (rank, cols)) / 64).astype(np.float32)
    b = (rng.integers(-8, 9, (rows, rank)) / 64).astype(np.float32)
    rms = np.sqrt(np.mean((b.astype(np.float64) @ a.astype(np.float64)) ** 2))
    return a, b, float(2.0 ** np.round(np.log2(target_rms / rms)))


def mlx_ops(wq, s, b, group, bits, a, bb, scale):
    w = mx.dequantize(wq, s, b, group_size=group, bits=bits)
    w = w + (scale * bb @ a).astype(w.dtype)
    return mx.quantize(w, group_size=group, bits=bits)


def mlx_lm_fuse(wq, s, b, group, bits, a, bb, scale):
    rows, cols = bb.shape[0], a.shape[1]
    q = nn.QuantizedLinear(cols, rows, bias=False, group_size=group, bits=bits)
    q.weight, q.scales, q.biases = wq, s, b
    lora = LoRALinear.from_base(q, r=a.shape[0], scale=scale)
    lora.lora_a, lora.lora_b = a.T, bb.T  # mlx-lm's layout: lora_a [in, r], lora_b [r, out]
    fused = lora.fuse()
    return fused.weight, fused.scales, fused.biases


def shares(x, y, bits):
    """Share of codes, scales and biases that differ between two (wq, scales, biases)."""
    cx, cy = unpack_codes(np.array(x[0]), bits), unpack_codes(np.array(y[0]), bits)
    out = {"codes": float(np.mean(cx != cy))}
    for name, u, v in zip(("scales", "biases"), x[1:], y[1:]):
        out[name] = float(np.mean(np.array(u.astype(mx.float32)) != np.array(v.astype(mx.float32))))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--steps", type=float, nargs="+", default=[0.1, 1.0], help="delta RMS in quantization steps")
    ap.add_argument("--quick", action="store_true", help="256 x 512, rank 8, one delta size (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.cols, args.ranks, args.steps = 256, 512, [8], [0.5]
    mx.set_default_device(mx.cpu)
    t0 = time.perf_counter()
    cases = []
    for (dname, dtype), bits, group in itertools.product(DTYPES.items(), BITS, GROUPS):
        rng = np.random.default_rng([bits, group, len(cases)])
        w = mx.array((rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)).astype(dtype)
        wq, s, b = mx.quantize(w, group_size=group, bits=bits)
        step = float(np.mean(np.abs(np.array(s.astype(mx.float32)))))
        for kind, rank, steps in [("random", r, k) for r in args.ranks for k in args.steps] + [
            ("dyadic", max(args.ranks), max(args.steps))
        ]:
            make = random_factors if kind == "random" else dyadic_factors
            a_np, b_np, scale = make(rng, args.rows, args.cols, rank, steps * step)
            a, bb = mx.array(a_np), mx.array(b_np)
            ours = fuse_quantized(wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=scale)
            ops = mlx_ops(wq, s, b, group, bits, a, bb, scale)
            lm = mlx_lm_fuse(wq, s, b, group, bits, a, bb, scale)
            mx.eval(ours, ops, lm)
            delta_rms = np.sqrt(np.mean((scale * b_np.astype(np.float64) @ a_np.astype(np.float64)) ** 2))
            cases.append(
                {
                    "dtype": dname,
                    "bits": bits,
                    "group_size": group,
                    "factors": kind,
                    "rank": rank,
                    "delta_rms_steps": round(float(delta_rms / step), 3),
                    "reqnoise_vs_mlx_ops": shares(ours, ops, bits),
                    "reqnoise_vs_mlx_lm": shares(ours, lm, bits),
                    "mlx_ops_vs_mlx_lm": shares(ops, lm, bits),
                }
            )
    summary = {}
    for dname, bits in itertools.product(DTYPES, BITS):
        rows = [c for c in cases if c["dtype"] == dname and c["bits"] == bits]
        entry = {}
        for kind in ("random", "dyadic"):
            sel = [c for c in rows if c["factors"] == kind]
            entry[kind] = {
                pair: {what: max(c[pair][what] for c in sel) for what in ("codes", "scales", "biases")}
                for pair in ("reqnoise_vs_mlx_ops", "reqnoise_vs_mlx_lm")
            }
        summary[f"{dname} {bits}-bit"] = entry
    print(
        json.dumps(
            {
                "bench": "fuse_mismatch",
                "what": "share of codes/scales/biases that differ (max over group sizes, ranks, delta sizes)",
                "layer": [args.rows, args.cols],
                "ranks": args.ranks,
                "delta_rms_steps": args.steps,
                "weights": "N(0, 0.02), quantized by mx.quantize",
                "stream": "cpu",
                "mlx": mx.__version__,
                "machine": platform.machine(),
                "seconds": round(time.perf_counter() - t0, 1),
                "summary": summary,
                "cases": cases,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
