"""Benchmark: reqnoise.fuse_quantized vs the MLX op chain that mlx-lm's fuse runs, on the same data.

Prints one JSON object per case (and a final summary line). Timings are paired: each repetition runs the op
chain, reqnoise (fresh) and a memcpy of the packed stack back to back (A B C A B C ...; the memcpy twice: into
new arrays, as a fuse writes, and into arrays written before, the traffic alone), and the ratios are
taken within a repetition, so that load from other processes shifts both sides of a ratio alike; reported are
the medians of the per-repetition ratios and their range. Peak memory is MLX's allocator peak while the call
runs, above what was allocated before it (inputs, factors): the memory the fuse itself needs. The widths run
also reports each width's CPU time split into user mode (the kernel, MLX's own work) and system (the OS
faulting in and zeroing the outputs' new pages).

    python bench/fuse_kernel.py [--reps 3] [--quick]
"""

import argparse
import json
import os
import platform
import resource
import statistics
import time
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from reqnoise import fuse_quantized

CASES = [
    # name, shape, bits, group, dtype, ranks, paired with the op chain
    ("moe_down_proj_30b_a3b", (128, 2048, 768), 3, 64, mx.bfloat16, (2, 16), True),
    ("moe_down_proj_30b_a3b", (128, 2048, 768), 4, 64, mx.bfloat16, (2,), False),
    ("moe_down_proj_30b_a3b", (128, 2048, 768), 8, 64, mx.bfloat16, (2,), False),
    ("dense_4096", (4096, 4096), 4, 64, mx.bfloat16, (16,), True),
]
QUICK = [("moe_small", (16, 512, 768), 3, 64, mx.bfloat16, (2,), True)]
# The widths compared per weight against 3 bits, each repetition running all of them back to back.
WIDTHS = ("moe_down_proj_30b_a3b", (128, 2048, 768), (3, 4, 8), 64, mx.bfloat16, 2)
WIDTHS_QUICK = ("moe_small", (16, 512, 768), (3, 4, 8), 64, mx.bfloat16, 2)


def op_chain(wq, s, b, group, bits, a, bb, scale):
    w = mx.dequantize(wq, s, b, group_size=group, bits=bits)
    w = w + (scale * bb @ a).astype(w.dtype)
    return mx.quantize(w, group_size=group, bits=bits)


def factors(rng, lead, out_dim, in_dim, r):
    """Random LoRA factors A [..., r, in] and B [..., out, r], float32, evaluated."""
    a = mx.array((rng.standard_normal(lead + (r, in_dim)) * 0.01).astype(np.float32))
    bb = mx.array((rng.standard_normal(lead + (out_dim, r)) * 0.01).astype(np.float32))
    mx.eval(a, bb)
    return a, bb


class Run(NamedTuple):
    seconds: float
    peak_bytes: int  # above the memory live before the call
    user_s: float  # CPU time of all the process's threads in user mode during the call
    system_s: float  # ... and in the kernel (page faults: the OS zeroing each new page of an output)


def run_once(fn):
    """One evaluated call: wall time, peak memory and CPU time. Linux splits CPU time into user and system by
    sampling at the scheduler tick (4 ms at 250 Hz), so the split of one call is an estimate; the medians over
    repetitions are what the widths run reports."""
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = fn()
    mx.eval(out)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = mx.get_peak_memory() - base
    del out
    mx.clear_cache()
    return Run(dt, peak, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime)


def host_arrays(wq, s, b):
    """The packed stack as numpy arrays (the memcpy floors' sources; bfloat16 scales and biases as their bits)."""
    return [np.array(wq), np.array(s.view(mx.uint16)), np.array(b.view(mx.uint16))]


def copy_once(buffers):
    """Seconds to copy the packed stack (codes, scales, biases) once into new arrays: the memory-traffic floor
    of a fuse, which also writes new arrays (numpy asks for huge pages for them, as the kernel does)."""
    t0 = time.perf_counter()
    for x in buffers:
        x.copy()
    return time.perf_counter() - t0


def first_touch_once(buffers):
    """Seconds to allocate arrays of the packed stack's sizes and touch each 4 KiB page once, on one thread: the
    page faults alone (the OS zeroes every page a new output brings in; huge pages where numpy gets them)."""
    t0 = time.perf_counter()
    for x in buffers:
        y = np.empty(x.nbytes, np.uint8)
        y[::4096] = 1
        del y
    return time.perf_counter() - t0


def copy_warm_once(buffers, dests):
    """Seconds to copy the packed stack into arrays written before (no page faults): the traffic alone."""
    t0 = time.perf_counter()
    for x, d in zip(buffers, dests):
        np.copyto(d, x)
    return time.perf_counter() - t0


def med_range(xs, nd=1):
    return dict(median=round(statistics.median(xs), nd), min=round(min(xs), nd), max=round(max(xs), nd))


def widths_paired(case, reps, rng):
    """Seconds per weight of each width on the same weights and factors, the widths run back to back in every
    repetition (their order rotated), and the per-repetition ratios to 3 bits: a comparison that load from
    other processes shifts alike on both sides. Each fuse is followed by a copy of that width's packed stack
    into new arrays, so the same repetition also says how much of a width's time is above its memory floor
    (wider codes are more bytes to read, write and fault in, whatever the kernel computes)."""
    name, shape, widths, group, dtype, r = case
    w = mx.array((rng.standard_normal(shape) * 0.02).astype(np.float32)).astype(dtype)
    lead, out_dim, in_dim = shape[:-2], shape[-2], shape[-1]
    a, bb = factors(rng, lead, out_dim, in_dim, r)
    packed, host = {}, {}
    for bits in widths:
        packed[bits] = mx.quantize(w, group_size=group, bits=bits)
        mx.eval(*packed[bits])
        host[bits] = host_arrays(*packed[bits])
    del w
    n_weights = int(np.prod(shape))

    def fuse(bits):
        wq, s, b = packed[bits]
        return lambda: fuse_quantized(wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=2.0)

    for bits in widths:
        run_once(fuse(bits))  # warm-up
    ns = {bits: [] for bits in widths}
    user = {bits: [] for bits in widths}
    system = {bits: [] for bits in widths}
    above = {bits: [] for bits in widths}
    touch = {bits: [] for bits in widths}
    for rep in range(reps):
        for i in range(len(widths)):
            bits = widths[(rep + i) % len(widths)]
            run = run_once(fuse(bits))
            ns[bits].append(run.seconds * 1e9 / n_weights)
            user[bits].append(run.user_s * 1e9 / n_weights)
            system[bits].append(run.system_s * 1e9 / n_weights)
            touch[bits].append(first_touch_once(host[bits]) * 1e9 / n_weights)
            above[bits].append(ns[bits][-1] - copy_once(host[bits]) * 1e9 / n_weights)
    base = widths[0]
    res = dict(case=name + "_widths", shape=list(shape), group_size=group, rank=r, reps=reps)
    res["ns_per_weight"] = {str(bits): round(statistics.median(ns[bits]), 3) for bits in widths}
    res[f"ns_per_weight_vs_{base}bit"] = {
        str(bits): med_range([x / y for x, y in zip(ns[bits], ns[base])], 2) for bits in widths[1:]
    }
    # One thread's cost of faulting in (the OS zeroing) new arrays of each width's output bytes: a part of every
    # fuse that grows with the width whatever the kernel computes.
    res["first_touch_ns_per_weight"] = {str(bits): round(statistics.median(touch[bits]), 3) for bits in widths}
    # Not the target (which is end to end): the CPU time of the call, all threads, in user mode (the kernel and
    # MLX's own work) and in the OS (above all zeroing the new pages of the outputs, which grow with the width
    # whatever the kernel computes; MLX 0.32 on Linux returns buffers this large to the OS when they are freed,
    # so every call gets new pages, with or without run_once's mx.clear_cache()).
    res["cpu_ns_per_weight"] = {
        str(bits): dict(user=round(statistics.median(user[bits]), 3), system=round(statistics.median(system[bits]), 3))
        for bits in widths
    }
    res[f"user_cpu_vs_{base}bit"] = {
        str(bits): med_range([x / y for x, y in zip(user[bits], user[base])], 2) for bits in widths[1:]
    }
    # Not the target either: the part of each width's time above a copy of its own packed stack.
    res["ns_per_weight_above_copy_floor"] = {str(bits): round(statistics.median(above[bits]), 3) for bits in widths}
    res[f"above_copy_floor_vs_{base}bit"] = {
        str(bits): med_range([x / y for x, y in zip(above[bits], above[base])], 2) for bits in widths[1:]
    }
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a small case only (smoke test)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    results = []
    for name, shape, bits, group, dtype, ranks, with_chain in QUICK if args.quick else CASES:
        w = mx.array((rng.standard_normal(shape) * 0.02).astype(np.float32)).astype(dtype)
        wq, s, b = mx.quantize(w, group_size=group, bits=bits)
        mx.eval(wq, s, b)
        del w
        packed = wq.nbytes + s.nbytes + b.nbytes
        lead, out_dim, in_dim = shape[:-2], shape[-2], shape[-1]
        host = host_arrays(wq, s, b)
        warm = [x.copy() for x in host]
        n_weights = int(np.prod(shape))
        for r in ranks:
            a, bb = factors(rng, lead, out_dim, in_dim, r)

            def ours():
                return fuse_quantized(wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=2.0)

            def ours_kg():
                return fuse_quantized(
                    wq, s, b, group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=2.0, requant="keep-grid"
                )

            run_once(ours)  # warm-up: thread start, page faults of the first output allocation
            t_rn, t_ch, t_cp, t_cw, peaks, speedups, vs_copy, vs_warm = [], [], [], [], [], [], [], []
            for _ in range(args.reps):
                if with_chain:
                    t_ch.append(run_once(lambda: op_chain(wq, s, b, group, bits, a, bb, 2.0))[0])
                run = run_once(ours)
                t_rn.append(run.seconds)
                peaks.append(run.peak_bytes)
                t_cp.append(copy_once(host))
                t_cw.append(copy_warm_once(host, warm))
                if with_chain:
                    speedups.append(t_ch[-1] / t_rn[-1])
                vs_copy.append(t_rn[-1] / t_cp[-1])
                vs_warm.append(t_rn[-1] / t_cw[-1])
            t_kg = statistics.median(run_once(ours_kg)[0] for _ in range(args.reps))
            res = dict(
                case=name,
                shape=list(shape),
                bits=bits,
                group_size=group,
                dtype=str(dtype).split(".")[-1],
                rank=r,
                reps=args.reps,
                packed_bytes=packed,
                reqnoise_s=round(statistics.median(t_rn), 4),
                reqnoise_ns_per_weight=round(statistics.median(t_rn) * 1e9 / n_weights, 3),
                reqnoise_keep_grid_s=round(t_kg, 4),
                copy_floor_s=round(statistics.median(t_cp), 5),
                reqnoise_vs_copy_floor=med_range(vs_copy),
                copy_warm_s=round(statistics.median(t_cw), 5),
                reqnoise_vs_warm_copy=med_range(vs_warm),
                reqnoise_peak_extra_bytes=max(peaks),
                reqnoise_peak_over_packed=round(max(peaks) / packed, 3),
            )
            if with_chain:
                m_ch = run_once(lambda: op_chain(wq, s, b, group, bits, a, bb, 2.0)).peak_bytes
                got, chain = ours(), op_chain(wq, s, b, group, bits, a, bb, 2.0)
                res.update(
                    mlx_chain_s=round(statistics.median(t_ch), 4),
                    speedup=med_range(speedups),
                    mlx_chain_peak_extra_bytes=m_ch,
                    mlx_chain_peak_over_packed=round(m_ch / packed, 2),
                    outputs_bit_identical_to_chain=bool(mx.array_equal(got[0], chain[0]).item()),
                    packed_words_differing=float(mx.mean((got[0] != chain[0]).astype(mx.float32)).item()),
                )
                del got, chain
            results.append(res)
            print(json.dumps(res), flush=True)
    widths = widths_paired(WIDTHS_QUICK if args.quick else WIDTHS, args.reps, rng)
    print(json.dumps(widths), flush=True)
    print(
        json.dumps(
            {
                "summary": True,
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "mlx": mx.__version__,
                "load_average": os.getloadavg(),
                "min_median_speedup": min(r["speedup"]["median"] for r in results if "speedup" in r),
                "max_median_vs_copy_floor": max(r["reqnoise_vs_copy_floor"]["median"] for r in results),
                "max_median_vs_warm_copy": max(r["reqnoise_vs_warm_copy"]["median"] for r in results),
                "max_reqnoise_peak_over_packed": max(r["reqnoise_peak_over_packed"] for r in results),
                "max_median_width_vs_3bit": max(v["median"] for v in widths["ns_per_weight_vs_3bit"].values()),
            }
        )
    )


if __name__ == "__main__":
    main()
