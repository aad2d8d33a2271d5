"""Benchmark every quantization mode: reqnoise.fuse_quantized vs MLX's op chain (mlx-lm's fuse) on one stack.

For each mode (affine 3-bit g64 as the baseline, mxfp4, nvfp4, mxfp8) on an ``[E, 2048, 768]`` bfloat16-valued
stack with a rank-16 LoRA delta, in the same run: seconds of the kernel and of the chain, the chain's code
mismatch rate against the kernel (realistic, not exactly representable deltas), the extra peak memory of each
(MLX's allocator peak above what was live before the call) relative to the packed stack, and the zero-delta
round trip ``quantize(dequantize(q))``'s fraction of changed words and scales. One JSON object per mode.

Kernel and chain are run alternately ``--reps`` times; the seconds are medians, ``speedup`` is the median of the
paired ratios (wall clock) and ``speedup_cpu`` the same for the process's CPU time (all threads), which a shared
machine's other tenants disturb much less than the wall clock. A last object compares the modes' kernels per
weight: each repetition runs every selected mode back to back, and the ratio to affine's time is taken within the
repetition (medians and ranges over ``--reps``; every mode fuses the same number of weights).

    python bench/fuse_modes.py [--experts 128] [--reps 3] [--modes affine mxfp8]
"""

import argparse
import json
import time

import mlx.core as mx
import numpy as np

from reqnoise import fuse_quantized

MODES = [("affine", dict(bits=3, group_size=64)), ("mxfp4", {}), ("nvfp4", {}), ("mxfp8", {})]


def _quantize(w, mode, kw):
    out = mx.quantize(w, mode=mode, **kw)
    return out[0], out[1], (out[2] if len(out) > 2 else None)


def chain(wq, s, b, mode, kw, a, bb, scale):
    w = mx.dequantize(wq, s, b, mode=mode, **kw)
    w = w + (scale * bb @ a).astype(w.dtype)
    return _quantize(w, mode, kw)


def timed(fn):
    """(wall seconds, process CPU seconds, extra peak bytes) of one evaluated call, from an empty cache."""
    mx.synchronize()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    mx.eval(out)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = mx.get_peak_memory() - base
    del out
    return wall, cpu, peak


def paired(kernel, chain, reps):
    """Kernel and chain alternated ``reps`` times: medians of each and of the paired ratios."""
    runs = [(timed(kernel), timed(chain)) for _ in range(reps)]
    k = np.array([r[0] for r in runs])
    c = np.array([r[1] for r in runs])
    return dict(
        kernel_s=float(np.median(k[:, 0])),
        chain_s=float(np.median(c[:, 0])),
        speedup=float(np.median(c[:, 0] / k[:, 0])),
        speedup_range=[float(np.min(c[:, 0] / k[:, 0])), float(np.max(c[:, 0] / k[:, 0]))],
        kernel_cpu_s=float(np.median(k[:, 1])),
        chain_cpu_s=float(np.median(c[:, 1])),
        speedup_cpu=float(np.median(c[:, 1] / k[:, 1])),
        kernel_peak=float(k[:, 2].max()),
        chain_peak=float(c[:, 2].max()),
    )


def nbytes(*xs):
    return sum(x.nbytes for x in xs if x is not None)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=[m for m, _ in MODES], choices=[m for m, _ in MODES])
    args = p.parse_args()
    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(0)
    shape = (args.experts, 2048, 768)
    w = mx.array((rng.standard_normal(shape) * 0.02).astype(np.float32)).astype(mx.bfloat16)
    a = mx.array((rng.standard_normal((shape[0], args.rank, shape[2])) * 0.01).astype(np.float32))
    bb = mx.array((rng.standard_normal((shape[0], shape[1], args.rank)) * 0.01).astype(np.float32))
    mx.eval(w, a, bb)
    fused = {}  # mode: a call of the kernel on that mode's quantized stack
    for mode, kw in [(m, kw) for m, kw in MODES if m in args.modes]:
        wq, s, b = _quantize(w, mode, kw)
        mx.eval(wq, s, b)
        extra = {} if mode == "affine" else {"mode": mode}
        fused[mode] = lambda wq=wq, s=s, b=b, kw=kw, extra=extra: fuse_quantized(
            wq, s, b, lora_a=a, lora_b=bb, scale=2.0, **kw, **extra
        )
        packed = nbytes(wq, s, b)
        t = paired(fused[mode], lambda: chain(wq, s, b, mode, kw, a, bb, 2.0), args.reps)
        got = fused[mode]()
        want = chain(wq, s, b, mode, kw, a, bb, 2.0)
        mism = float(mx.mean(got[0] != want[0]).item())
        rt = _quantize(mx.dequantize(wq, s, b, mode=mode, **kw), mode, kw)
        words = float(mx.mean(rt[0] != wq).item())
        scales = float(mx.mean(rt[1] != s).item())
        print(
            json.dumps(
                dict(
                    mode=mode,
                    shape=list(shape),
                    rank=args.rank,
                    reps=args.reps,
                    kernel_s=round(t["kernel_s"], 4),
                    chain_s=round(t["chain_s"], 4),
                    speedup=round(t["speedup"], 2),
                    speedup_range=[round(x, 2) for x in t["speedup_range"]],
                    kernel_cpu_s=round(t["kernel_cpu_s"], 4),
                    chain_cpu_s=round(t["chain_cpu_s"], 4),
                    speedup_cpu=round(t["speedup_cpu"], 2),
                    word_mismatch_vs_chain=mism,
                    packed_mib=round(packed / 2**20, 2),
                    kernel_extra_peak_x_packed=round(t["kernel_peak"] / packed, 3),
                    chain_extra_peak_x_packed=round(t["chain_peak"] / packed, 3),
                    zero_delta_roundtrip_words_changed=words,
                    zero_delta_roundtrip_scales_changed=scales,
                )
            ),
            flush=True,
        )
    if "affine" in fused and len(fused) > 1:
        print(json.dumps(per_weight_vs_affine(fused, args.reps, shape, args.rank)), flush=True)


def per_weight_vs_affine(fused, reps, shape, rank):
    """Every mode's kernel back to back per repetition; ratios to affine's wall and CPU time within each."""
    runs = [{m: timed(f)[:2] for m, f in fused.items()} for _ in range(reps)]

    def ratios(m, i):
        r = [run[m][i] / run["affine"][i] for run in runs]
        return dict(median=round(float(np.median(r)), 3), min=round(min(r), 3), max=round(max(r), 3))

    return dict(
        case="modes_per_weight",
        shape=list(shape),
        rank=rank,
        reps=reps,
        kernel_s={m: round(float(np.median([run[m][0] for run in runs])), 4) for m in fused},
        vs_affine={m: ratios(m, 0) for m in fused if m != "affine"},
        cpu_vs_affine={m: ratios(m, 1) for m in fused if m != "affine"},
    )


if __name__ == "__main__":
    main()
