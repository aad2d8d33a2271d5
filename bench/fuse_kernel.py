"""Benchmark: reqnoise.fuse_quantized vs the MLX op chain that mlx-lm's fuse runs, on the same data.

Prints one JSON object per case (and a final summary line). Peak memory is MLX's allocator peak while the
call runs, above what was allocated before it (inputs, factors): the memory the fuse itself needs.

    python bench/fuse_kernel.py [--reps 3] [--quick]
"""

import argparse
import json
import platform
import statistics
import time

import mlx.core as mx
import numpy as np

from reqnoise import fuse_quantized

CASES = [
    # name, shape, bits, group, dtype, ranks
    ("moe_down_proj_30b_a3b", (128, 2048, 768), 3, 64, mx.bfloat16, (2, 16)),
    ("dense_4096", (4096, 4096), 4, 64, mx.bfloat16, (16,)),
]
QUICK = [("moe_small", (16, 512, 768), 3, 64, mx.bfloat16, (2,))]


def op_chain(wq, s, b, group, bits, a, bb, scale):
    w = mx.dequantize(wq, s, b, group_size=group, bits=bits)
    w = w + (scale * bb @ a).astype(w.dtype)
    return mx.quantize(w, group_size=group, bits=bits)


def measure(fn, reps):
    times, peaks = [], []
    for _ in range(reps):
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        out = fn()
        mx.eval(out)
        times.append(time.perf_counter() - t0)
        peaks.append(mx.get_peak_memory() - base)
        del out
        mx.clear_cache()
    return statistics.median(times), max(peaks)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chain-reps", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="a small case only (smoke test)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    results = []
    for name, shape, bits, group, dtype, ranks in QUICK if args.quick else CASES:
        w = mx.array((rng.standard_normal(shape) * 0.02).astype(np.float32)).astype(dtype)
        wq, s, b = mx.quantize(w, group_size=group, bits=bits)
        mx.eval(wq, s, b)
        del w
        packed = wq.nbytes + s.nbytes + b.nbytes
        lead, out_dim, in_dim = shape[:-2], shape[-2], shape[-1]
        arrs = [np.array(wq), np.array(s.view(mx.uint16))]
        t0 = time.perf_counter()
        for x in arrs:
            x.copy()
        t0b = time.perf_counter()
        copy_s = (t0b - t0) * packed / sum(x.nbytes for x in arrs)
        for r in ranks:
            a = mx.array((rng.standard_normal(lead + (r, in_dim)) * 0.01).astype(np.float32))
            bb = mx.array((rng.standard_normal(lead + (out_dim, r)) * 0.01).astype(np.float32))
            mx.eval(a, bb)
            t_rn, m_rn = measure(
                lambda: fuse_quantized(wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=2.0), args.reps
            )
            t_kg, m_kg = measure(
                lambda: fuse_quantized(
                    wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=2.0, requant="keep-grid"
                ),
                args.reps,
            )
            t_ch, m_ch = measure(lambda: op_chain(wq, s, b, group, bits, a, bb, 2.0), args.chain_reps)
            ours = fuse_quantized(wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=2.0)
            chain = op_chain(wq, s, b, group, bits, a, bb, 2.0)
            codes_equal = bool(mx.array_equal(ours[0], chain[0]).item())
            words_differ = float(mx.mean((ours[0] != chain[0]).astype(mx.float32)).item())
            res = dict(
                case=name,
                shape=list(shape),
                bits=bits,
                group_size=group,
                dtype=str(dtype).split(".")[-1],
                rank=r,
                packed_bytes=packed,
                copy_floor_s=round(copy_s, 5),
                reqnoise_s=round(t_rn, 4),
                reqnoise_keep_grid_s=round(t_kg, 4),
                mlx_chain_s=round(t_ch, 4),
                speedup=round(t_ch / t_rn, 1),
                reqnoise_vs_copy_floor=round(t_rn / copy_s, 1),
                reqnoise_peak_extra_bytes=m_rn,
                mlx_chain_peak_extra_bytes=m_ch,
                reqnoise_peak_over_packed=round(m_rn / packed, 3),
                mlx_chain_peak_over_packed=round(m_ch / packed, 2),
                outputs_bit_identical_to_chain=codes_equal,
                packed_words_differing=words_differ,
            )
            results.append(res)
            print(json.dumps(res), flush=True)
            del ours, chain
    print(
        json.dumps(
            {
                "summary": True,
                "machine": platform.machine(),
                "cpu_count": __import__("os").cpu_count(),
                "mlx": mx.__version__,
                "min_speedup": min(r["speedup"] for r in results),
                "max_reqnoise_peak_over_packed": max(r["reqnoise_peak_over_packed"] for r in results),
            }
        )
    )


if __name__ == "__main__":
    main()
