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

Output space, on held-out prompts that are not calibration prompts (``noise.heldout``: which prompts, how
disjointness is checked), when the output metrics are on. X is a module's input on the held-out tokens, recorded
while the adapter model (base + unfused adapter) runs them ([rows, in]; for a switch stack, per expert, the rows
of the tokens routed to it, one row per (token, expert) pair). D is the adapter's change of the weight: dW, or for
DoRA the renormalised ``dora(W_hat + dW) - W_hat`` (the function the unfused DoRA layer computes). Per entry:

* ``residual_over_effect``: ||(W_fused - W_hat - D) X^T||_F / ||D X^T||_F (1.0: the adapter's effect on these
  inputs entirely lost, 0: kept exactly, above 1: the fuse adds more error than the adapter adds effect);
* ``output_cosine``: cos((W_fused - W_hat) X^T, D X^T), the module's output change against the adapter's;
* ``heldout_rows``: rows of X (null ratios when there are none, as for an expert no held-out token reaches).

``heldout_modules`` pools them per module over its experts: the sums of squares (and of products) over all
routed rows of all experts, i.e. the same ratios for the stack's output on every (token, expert) pair, so an
expert counts as much as it is used. Model level (``outputs``, ``noise.heldout.output_measures``): KL of the
next-token distributions at every held-out position and ``kl_ratio`` = KL(adapter || fused) / KL(adapter ||
base).
"""

import math
import tempfile
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.adapters import check_against_model, load_adapter
from reqnoise.fuse.calibration import DEFAULT_CALIB_TOKENS, MIN_EXPERT_TOKENS, collect_inputs, load_calibration
from reqnoise.fuse.controls import apply_control
from reqnoise.fuse.model import fuse_model
from reqnoise.fuse.model_io import layer_index, open_model_dir
from reqnoise.fuse.module import EXPERTS_PER_STEP, _dora, expert_steps, fuse_module, module_parts
from reqnoise.fuse.options import FuseOptions
from reqnoise.kernel.formats import FP_MODES, MODES
from reqnoise.noise.heldout import DEFAULT_HELDOUT_TOKENS, heldout_set, output_measures, overlaps

# Verdict thresholds on the median delta cosine over adapted (module, expert) entries.
SURVIVES = 0.9
PARTLY = 0.5


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


def _heldout_sums(eff, change, x) -> tuple:
    """``(rows, ||(eff - change) X^T||^2, ||change X^T||^2, ||eff X^T||^2, <eff X^T, change X^T>)`` of one
    expert: ``eff``/``change`` [out, in] float32 mx, ``x`` [rows, in] float32 numpy."""
    if len(x) == 0:
        return (0, 0.0, 0.0, 0.0, 0.0)
    xt = mx.array(x).T
    fo, co = eff @ xt, change @ xt
    sums = [mx.sum(v) for v in ((fo - co) ** 2, co * co, fo * fo, fo * co)]
    mx.eval(sums)
    return (len(x), *(float(v.item()) for v in sums))


def _heldout_ratios(sums) -> dict:
    """residual_over_effect and output_cosine from (pooled) ``_heldout_sums``."""
    n, res, ch, ef, dot = sums
    return dict(
        heldout_rows=n,
        residual_over_effect=_ratio(math.sqrt(res), math.sqrt(ch)) if n and ch > 0 else None,
        output_cosine=(_ratio(dot, math.sqrt(ch * ef)) if ef > 0 else 0.0) if n and ch > 0 else None,
    )


def module_metrics(
    name,
    parts,
    qp,
    factors,
    fused,
    out_qp,
    experts_per_step=EXPERTS_PER_STEP,
    mode="affine",
    out_mode=None,
    heldout=None,
):
    """Per-expert metric dicts of one module (a dense module gives one entry with expert None).

    ``parts``/``fused``: the module's tensors by suffix before and after the fuse; ``qp``/``out_qp``: their
    (bits, group_size) or None (float); ``mode``/``out_mode``: their MLX modes (``out_mode`` None: ``mode``);
    ``factors``: the intended delta's ModuleAdapter, or None (zero); ``heldout``: the module's held-out inputs
    (a ``fuse.calibration.ModuleInputs``) for the output-space entries, or None (they are null). Each entry
    carries its held-out sums as ``_heldout`` (``pool_heldout`` turns them into the per-module values).
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
        change = dw
        if heldout is not None and factors is not None and factors.magnitude is not None:
            # DoRA: the unfused layer computes the renormalised W_hat + dW, so that is the effect to keep
            change = _dora(base + dw, factors.magnitude) - base
        if heldout is not None:
            mx.eval(eff, change)
        for i in range(e1 - e0):
            if heldout is not None:
                e = e0 + i if stacked else 0
                held = _heldout_sums(eff[i], change[i], heldout.rows[heldout.experts == e])
            else:
                held = (0, 0.0, 0.0, 0.0, 0.0)
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
                    **_heldout_ratios(held),
                    _heldout=held,
                )
            )
            if fp_over is not None:
                rows[-1]["delta_rms_over_step"] = _ratio(float(fp_over[i]), 1.0) if ndw > 0 else 0.0
    return rows


def weight_metrics(
    md, targets, options: FuseOptions, *, progress=True, cosine_only=False, calibration=None, heldout=None, fused=None
):
    """Fuse each target module in memory (never written) and measure it; returns the list of rows (or, with
    ``cosine_only``, their delta cosines).

    ``calibration``: ``{module: ModuleInputs}`` of the calibration data (``requant="calibrated"``); its rows
    then say how many calibration rows each expert had and whether it fell back to keep-grid rounding.
    ``heldout``: ``{module: ModuleInputs}`` of the held-out prompts, for the output-space entries.
    ``fused``: ``(ModelDir, {module: fuse_report entry})`` of a model ``fuse_model`` wrote with these options:
    its tensors are measured instead of fusing again (the entries give the calibration rows and fallbacks)."""
    from tqdm import tqdm

    rows = []
    for name in tqdm(sorted(targets), desc="noise", unit="module", disable=not progress, leave=False):
        parts = module_parts(md, name)
        qp = md.quant_params(name) if md.is_quantized(name) else None
        mode = (md.quant_mode(name) if qp is not None else None) or "affine"
        factors = apply_control(targets[name], options.control, options.seed)
        counts, fallback = None, set()
        if fused is None:
            cal = None if calibration is None else calibration[name]
            out_parts = fuse_module(parts, qp, factors, options, mode, calibration=cal)
            if cal is not None and qp is not None:
                counts, fallback = cal.token_counts(), set(getattr(cal, "fallback", []))
        else:
            out_parts = module_parts(fused[0], name)
            cal = fused[1][name].get("calibration")
            if cal is not None and qp is not None:
                counts, fallback = cal["tokens_per_expert"], set(cal["keep_grid_fallback"])
        # The intended delta is always the adapter's (or the control's): what the fuse was asked to add.
        intended = factors if options.control != "zero" else None
        out = options.output_format(qp, mode)
        new = module_metrics(
            name,
            parts,
            qp,
            intended,
            out_parts,
            None if out is None else out[:2],
            mode=mode,
            out_mode=None if out is None else out[2],
            heldout=None if heldout is None else heldout[name],
        )
        for r in new:
            e = r["expert"] or 0
            r["calibration_rows"] = None if counts is None else int(counts[e])
            r["calibration_fallback"] = None if counts is None else e in fallback
        rows.extend(new)
        del parts, out_parts
        mx.clear_cache()
    if cosine_only:
        return [r["delta_cosine"] for r in rows]
    return rows


def pool_heldout(rows) -> list:
    """Per module, the output-space ratios pooled over its experts (see the module docstring); removes the
    per-entry sums from ``rows``. One dict per module, in the rows' order."""
    pooled: dict = {}
    for r in rows:
        sums = r.pop("_heldout")
        acc = pooled.setdefault(r["module"], dict(layer=r["layer"], experts=0, reached=0, sums=[0, 0.0, 0.0, 0.0, 0.0]))
        acc["experts"] += r["expert"] is not None
        acc["reached"] += sums[0] > 0
        acc["sums"] = [a + b for a, b in zip(acc["sums"], sums)]
    return [
        dict(
            module=name,
            layer=acc["layer"],
            experts=acc["experts"] or None,
            experts_with_rows=acc["reached"] if acc["experts"] else None,
            **_heldout_ratios(acc["sums"]),
        )
        for name, acc in pooled.items()
    ]


def _median(values):
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def summarize(rows, heldout_modules=()) -> dict:
    """Medians and totals over the rows; the output-space medians are over modules (``pool_heldout``)."""
    cos = [r["delta_cosine"] for r in rows]
    codes = [r["code_change_frac"] for r in rows if r["code_change_frac"] is not None]
    steps = [r["delta_rms_over_step"] for r in rows if r["delta_rms_over_step"]]
    calibrated = [r for r in rows if r.get("calibration_fallback") is not None]
    return dict(
        median_residual_over_effect=_median([m["residual_over_effect"] for m in heldout_modules]),
        median_output_cosine=_median([m["output_cosine"] for m in heldout_modules]),
        calibration_fallback_entries=sum(r["calibration_fallback"] for r in calibrated) if calibrated else None,
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


def verdict(summary, outputs, *, requant, out_bits, control, alternatives=None, calibrated=None) -> str:
    """One line. Thresholds: median delta cosine >= 0.9 survives, >= 0.5 partly, below: mostly erased.

    ``alternatives`` (option -> median delta cosine), below survival: see ``alternatives_text``.
    ``calibrated``: the ``calibrated_alternative`` of ``noise_report``, see ``calibrated_text``."""
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
    if calibrated:
        line += calibrated_text(summary.get("median_residual_over_effect"), calibrated["median_residual_over_effect"])
    return line


def calibrated_text(ours: float | None, theirs: float | None) -> str:
    """The verdict's tail about ``--requant calibrated`` measured on the same held-out inputs: offered only
    when its median residual over effect is strictly lower than this fuse's; ``""`` when either is missing."""
    if ours is None or theirs is None:
        return ""
    t, o = _two_values(theirs, ours)
    numbers = f"on the held-out inputs (median residual/effect {t} vs {o})"
    if theirs < ours:
        return f"; --requant calibrated keeps more of its effect {numbers}"
    return f"; --requant calibrated does not keep more of it {numbers}"


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


def _calibrated_alternative_data(model, adapter_path, opts: FuseOptions, held):
    """The calibration data a default ``--requant calibrated`` fuse of this adapter reads, checked (before any
    model runs) to share no example with the held-out set the comparison is measured on."""
    if held is None:
        raise ReqnoiseError("comparing with --requant calibrated needs the output measures (held-out inputs)")
    if opts.requant == "calibrated":
        raise ReqnoiseError("this report is already --requant calibrated: there is nothing to compare with")
    data = load_calibration(model, adapter_path, None, DEFAULT_CALIB_TOKENS)
    hit = overlaps(held.data.examples, data.examples)
    if hit:
        i, j = next(iter(sorted(hit.items())))
        raise ReqnoiseError(
            f"held-out example {i + 1} of {held.source} overlaps calibration example {j + 1} of {data.source}: "
            "the calibrated fuse cannot be compared on prompts it was calibrated on"
        )
    return data


def _calibrated_alternative(model, adapter_path, md, targets, opts: FuseOptions, data, held_inputs, progress) -> dict:
    """The held-out measures of a default calibrated fuse (in memory), on this report's held-out inputs."""
    calibration = collect_inputs(model, adapter_path, targets, data)
    alt = replace(opts, requant="calibrated", out_bits=None, out_mode=None, calib_data=None, calib_tokens=None)
    rows = weight_metrics(md, targets, alt, progress=progress, calibration=calibration, heldout=held_inputs)
    del calibration
    held = pool_heldout(rows)
    return dict(
        median_residual_over_effect=_median([m["residual_over_effect"] for m in held]),
        median_output_cosine=_median([m["output_cosine"] for m in held]),
        median_delta_cosine=_median([r["delta_cosine"] for r in rows]),
        calibration=dict(source=data.source, sha256=data.sha256, tokens=data.tokens),
        fallback_entries=sum(bool(r["calibration_fallback"]) for r in rows),
    )


def noise_report(
    model,
    adapter_path,
    *,
    options: FuseOptions | None = None,
    prompts=None,
    heldout_data=None,
    heldout_tokens=DEFAULT_HELDOUT_TOKENS,
    outputs=True,
    alternatives=True,
    compare_calibrated=False,
    progress=True,
    **fields,
) -> dict:
    """Weight- and output-level survival of an adapter through a fuse (see the module docstring).

    Args mirror ``fuse_model`` (a FuseOptions as ``options``, or its fields as keywords; ``requant="calibrated"``
    reads its calibration data as the fuse does). The held-out set (``noise.heldout.heldout_set``): ``prompts``
    (plain user prompts) or ``heldout_data`` (an mlx-lm dataset file), default the built-in probe prompts minus
    the calibration prompts, at most ``heldout_tokens`` tokens. ``outputs``: compute the output-space metrics
    (runs the adapter model on the held-out set, loads the base model and a fused copy written to a temporary
    directory); without them no model is loaded except, under calibrated, the adapter model on its calibration
    data. ``alternatives``: when the adapter does not survive, also measure keep-grid and --out-bits 8 to say
    whether they would keep it. ``compare_calibrated`` (needs ``outputs``; not under calibrated): also fuse
    under ``--requant calibrated`` (default calibration data, which the held-out set must not overlap) in
    memory and measure its residual over effect on the same held-out inputs; the verdict says whether it keeps
    more of the adapter's effect than this fuse (the median over modules, lower is better).

    Returns:
        ``{"modules": [...], "heldout_modules": [...], "summary": {...}, "outputs": {...} or None,
        "heldout": {...} or None, "calibration": {...} or None, "alternatives": {...},
        "calibrated_alternative": {...} or None, "verdict": str, "options": {...}}``
    """
    opts = FuseOptions.merge(options, fields, "noise_report").check()
    md = open_model_dir(model)
    adapter = load_adapter(adapter_path)
    check_against_model(adapter, md)
    layer_set = None if opts.layers is None else set(opts.layers)
    targets = {k: v for k, v in adapter.modules.items() if layer_set is None or layer_index(k) in layer_set}
    if not targets:
        raise ReqnoiseError(f"--layers {opts.layers} selects none of the adapter's modules")
    # Every input is read and checked (calibration data, held-out set and their disjointness) before a model runs.
    cal_data = None
    if opts.requant == "calibrated":
        cal_data = load_calibration(model, adapter_path, opts.calib_data, opts.calib_tokens or DEFAULT_CALIB_TOKENS)
    held = None
    if outputs:
        held = heldout_set(
            model, adapter_path, opts, prompts=prompts, data=heldout_data, max_tokens=heldout_tokens,
            calibration=cal_data,
        )  # fmt: skip
    alt_cal = _calibrated_alternative_data(model, adapter_path, opts, held) if compare_calibrated else None
    cal_alt = None
    with tempfile.TemporaryDirectory(prefix="reqnoise-noise-") as tmp:
        if held is not None:
            adapter_logits = []
            held_inputs = collect_inputs(model, adapter_path, targets, held.data, outputs=adapter_logits)
            # The fused copy the output measures load is also what the weight measures read: one fuse.
            fused_dir = Path(tmp) / "fused"
            fuse_rep = fuse_model(model, adapter_path, fused_dir, options=opts, progress=False)
            entries = {e["module"]: e for e in fuse_rep.modules}
            rows = weight_metrics(
                md, targets, opts, progress=progress, heldout=held_inputs, fused=(open_model_dir(fused_dir), entries)
            )
            if alt_cal is not None:
                cal_alt = _calibrated_alternative(
                    model, adapter_path, md, targets, opts, alt_cal, held_inputs, progress
                )
            del held_inputs
            outs = output_measures(adapter_logits, model, fused_dir, held.data.sequences)
            del adapter_logits
        else:
            calibration = None if cal_data is None else collect_inputs(model, adapter_path, targets, cal_data)
            rows = weight_metrics(md, targets, opts, progress=progress, calibration=calibration)
            outs = None
            del calibration
    held_modules = pool_heldout(rows) if held is not None else []
    if held is None:
        for r in rows:
            r.pop("_heldout")
    summary = summarize(rows, held_modules)
    alts = {}
    med = summary["median_delta_cosine"]
    if alternatives and opts.control != "zero" and med is not None and med < SURVIVES:
        plain = replace(opts, calib_data=None, calib_tokens=None)
        if opts.requant != "keep-grid":
            alt = replace(plain, requant="keep-grid", out_bits=None)
            alts["--requant keep-grid"] = _median(weight_metrics(md, targets, alt, progress=progress, cosine_only=True))
        if md.config.get("quantization") and _has_fp_target(md, targets):
            # 8 bits is no width of mxfp4/nvfp4: the 8-bit alternative of an fp model is affine
            if (opts.out_mode, opts.out_bits) != ("affine", 8):
                alt = replace(plain, requant="fresh", out_bits=8, out_mode="affine")
                alts["--out-mode affine --out-bits 8"] = _median(
                    weight_metrics(md, targets, alt, progress=progress, cosine_only=True)
                )
        elif md.config.get("quantization") and opts.out_bits != 8:
            alt = replace(plain, requant="fresh", out_bits=8, out_mode=None)
            alts["--out-bits 8"] = _median(weight_metrics(md, targets, alt, progress=progress, cosine_only=True))
    cal_info = None
    if cal_data is not None:
        cal_info = dict(
            source=cal_data.source, sha256=cal_data.sha256, format=cal_data.format, tokens=cal_data.tokens,
            sequences=len(cal_data.sequences), min_expert_tokens=MIN_EXPERT_TOKENS,
            fallback_entries=summary["calibration_fallback_entries"],
        )  # fmt: skip
    return dict(
        modules=rows,
        heldout_modules=held_modules,
        summary=summary,
        outputs=outs,
        heldout=None if held is None else held.to_dict(),
        calibration=cal_info,
        alternatives=alts,
        calibrated_alternative=cal_alt,
        verdict=verdict(
            summary,
            outs,
            requant=opts.requant,
            out_bits=opts.out_bits,
            control=opts.control,
            alternatives=alts,
            calibrated=cal_alt,
        ),
        options=dict(model=str(model), adapter=str(adapter_path), **opts.to_dict()),
    )
