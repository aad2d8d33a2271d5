"""``fuse_quantized``: dequantize -> add a low-rank delta -> requantize, natively, on MLX quantized weights
(affine, mxfp4, nvfp4, mxfp8)."""

import os

import mlx.core as mx
import numpy as np

from reqnoise import _core  # noqa: F401  (mlx.core must be imported first: shared nanobind domain)
from reqnoise.kernel.formats import KERNEL_REQUANTS, MODES, mode_params
from reqnoise.kernel.quant_format import FLOAT_DTYPES, all_finite, validate_quantized

# Outputs of one chunk of experts are at most this many bytes before the chunk is evaluated and written
# into the stacked result; the scratch inside the kernel is one row per thread regardless.
CHUNK_BYTES = int(os.environ.get("REQNOISE_CHUNK_BYTES", 256 << 20))


def _check_factor(x, name, expected, what):
    if not isinstance(x, mx.array):
        raise TypeError(f"{name} must be an mx.array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(x.shape)}")


def _check_finite(x, name):
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or Inf values")


def _validate(
    wq,
    scales,
    biases,
    group_size,
    bits,
    lora_a,
    lora_b,
    scale,
    requant,
    out_bits,
    out_group_size,
    dora_magnitude,
    experts_per_chunk,
    mode="affine",
    out_mode=None,
    dtype=None,
):
    bits, group_size = mode_params(mode, bits, group_size, "input")
    lead, in_dim = validate_quantized(wq, scales, biases, bits=bits, group_size=group_size, mode=mode)
    if requant not in KERNEL_REQUANTS:
        raise ValueError(f"requant must be one of {KERNEL_REQUANTS}, got {requant!r}")
    om = out_mode or mode
    if requant in ("keep-grid", "calibrated") and (
        out_bits not in (None, bits) or out_group_size not in (None, group_size) or om != mode
    ):
        raise ValueError(
            "out_bits/out_group_size/out_mode re-quantize at another width or mode and need requant='fresh'; "
            f"{requant} keeps the original grid"
        )
    if MODES[om].has_biases:
        # an affine output keeps the input's width and group size unless told (from an fp mode: 8 bits, 64)
        ob = out_bits or (bits if om == mode else 8)
        og = out_group_size or (group_size if om == mode else 64)
    else:
        ob, og = out_bits, out_group_size
    ob, og = mode_params(om, ob, og, "output")
    if in_dim % og:
        raise ValueError(f"out_group_size {og} does not divide the input width {in_dim}")
    if dtype is not None:
        if MODES[mode].has_biases:
            if dtype != scales.dtype:
                raise ValueError(f"dtype {dtype} differs from the affine scales' dtype {scales.dtype}")
        elif dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must be given together (both None means a zero delta)")
    batch = lead[:-1]
    out_dim = lead[-1]
    if lora_a is not None:
        if not isinstance(lora_a, mx.array) or lora_a.ndim != wq.ndim:
            raise ValueError(
                f"lora_a must be {'[E, r, in]' if batch else '[r, in]'} for wq of shape "
                f"{tuple(wq.shape)}, got {getattr(lora_a, 'shape', type(lora_a).__name__)}"
            )
        r = lora_a.shape[-2]
        if r < 1:
            raise ValueError(f"lora_a has rank 0 (shape {tuple(lora_a.shape)}); pass None for a zero delta")
        _check_factor(lora_a, "lora_a", batch + (r, in_dim), f"[..., r, in] with in={in_dim}")
        _check_factor(lora_b, "lora_b", batch + (out_dim, r), f"[..., out, r] with out={out_dim}, r={r}")
        _check_finite(lora_a, "lora_a")
        _check_finite(lora_b, "lora_b")
    if not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if dora_magnitude is not None:
        _check_factor(dora_magnitude, "dora_magnitude", lead, "one magnitude per output row")
        _check_finite(dora_magnitude, "dora_magnitude")
    if experts_per_chunk is not None and (not isinstance(experts_per_chunk, int) or experts_per_chunk < 1):
        raise ValueError(f"experts_per_chunk must be a positive integer or None, got {experts_per_chunk!r}")
    return in_dim, bits, group_size, om, ob, og


def _default_chunk(n_experts, out_dim, in_dim, out_bits, out_group_size, itemsize, n_scale_arrays=2):
    per_expert = out_dim * (in_dim * out_bits // 8 + n_scale_arrays * (in_dim // out_group_size) * itemsize)
    return max(1, min(n_experts, CHUNK_BYTES // max(per_expert, 1)))


DEFAULT_DAMPING = 0.01
DEFAULT_BLOCK = 128


def inverse_hessian_factor(h, damping=DEFAULT_DAMPING):
    """GPTQ's Cholesky formulation: U, upper triangular, with ``U^T U = (H + damping * mean(diag H) * I)^-1``.

    ``h``: ``[in, in]`` float (mx.array or numpy; the upper triangle is read). Returns float32 ``U``
    ``[in, in]`` as an mx.array (lower triangle zero), or None when H has no positive diagonal or no factor
    exists even with 10x and 100x the damping. Native and single-threaded, so the bytes do not depend on any
    thread count: float32 arithmetic, float64 only for a Hessian whose float32 factorisation fails (LAPACK
    through numpy spent most of its time in OpenBLAS's thread spinning on a loaded 2-core machine).
    """
    if not isinstance(h, mx.array):
        h = mx.array(np.asarray(h, dtype=np.float32))
    return _core.inverse_hessian_factor(h, float(damping))[0]


def _hessian_source(hessian, n_experts, in_dim, stacked):
    if hessian is None:
        raise ValueError("requant='calibrated' needs hessian= (X^T X / n of the module's calibration inputs)")
    if callable(hessian):
        return hessian
    if not isinstance(hessian, mx.array) or hessian.ndim not in (2, 3):
        raise ValueError(f"hessian must be [in, in], [E, in, in] or a callable, got {type(hessian).__name__}")
    want = (in_dim, in_dim) if hessian.ndim == 2 else (n_experts, in_dim, in_dim)
    if hessian.ndim == 3 and not stacked:
        want = (1, in_dim, in_dim)
    if tuple(hessian.shape) != want:
        raise ValueError(f"hessian must have shape {want} for in={in_dim}, got {tuple(hessian.shape)}")
    if hessian.ndim == 2:
        return lambda e0, e1: [hessian] * (e1 - e0)
    return lambda e0, e1: [hessian[e] for e in range(e0, e1)]


def fuse_calibrated(
    wq,
    scales,
    biases=None,
    *,
    group_size=None,
    bits=None,
    hessian,
    lora_a=None,
    lora_b=None,
    scale=1.0,
    dora_magnitude=None,
    experts_per_chunk=None,
    num_threads=None,
    damping=DEFAULT_DAMPING,
    block=DEFAULT_BLOCK,
    mode="affine",
):
    """``fuse_quantized(..., requant="calibrated")`` that also says which experts fell back to keep-grid.

    Returns ``(wq, scales, biases, fallback)``: ``fallback`` lists the expert indices (0 for a 2-D weight) whose
    Hessian was None or could not be factorised, rounded without error feedback.
    """
    in_dim, bits, group_size = _validate(
        wq,
        scales,
        biases,
        group_size,
        bits,
        lora_a,
        lora_b,
        scale,
        "calibrated",
        None,
        None,
        dora_magnitude,
        experts_per_chunk,
        mode,
    )[:3]
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    if not isinstance(damping, (int, float)) or not damping > 0:
        raise ValueError(f"damping must be a positive number, got {damping!r}")
    stacked = wq.ndim == 3

    def as3(x):
        return None if x is None else (x if stacked else x.reshape((1,) + tuple(x.shape)))

    wq3, s3, b3, a3, bb3, m3 = map(as3, (wq, scales, biases, lora_a, lora_b, dora_magnitude))
    n_experts = wq3.shape[0]
    source = _hessian_source(hessian, n_experts, in_dim, stacked)
    # A chunk holds its experts' Hessians and factors ([in, in] float32 each) beside the output: one expert at a
    # time unless the caller asks for more, each Hessian dropped once factored. Chunks run one after another:
    # overlapping the next chunk's factorisation with this chunk's kernel would hold a third [in, in] array.
    chunk = min(experts_per_chunk or 1, n_experts)
    out = None
    fallback = []
    for e0 in range(0, n_experts, chunk):
        e1 = min(e0 + chunk, n_experts)
        hs = list(source(e0, e1))
        if len(hs) != e1 - e0:
            raise ValueError(f"hessian({e0}, {e1}) returned {len(hs)} Hessians, expected {e1 - e0}")
        us, feedback = [], []
        for i, e in enumerate(range(e0, e1)):
            u = None if hs[i] is None else inverse_hessian_factor(hs[i], damping)
            hs[i] = None
            feedback.append(0 if u is None else 1)
            if u is None:
                fallback.append(e)
                u = mx.zeros((in_dim, in_dim), dtype=mx.float32)  # not read: feedback 0 is keep-grid
            us.append(u)
        del hs, u
        # one expert: a view (reshape), not a stacked copy of its factor
        u3 = us[0].reshape((1, in_dim, in_dim)) if len(us) == 1 else mx.stack(us)
        del us

        def sl(x, e0=e0, e1=e1):
            return x if x is None or (e0, e1) == (0, n_experts) else x[e0:e1]

        part = _core.fuse_calibrated(
            sl(wq3),
            sl(s3),
            sl(b3),
            sl(a3),
            sl(bb3),
            sl(m3),
            u3,
            mx.array(feedback, dtype=mx.uint8),
            bits=bits,
            group_size=group_size,
            scale=float(scale),
            block=block,
            num_threads=int(num_threads or 0),
            mode=MODES[mode].kernel_id,
        )
        del u3
        if e1 - e0 == n_experts:
            out = part
        else:
            if out is None:
                out = mx.zeros(wq3.shape, dtype=mx.uint32)
            out[e0:e1] = part
        del part
        mx.eval(out)
    new_wq = out if stacked else out.reshape(wq.shape)
    return new_wq, scales, biases, fallback


def fuse_quantized(
    wq,
    scales,
    biases=None,
    *,
    group_size=None,
    bits=None,
    lora_a=None,
    lora_b=None,
    scale=1.0,
    requant="fresh",
    out_bits=None,
    out_group_size=None,
    dora_magnitude=None,
    experts_per_chunk=None,
    num_threads=None,
    mode="affine",
    out_mode=None,
    dtype=None,
    hessian=None,
    damping=DEFAULT_DAMPING,
    block=DEFAULT_BLOCK,
):
    """Fuse a low-rank delta into an MLX-quantized weight, natively and without a dense copy.

    Args:
        wq: uint32 ``[out, in*bits/32]`` or an expert stack ``[E, out, in*bits/32]``.
        scales: ``[..., in/group_size]``: float32, float16 or bfloat16 (affine), uint8 (mxfp4, nvfp4, mxfp8).
        biases: like ``scales`` for affine; None for the floating-point modes.
        group_size, bits: the input's format (affine: group 32/64/128, bits 2, 3, 4, 5, 6 or 8; the fp modes
            fix them: mxfp4 4/32, nvfp4 4/16, mxfp8 8/32, and they may be left None).
        lora_a: ``[r, in]`` or ``[E, r, in]``; lora_b: ``[out, r]`` or ``[E, out, r]`` (any float dtype).
            Both None: a zero delta, i.e. the pure requantization (the zero-delta control).
        scale: delta = ``scale * lora_b @ lora_a``, computed in float32.
        requant: ``"fresh"`` reproduces mlx-lm's fuse on the CPU stream (dequantize to the values' dtype, add
            the delta cast to it, quantize as ``mx.quantize``); ``"keep-grid"`` keeps each group's scale (and
            bias) and re-encodes ``w_hat + delta`` to the nearest code at it: a zero delta returns the inputs
            bit for bit. ``"calibrated"`` keeps the grid too and chooses the codes by error feedback
            (GPTQ's column loop, on the fixed grid: the stored affine scale and bias, or the stored e8m0/e4m3
            scale and the nearest E2M1/E4M3 code) from ``hessian``: a zero delta is still returned bit for bit,
            and an expert without a Hessian is rounded as keep-grid.
        out_bits, out_group_size, out_mode: fresh only, re-quantize at another width or into another mode
            (e.g. mxfp4 -> affine 8-bit; an affine output from an fp input defaults to 8 bits, group 64).
        dora_magnitude: ``[out]`` or ``[E, out]``: DoRA fuse ``m * (W + delta) / ||W + delta||_row``.
        experts_per_chunk: experts evaluated per step of a stack (None: from a 256 MiB output budget).
        num_threads: kernel threads (None: all cores); results do not depend on it.
        mode: the input's mode, "affine", "mxfp4", "nvfp4" or "mxfp8".
        dtype: the dtype the values are dequantized to and requantized from. Affine: the scales' dtype (the
            only value accepted). Floating-point modes: None means bfloat16, what ``mx.dequantize`` returns
            for them by default and so what mlx-lm's fuse computes in.
        hessian: calibrated only. ``X^T X / n`` of the module's input activations X ``[n, in]``: ``[in, in]``
            (shared by every expert), ``[E, in, in]``, or a callable ``(e0, e1) -> list`` of ``[in, in]``
            arrays or None per expert (None: too few tokens, keep-grid), called one chunk of experts at a
            time so that only a chunk's Hessians are ever in memory.
        damping: added to the Hessian's diagonal as a fraction of its mean diagonal (GPTQ's 1%).
        block: columns per lazy-batch block of the column loop (changes float rounding, not the method).

    Returns:
        ``(wq, scales, biases)`` as evaluated mx.arrays in the input layout; ``biases`` is None for an fp
        output mode; affine scales keep the values' dtype, fp scales are uint8. keep-grid returns the input
        ``scales`` and ``biases`` objects themselves.
    """
    in_dim, bits, group_size, om, ob, og = _validate(
        wq,
        scales,
        biases,
        group_size,
        bits,
        lora_a,
        lora_b,
        scale,
        requant,
        out_bits,
        out_group_size,
        dora_magnitude,
        experts_per_chunk,
        mode,
        out_mode,
        dtype,
    )
    if requant == "calibrated":
        return fuse_calibrated(
            wq,
            scales,
            biases,
            group_size=group_size,
            bits=bits,
            hessian=hessian,
            lora_a=lora_a,
            lora_b=lora_b,
            scale=scale,
            dora_magnitude=dora_magnitude,
            experts_per_chunk=experts_per_chunk,
            num_threads=num_threads,
            damping=damping,
            block=block,
            mode=mode,
        )[:3]
    if hessian is not None:
        raise ValueError(f"hessian is used by requant='calibrated' only, not {requant!r}")
    fp_in = not MODES[mode].has_biases
    values_dtype = (dtype or mx.bfloat16) if fp_in else scales.dtype
    stacked = wq.ndim == 3

    def as3(x):
        # reshape, not x[None] / out[0]: both views, but indexing makes MLX copy the output once more
        return None if x is None else (x if stacked else x.reshape((1,) + tuple(x.shape)))

    wq3, s3, b3, a3, bb3, m3 = map(as3, (wq, scales, biases, lora_a, lora_b, dora_magnitude))
    n_experts, out_dim = wq3.shape[0], wq3.shape[1]
    keep = requant == "keep-grid"
    kw = dict(
        bits=bits,
        group_size=group_size,
        out_bits=ob,
        out_group_size=og,
        keep_grid=keep,
        scale=float(scale),
        num_threads=int(num_threads or 0),
        mode=MODES[mode].kernel_id,
        out_mode=MODES[om].kernel_id,
        dtype=values_dtype,
    )
    fp_out = not MODES[om].has_biases
    itemsize = 1 if fp_out else values_dtype.size
    chunk = experts_per_chunk or _default_chunk(n_experts, out_dim, in_dim, ob, og, itemsize, 1 if fp_out else 2)
    chunk = min(chunk, n_experts)

    def run(e0, e1):
        sl = (lambda x: None if x is None else x[e0:e1]) if (e0, e1) != (0, n_experts) else (lambda x: x)
        return _core.fuse_quantized(sl(wq3), sl(s3), sl(b3), sl(a3), sl(bb3), sl(m3), **kw)

    if chunk >= n_experts:
        outs = run(0, n_experts)
        mx.eval(outs)
    else:
        # Each chunk is evaluated before the next and written into the stacked result in place (MLX donates
        # the buffer of an array that nothing else references), so live arrays and scratch stay bounded.
        outs = None
        for e0 in range(0, n_experts, chunk):
            e1 = min(e0 + chunk, n_experts)
            part = run(e0, e1)
            if outs is None:
                outs = [mx.zeros((n_experts,) + tuple(p.shape[1:]), dtype=p.dtype) for p in part]
            for i, p in enumerate(part):
                outs[i][e0:e1] = p
            mx.eval(outs)
            del part
    if keep:
        new_wq = outs[0] if stacked else outs[0].reshape(wq.shape)
        return new_wq, scales, biases
    if not stacked:
        outs = [o.reshape(o.shape[1:]) for o in outs]
    if fp_out:
        return outs[0], outs[1], None
    return tuple(outs)
