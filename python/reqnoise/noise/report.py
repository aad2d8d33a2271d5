"""Requantization-noise analytics: does the adapter survive the fuse? Per module and per expert, before any
evaluation, plus next-token distributions of base, adapter (unfused) and fused models on probe prompts.

Weight level, for every adapted module and expert, with dW the intended delta (scale * B @ A, float32) and
dW_eff = dequant(fused) - dequant(base) (float32):

* ``code_change_frac``: share of codes that differ from the base (null when the width changed);
* ``scale_change_frac``: share of groups whose scale or bias changed (null when the layout changed);
* ``delta_cosine``: cos(dW_eff, dW): how much of the adapter's direction survived;
* ``delta_rel_error``: ||dW_eff - dW|| / ||dW||;
* ``delta_rms_over_step``: RMS(dW) / mean |scale|: the delta's size in quantization steps, which predicts
  survival (a delta well under half a step is rounded away by any requantization onto that grid). For the
  floating-point modes (mxfp4, nvfp4, mxfp8) the step is not one per group: it is the local code spacing at
  each base weight (the code's ulp times the group's scale, ``fp_local_step``), and the entry is
  RMS(dW / step) over the weights with a non-zero step;
* ``noise_frac``: 1 - cos^2: share of ||dW_eff||^2 not explained by its projection on dW.

For the zero control (and experts an adapter leaves at zero) dW is zero: the entry reports the artifact itself
(codes changed, ``eff_norm``) and leaves the ratios null.
"""

import math
import tempfile
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from reqnoise.chat import render_chat
from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.adapters import check_against_model, load_adapter
from reqnoise.fuse.controls import apply_control
from reqnoise.fuse.model import fuse_model
from reqnoise.fuse.model_io import layer_index, open_model_dir
from reqnoise.fuse.module import EXPERTS_PER_STEP, expert_steps, fuse_module, module_parts
from reqnoise.fuse.options import FuseOptions
from reqnoise.kernel.formats import FP_MODES, MODES

# Verdict thresholds on the median delta cosine over adapted (module, expert) entries.
SURVIVES = 0.9
PARTLY = 0.5

PROBE_PROMPTS = [
    "Who are you?",
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "What is 17 times 23?",
    "Name three prime numbers.",
    "Which planet is closest to the sun?",
    "Translate 'good morning' into Spanish.",
    "What causes rain?",
    "Give one tip for learning to code.",
    "Who wrote Hamlet?",
    "What is the boiling point of water in Celsius?",
    "Describe a cat in five words.",
    "What is an atom?",
    "Answer with a letter: which option is largest? A) 2 B) 9 C) 4",
    "Tell me something about yourself.",
]


def _codes(wq, bits, group):
    """Codes as float32 through MLX's own dequantize with unit scale and zero bias."""
    n_groups = wq.shape[-1] * 32 // bits // group
    ones = mx.ones(wq.shape[:-1] + (n_groups,), dtype=mx.float32)
    return mx.dequantize(wq, ones, mx.zeros_like(ones), group_size=group, bits=bits)


def _deq(parts, qp, mode="affine"):
    if qp is None or "scales" not in parts:
        return parts["weight"].astype(mx.float32)
    return mx.dequantize(
        parts["weight"], parts["scales"], parts.get("biases"), group_size=qp[1], bits=qp[0], mode=mode
    ).astype(mx.float32)


# The packed word whose every code is 1.0 (E2M1 0b0010, E4M3 0x38), and the code's (mantissa bits, smallest
# normal magnitude): what the local spacing of a floating-point code follows from.
_FP_ONE_WORD = {"e2m1": 0x22222222, "e4m3": 0x38383838}
_FP_CODE = {"e2m1": (1, 1.0), "e4m3": (3, 2.0**-6)}


def fp_codes(wq, bits: int):
    """The raw ``bits``-bit codes of packed uint32 words (fp modes: 4 or 8 bits, little end first), [..., in]."""
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
    codes = (wq[..., None] >> shifts) & mx.array((1 << bits) - 1, dtype=mx.uint32)
    return codes.reshape(wq.shape[:-1] + (-1,))


def fp_local_step(parts, qp, mode):
    """The local code spacing at each weight of an fp-mode module, float32 numpy ``[..., out, in]``.

    The code ``c = w_hat / s`` (``s`` the group's decoded scale, read through MLX's own dequantize of all-1.0
    codes) sits on a float grid whose spacing there is its ulp, ``2^(floor(log2(max(|c|, min_normal))) - m)``
    (E2M1: 0.5 below 2, 1 up to 4, 2 at 4 and 6; E4M3: m = 3, min normal 2^-6); the step is ulp(c) * s, 0
    where the scale is 0.
    """
    bits, group = qp
    code = MODES[mode].code
    ones = mx.full(parts["weight"].shape, _FP_ONE_WORD[code], dtype=mx.uint32)
    s = np.array(mx.dequantize(ones, parts["scales"], None, group_size=group, bits=bits, mode=mode).astype(mx.float32))
    w = np.array(_deq(parts, qp, mode))
    m_bits, min_normal = _FP_CODE[code]
    c = np.abs(np.divide(w, s, out=np.zeros_like(w), where=s != 0))
    _, e = np.frexp(np.maximum(c, min_normal))  # c = f * 2^e with f in [0.5, 1): floor(log2 c) = e - 1
    return np.ldexp(np.float32(1.0), e - 1 - m_bits).astype(np.float32) * s


def fp_steps_rms(dw, step) -> np.ndarray:
    """RMS over [out, in] of ``dw / step`` where the step is non-zero, per leading entry (NaN if none)."""
    dw = np.asarray(dw, dtype=np.float64)
    ok = step > 0
    ratio = np.divide(dw, step, out=np.zeros_like(dw), where=ok)
    count = ok.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sqrt((ratio**2).sum(axis=(-2, -1)) / count)


def _ratio(num, den):
    return None if den <= 0 or not math.isfinite(num / den) else float(num / den)


def module_metrics(
    name, parts, qp, factors, fused, out_qp, experts_per_step=EXPERTS_PER_STEP, mode="affine", out_mode=None
):
    """Per-expert metric dicts of one module (a dense module gives one entry with expert None).

    ``parts``/``fused``: the module's tensors by suffix before and after the fuse; ``qp``/``out_qp``: their
    (bits, group_size) or None (float); ``mode``/``out_mode``: their MLX modes (``out_mode`` None: ``mode``);
    ``factors``: the intended delta's ModuleAdapter, or None (zero).
    """
    out_mode = out_mode or mode
    fp = qp is not None and mode in FP_MODES
    stacked = parts["weight"].ndim == 3
    n = parts["weight"].shape[0] if stacked else 1
    rows = []
    for e0, e1 in expert_steps(n, experts_per_step):

        def sl(x, e0=e0, e1=e1):
            return x[e0:e1] if stacked else x[None]

        p = {k: sl(v) for k, v in parts.items()}
        f = {k: sl(v) for k, v in fused.items()}
        base = _deq(p, qp, mode)
        eff = _deq(f, out_qp, out_mode) - base
        if factors is not None:
            dw = factors.delta(e0, e1) if stacked else factors.delta()[None]
        else:
            dw = mx.zeros_like(eff)
        axes = (-2, -1)
        dot = mx.sum(eff * dw, axis=axes)
        n_dw = mx.sqrt(mx.sum(dw * dw, axis=axes))
        n_eff = mx.sqrt(mx.sum(eff * eff, axis=axes))
        n_err = mx.sqrt(mx.sum((eff - dw) ** 2, axis=axes))
        rms_dw = n_dw / math.sqrt(dw.shape[-1] * dw.shape[-2])
        code_frac = scale_frac = fp_over = None
        if fp and "scales" in p:
            # no single step per group: the delta is measured against the spacing at each weight
            fp_over = fp_steps_rms(dw, fp_local_step(p, qp, mode))
            step = None
            if out_qp == qp and out_mode == mode and "scales" in f:
                changed = fp_codes(p["weight"], qp[0]) != fp_codes(f["weight"], qp[0])
                code_frac = mx.mean(changed.astype(mx.float32), axis=axes)
                scale_frac = mx.mean((p["scales"] != f["scales"]).astype(mx.float32), axis=axes)
        elif qp is not None and "scales" in p:
            step = mx.mean(mx.abs(p["scales"].astype(mx.float32)), axis=axes)
            if out_qp == qp and out_mode == mode and "scales" in f:
                code_frac = mx.mean(
                    (_codes(p["weight"], *qp) != _codes(f["weight"], *qp)).astype(mx.float32), axis=axes
                )
                changed = (p["scales"] != f["scales"]) | (p["biases"] != f["biases"])
                scale_frac = mx.mean(changed.astype(mx.float32), axis=axes)
        else:
            step = None
        mx.eval(dot, n_dw, n_eff, n_err, rms_dw, *(x for x in (code_frac, scale_frac, step) if x is not None))
        for i in range(e1 - e0):
            ndw, neff = float(n_dw[i].item()), float(n_eff[i].item())
            cos = _ratio(float(dot[i].item()), ndw * neff) if ndw > 0 and neff > 0 else (0.0 if ndw > 0 else None)
            rows.append(
                dict(
                    module=name,
                    layer=layer_index(name),
                    expert=(e0 + i) if stacked else None,
                    code_change_frac=None if code_frac is None else float(code_frac[i].item()),
                    scale_change_frac=None if scale_frac is None else float(scale_frac[i].item()),
                    delta_cosine=cos,
                    delta_rel_error=_ratio(float(n_err[i].item()), ndw) if ndw > 0 else None,
                    delta_rms_over_step=None
                    if step is None
                    else _ratio(float(rms_dw[i].item()), float(step[i].item()))
                    if ndw > 0
                    else (0.0 if step is not None else None),
                    noise_frac=None if cos is None or neff == 0 else float(max(0.0, 1.0 - cos * cos)),
                    delta_norm=ndw,
                    eff_norm=neff,
                )
            )
            if fp_over is not None:
                rows[-1]["delta_rms_over_step"] = _ratio(float(fp_over[i]), 1.0) if ndw > 0 else 0.0
    return rows


def weight_metrics(md, targets, options: FuseOptions, *, progress=True, cosine_only=False):
    """Fuse each target module in memory (never written) and measure it; returns the list of rows (or, with
    ``cosine_only``, their delta cosines)."""
    from tqdm import tqdm

    rows = []
    for name in tqdm(sorted(targets), desc="noise", unit="module", disable=not progress, leave=False):
        parts = module_parts(md, name)
        qp = md.quant_params(name) if md.is_quantized(name) else None
        mode = (md.quant_mode(name) if qp is not None else None) or "affine"
        factors = apply_control(targets[name], options.control, options.seed)
        fused = fuse_module(parts, qp, factors, options, mode)
        # The intended delta is always the adapter's (or the control's): what the fuse was asked to add.
        intended = factors if options.control != "zero" else None
        out = options.output_format(qp, mode)
        rows.extend(
            module_metrics(
                name,
                parts,
                qp,
                intended,
                fused,
                None if out is None else out[:2],
                mode=mode,
                out_mode=None if out is None else out[2],
            )
        )
        del parts, fused
        mx.clear_cache()
    if cosine_only:
        return [r["delta_cosine"] for r in rows]
    return rows


def _median(values):
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def summarize(rows) -> dict:
    cos = [r["delta_cosine"] for r in rows]
    codes = [r["code_change_frac"] for r in rows if r["code_change_frac"] is not None]
    steps = [r["delta_rms_over_step"] for r in rows if r["delta_rms_over_step"]]
    return dict(
        entries=len(rows),
        adapted_entries=sum(c is not None for c in cos),
        median_delta_cosine=_median(cos),
        mean_delta_cosine=None
        if not any(c is not None for c in cos)
        else float(np.mean([c for c in cos if c is not None])),
        median_delta_rms_over_step=_median(steps),
        mean_code_change_frac=float(np.mean(codes)) if codes else None,
        max_code_change_frac=float(np.max(codes)) if codes else None,
        total_eff_norm=float(np.sqrt(sum(r["eff_norm"] ** 2 for r in rows))),
        total_delta_norm=float(np.sqrt(sum(r["delta_norm"] ** 2 for r in rows))),
    )


def _next_token_logprobs(model_dir, prompts, adapter_path=None):
    import mlx_lm

    model, tok = mlx_lm.load(str(model_dir), adapter_path=None if adapter_path is None else str(adapter_path))
    out = []
    for p in prompts:
        ids = tok.encode(
            render_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True), add_special_tokens=False
        )
        logits = model(mx.array(ids)[None])[0, -1].astype(mx.float32)
        out.append(np.array(logits - mx.logsumexp(logits)))
    del model
    mx.clear_cache()
    return np.stack(out).astype(np.float64)


def _kl(p_log, q_log):
    return float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), axis=-1)))


def output_metrics(model, adapter_path, fused_dir, prompts) -> dict:
    base = _next_token_logprobs(model, prompts)
    adapted = _next_token_logprobs(model, prompts, adapter_path)
    fused = _next_token_logprobs(fused_dir, prompts)
    top = {k: v.argmax(-1) for k, v in (("base", base), ("adapter", adapted), ("fused", fused))}
    return dict(
        prompts=len(prompts),
        kl_adapter_fused=_kl(adapted, fused),
        kl_adapter_base=_kl(adapted, base),
        kl_fused_base=_kl(fused, base),
        top1_fused_vs_adapter=float(np.mean(top["fused"] == top["adapter"])),
        top1_fused_vs_base=float(np.mean(top["fused"] == top["base"])),
        top1_adapter_vs_base=float(np.mean(top["adapter"] == top["base"])),
    )


def verdict(summary, outputs, *, requant, out_bits, control, alternatives=None) -> str:
    """One line. Thresholds: median delta cosine >= 0.9 survives, >= 0.5 partly, below: mostly erased.

    ``alternatives`` (option -> median delta cosine), below survival: see ``alternatives_text``."""
    if control == "zero":
        frac = summary["mean_code_change_frac"]
        if frac is not None and frac == 0:
            return "zero-delta control: no code changed (artifact-free requantization)"
        pct = "n/a" if frac is None else f"{100 * frac:.1f}% of codes"
        return (
            f"zero-delta control: requantization alone changed {pct} in the adapted modules "
            f"(||dW_eff|| {summary['total_eff_norm']:.3g}): this is the artifact any fuse carries"
        )
    med = summary["median_delta_cosine"]
    if med is None:
        return "no adapted entries with a non-zero delta: nothing to survive"
    closer = ""
    if outputs:
        if outputs["kl_adapter_fused"] > outputs["kl_adapter_base"]:
            closer = "; fused outputs are closer to the base than to the adapter"
        else:
            closer = "; fused outputs are closer to the adapter than to the base"
    word = (
        "adapter survives"
        if med >= SURVIVES
        else "adapter partly survives"
        if med >= PARTLY
        else "adapter mostly erased by requantization"
    )
    line = f"{word} (median cosine {med:.2f}{closer})"
    if med < SURVIVES and alternatives:
        line += alternatives_text(med, alternatives, summary.get("median_delta_rms_over_step"))
    return line


KEEP_GRID_LIMIT = "keep-grid removes the zero-delta artifact but cannot keep a delta smaller than half a step"


def _two_values(a: float, b: float) -> tuple[str, str]:
    # Enough decimals that a strictly better value never prints equal to the one it beats.
    digits = 2
    while a != b and digits < 6 and f"{a:.{digits}f}" == f"{b:.{digits}f}":
        digits += 1
    return f"{a:.{digits}f}", f"{b:.{digits}f}"


def alternatives_text(med: float, alternatives: dict, steps: float | None = None) -> str:
    """The verdict's tail about other fuse options: ``"; ..."`` or ``""``.

    ``med``: this fuse's median delta cosine; ``alternatives``: option -> median delta cosine under it (None
    when nothing was adapted); ``steps``: this adapter's median RMS delta in quantization steps. An option is
    offered only when its median cosine is strictly higher than ``med`` (the measure the verdict uses); one
    that does not improve is named as such. Keep-grid always carries its limit: it keeps the grid, so any
    element of a delta under half a step rounds back to the base code."""
    parts = []
    for k, v in alternatives.items():
        if v is None:
            continue
        ours, theirs = _two_values(med, v)
        if v > med:
            text = f"{k} gives median cosine {theirs}"
        else:
            text = f"{k} does not keep more of it (median cosine {theirs} vs {ours})"
        if "keep-grid" in k:
            size = "" if steps is None else f" (this adapter's median RMS delta: {steps:.2g} steps)"
            text += f": {KEEP_GRID_LIMIT}{size}"
        parts.append(text)
    return "".join("; " + p for p in parts)


def _has_fp_target(md, targets) -> bool:
    return any(md.is_quantized(n) and md.quant_mode(n) in FP_MODES for n in targets)


def noise_report(
    model,
    adapter_path,
    *,
    options: FuseOptions | None = None,
    prompts=None,
    outputs=True,
    alternatives=True,
    progress=True,
    **fields,
) -> dict:
    """Weight- and output-level survival of an adapter through a fuse (see the module docstring).

    Args mirror ``fuse_model`` (a FuseOptions as ``options``, or its fields as keywords); ``prompts``: probe
    prompts (default: a built-in set of 16); ``outputs``: compute the output-level metrics (loads base, adapter
    and fused model once each); ``alternatives``: when the adapter does not survive, also measure keep-grid and
    --out-bits 8 to say whether they would keep it.

    Returns:
        ``{"modules": [...], "summary": {...}, "outputs": {...} or None, "alternatives": {...}, "verdict": str,
        "options": {...}}``
    """
    opts = FuseOptions.merge(options, fields, "noise_report").check()
    if opts.requant == "calibrated":
        # Its survival metrics need held-out activations (residual over effect, output cosine): not built yet.
        raise ReqnoiseError(
            "the noise report does not cover --requant calibrated yet; fuse with it and compare the models with "
            "reqnoise eval"
        )
    md = open_model_dir(model)
    adapter = load_adapter(adapter_path)
    check_against_model(adapter, md)
    layer_set = None if opts.layers is None else set(opts.layers)
    targets = {k: v for k, v in adapter.modules.items() if layer_set is None or layer_index(k) in layer_set}
    if not targets:
        raise ReqnoiseError(f"--layers {opts.layers} selects none of the adapter's modules")
    rows = weight_metrics(md, targets, opts, progress=progress)
    summary = summarize(rows)
    alts = {}
    med = summary["median_delta_cosine"]
    if alternatives and opts.control != "zero" and med is not None and med < SURVIVES:
        if opts.requant != "keep-grid":
            alt = replace(opts, requant="keep-grid", out_bits=None)
            alts["--requant keep-grid"] = _median(weight_metrics(md, targets, alt, progress=progress, cosine_only=True))
        if md.config.get("quantization") and _has_fp_target(md, targets):
            # 8 bits is no width of mxfp4/nvfp4: the 8-bit alternative of an fp model is affine
            if (opts.out_mode, opts.out_bits) != ("affine", 8):
                alt = replace(opts, requant="fresh", out_bits=8, out_mode="affine")
                alts["--out-mode affine --out-bits 8"] = _median(
                    weight_metrics(md, targets, alt, progress=progress, cosine_only=True)
                )
        elif md.config.get("quantization") and opts.out_bits != 8:
            alt = replace(opts, requant="fresh", out_bits=8, out_mode=None)
            alts["--out-bits 8"] = _median(weight_metrics(md, targets, alt, progress=progress, cosine_only=True))
    outs = None
    if outputs:
        with tempfile.TemporaryDirectory(prefix="reqnoise-noise-") as tmp:
            fused_dir = Path(tmp) / "fused"
            fuse_model(model, adapter_path, fused_dir, options=opts, progress=False)
            outs = output_metrics(model, adapter_path, fused_dir, prompts or PROBE_PROMPTS)
    return dict(
        modules=rows,
        summary=summary,
        outputs=outs,
        alternatives=alts,
        verdict=verdict(
            summary, outs, requant=opts.requant, out_bits=opts.out_bits, control=opts.control, alternatives=alts
        ),
        options=dict(model=str(model), adapter=str(adapter_path), **opts.to_dict()),
    )
