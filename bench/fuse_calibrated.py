"""Benchmark: requant='calibrated' (fixed-grid error feedback) against keep-grid and fresh, and its cost.

Prints one JSON object per line:
- ``synthetic``: 256x512, 3-bit, group 64, rank-2 delta at RMS 0.1/0.3/1.0 quantization steps, low-rank-plus-
  outlier activations; residual/effect = ||(W_fused - W_hat - delta) X|| / ||delta X|| on HELD-OUT activations
  (same distribution, not the calibration rows), for keep-grid / fresh / calibrated; and the zero-delta check.
- ``stack``: a [128, 2048, 768] 3-bit expert stack (bfloat16 scales) with 4096 calibration tokens routed top-8
  over the experts: wall and CPU seconds of the calibrated fuse (Hessians and their factors included; the
  Hessians, built as reqnoise.fuse.calibration builds them, also on their own), its MLX allocator peak above
  the inputs against the target (packed stack + one expert's Hessian and factor), the Python heap's peak
  (tracemalloc: numpy's temporaries), and wall and CPU seconds of mlx-lm's GPTQ column loop
  (mlx_lm.quant.gptq.gptq_quantize) on the same float weights and the same tokens in the same run (its final
  packing asserts bits in {2,4,8}: the 3-bit run is timed to that assertion, i.e. the whole error-feedback
  loop). CPU seconds count every thread of the process: on a machine shared with other work they are the
  steadier measure.

    python bench/fuse_calibrated.py [--quick] [--skip-mlx-lm]
"""

import argparse
import json
import time
import tracemalloc

import mlx.core as mx
import numpy as np

from reqnoise.kernel.op import fuse_calibrated, fuse_quantized


def acts(rng, n, basis, outliers):
    x = rng.standard_normal((n, basis.shape[0])) @ basis + 0.1 * rng.standard_normal((n, basis.shape[1]))
    return (x * outliers).astype(np.float32)


def residual(wq_new, s_new, b_new, w_hat, delta, x, group, bits):
    w = mx.dequantize(wq_new, s_new, b_new, group_size=group, bits=bits)
    xt = mx.array(x).T
    return (mx.linalg.norm((w - w_hat - delta) @ xt) / mx.linalg.norm(delta @ xt)).item()


def synthetic(seed=0, out_dim=256, in_dim=512, bits=3, group=64):
    rng = np.random.default_rng(seed)
    wq, s, b = mx.quantize(
        mx.array(rng.standard_normal((out_dim, in_dim)).astype(np.float32)), group_size=group, bits=bits
    )
    w_hat = mx.dequantize(wq, s, b, group_size=group, bits=bits)
    basis = rng.standard_normal((16, in_dim))
    outliers = np.where(rng.random(in_dim) < 0.03, 8.0, 1.0)
    x_cal, x_held = acts(rng, 4 * in_dim, basis, outliers), acts(rng, 4 * in_dim, basis, outliers)
    h = mx.array(x_cal.T.astype(np.float64) @ x_cal / len(x_cal)).astype(mx.float32)
    step = float(np.mean(np.abs(np.array(s))))
    zero = fuse_quantized(wq, s, b, group_size=group, bits=bits, requant="calibrated", hessian=h)[0]
    rows = {"case": "synthetic", "shape": [out_dim, in_dim], "bits": bits, "group_size": group,
            "zero_delta_identical": bool(mx.array_equal(zero, wq).item()), "residual_over_effect": {}}  # fmt: skip
    for steps in (0.1, 0.3, 1.0):
        a = mx.array(rng.standard_normal((2, in_dim)).astype(np.float32))
        bb = mx.array(rng.standard_normal((out_dim, 2)).astype(np.float32))
        d = bb @ a
        scale = steps * step / float(np.sqrt(np.mean(np.array(d) ** 2)))
        kw = dict(group_size=group, bits=bits, lora_a=a, lora_b=bb, scale=scale)
        r = {}
        for mode in ("keep-grid", "fresh", "calibrated"):
            out = fuse_quantized(wq, s, b, requant=mode, hessian=h if mode == "calibrated" else None, **kw)
            r[mode] = round(residual(*out, w_hat, scale * d, x_held, group, bits), 4)
        rows["residual_over_effect"][f"{steps}_step"] = r
    return rows


def stack(quick=False, skip_mlx_lm=False, seed=0):
    rng = np.random.default_rng(seed)
    e, out_dim, in_dim, bits, group, tokens, k = (
        (16, 512, 768, 3, 64, 1024, 8) if quick else (128, 2048, 768, 3, 64, 4096, 8)
    )
    w = mx.array((rng.standard_normal((e, out_dim, in_dim)) * 0.02).astype(np.float32)).astype(mx.bfloat16)
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    basis = rng.standard_normal((32, in_dim))
    x = acts(rng, tokens, basis, np.where(rng.random(in_dim) < 0.03, 8.0, 1.0))
    # top-k routing of every token to k distinct experts
    routes = np.argsort(rng.random((tokens, e)), axis=1)[:, :k]
    a = mx.array((rng.standard_normal((e, 2, in_dim)) * 0.02).astype(np.float32))
    bb = mx.array((rng.standard_normal((e, out_dim, 2)) * 0.02).astype(np.float32))
    mx.eval(wq, s, b, a, bb)
    rows_of = [x[(routes == i).any(1)] for i in range(e)]

    hessian_seconds = [0.0]

    def hessian(e0, e1):
        t = time.perf_counter()
        hs = [mx.array((r.T.astype(np.float64) @ r / len(r)).astype(np.float32)) for r in rows_of[e0:e1]]
        hessian_seconds[0] += time.perf_counter() - t
        return hs

    mx.reset_peak_memory()
    base = mx.get_active_memory()
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fuse_calibrated(wq, s, b, group_size=group, bits=bits, hessian=hessian, lora_a=a, lora_b=bb, scale=1.0)
    mx.eval(out[0])
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    heap_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak = mx.get_peak_memory() - base
    packed = wq.nbytes + s.nbytes + b.nbytes
    one_expert = 2 * in_dim * in_dim * 4  # its Hessian and factor, float32
    res = {"case": "stack", "shape": [e, out_dim, in_dim], "bits": bits, "calib_tokens": tokens, "top_k": k,
           "tokens_per_expert_median": int(np.median([len(r) for r in rows_of])),
           "calibrated_seconds": round(secs, 2), "calibrated_cpu_seconds": round(cpu, 2),
           "of_which_hessians_seconds": round(hessian_seconds[0], 2),
           "calibrated_extra_peak_mib": round(peak / 2**20, 1),
           "python_heap_peak_mib": round(heap_peak / 2**20, 1),
           "packed_stack_mib": round(packed / 2**20, 1),
           "one_expert_hessian_and_factor_mib": round(one_expert / 2**20, 1),
           "extra_peak_within_target": bool(peak <= packed + one_expert),
           "fallback_experts": len(out[3])}  # fmt: skip
    if not skip_mlx_lm:
        res["mlx_lm_gptq_seconds"], res["mlx_lm_gptq_cpu_seconds"] = mlx_lm_gptq_seconds(w, x, routes, bits, group)
        res["mlx_lm_over_calibrated"] = round(res["mlx_lm_gptq_seconds"] / secs, 2)
    return res


def mlx_lm_gptq_seconds(w, x, routes, bits, group):
    """mlx-lm's own GPTQ on the same float stack and tokens (its Hessian is shared by every expert)."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.quant.gptq import gptq_quantize

    e, out_dim, in_dim = w.shape

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = SwitchLinear(in_dim, out_dim, e)
            self.proj.weight = w.astype(mx.float32)

        def __call__(self, batch):
            xs, idx = batch[..., :-1], batch[..., -1:].astype(mx.uint32)
            return self.proj(xs[:, None, None, :], idx)

    # one routed (token, expert) pair per row: the tokens' rows with their expert id appended
    tok = np.repeat(np.arange(len(x)), routes.shape[1])
    data = mx.array(np.concatenate([x[tok], routes.reshape(-1, 1).astype(np.float32)], axis=1))
    model = One()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        gptq_quantize(model, data, bits, group, bits, group, batch_size=len(data))
    except AssertionError:
        pass  # 3 bits: its final packer supports 2/4/8 only; the column loop has run
    return round(time.perf_counter() - t0, 2), round(time.process_time() - c0, 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-mlx-lm", action="store_true")
    args = ap.parse_args()
    print(json.dumps(synthetic()), flush=True)
    print(json.dumps(stack(args.quick, args.skip_mlx_lm)), flush=True)


if __name__ == "__main__":
    main()
