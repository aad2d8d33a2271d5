"""One module of a model: gather its tensors, fuse a delta into it, walk an expert stack a few experts at a time.

Shared by the model-level fuse (``fuse.model``, which writes the result) and the noise analytics
(``noise.report``, which measures it in memory), so both fuse a module the same way.
"""

import mlx.core as mx

from reqnoise.fuse.model_io import read_tensor
from reqnoise.fuse.options import FuseOptions
from reqnoise.kernel.op import fuse_calibrated, fuse_quantized

PARTS = ("weight", "scales", "biases")
# The float paths form a dense delta per expert; 16 experts at a time bound that scratch to a few
# weight-sized arrays whatever the stack's size.
EXPERTS_PER_STEP = 16


def expert_steps(n_experts: int, step: int = EXPERTS_PER_STEP):
    """``(e0, e1)`` ranges covering ``n_experts`` experts, ``step`` at a time."""
    for e0 in range(0, n_experts, step):
        yield e0, min(e0 + step, n_experts)


def module_parts(md, name: str, shard=None, loaded=None) -> dict:
    """A module's tensors by suffix (weight[, scales, biases]) as mx.arrays.

    ``loaded``: the tensors of ``shard`` already in memory; a part that lives in another shard (a module that
    straddles two) is read from its own byte range, so no second shard is ever loaded whole.
    """
    parts = {}
    for part in PARTS:
        info = md.tensors.get(f"{name}.{part}")
        if info is not None:
            parts[part] = loaded[info.name] if loaded is not None and info.shard == shard else read_tensor(info)
    return parts


def _dora(w, magnitude):
    # mlx-lm's DoRALinear.fuse: the row factor is float32, so the fused weight is float32.
    return (magnitude / mx.linalg.norm(w, axis=-1))[..., None] * w


def _fuse_float(w, f):
    """W + delta in W's dtype (mlx-lm's arithmetic); a stack is done a few experts at a time."""
    if f is None:
        return w
    if w.ndim == 3:
        parts = []
        for e0, e1 in expert_steps(w.shape[0]):
            part = w[e0:e1] + f.delta(e0, e1).astype(w.dtype)
            mx.eval(part)
            parts.append(part)
        out = mx.concatenate(parts)
    else:
        out = w + f.delta().astype(w.dtype)
    if f.magnitude is not None:
        out = _dora(out, f.magnitude)
    return out


def fuse_module(parts: dict, qp, factors, options: FuseOptions, mode: str = "affine", calibration=None) -> dict:
    """Fuse one module (lazily: the caller evaluates).

    Args:
        parts: its tensors by suffix (weight[, scales, biases]), as ``module_parts`` returns them.
        qp: its ``(bits, group_size)``, or None for a float module.
        factors: a ModuleAdapter, or None for a zero delta.
        options: requant mode and output format (``options.output_format``).
        mode: its MLX quantization mode (``ModelDir.quant_mode``); the fp modes have no biases.
        calibration: ``requant == "calibrated"`` only: the module's ``fuse.calibration.ModuleInputs``; the
            experts rounded without error feedback are added to it as ``fallback``.

    Returns:
        The new tensors by suffix; a dequantized module has no scales/biases any more, an fp-mode output no
        biases. A dequantized fp module is bfloat16 (MLX's default for those modes, as in mlx-lm's fuse).
    """
    if qp is None:
        return {"weight": _fuse_float(parts["weight"], factors)}
    bits, group = qp
    biases = parts.get("biases")
    if options.requant == "dequantize":
        w = mx.dequantize(parts["weight"], parts["scales"], biases, group_size=group, bits=bits, mode=mode)
        return {"weight": _fuse_float(w, factors)}
    out_bits, out_group, out_mode = options.output_format(qp, mode)
    if options.requant == "fresh" and factors is not None and factors.magnitude is not None:
        # DoRA: mlx-lm's DoRALinear.fuse op for op on the CPU stream. Its row norm is MLX's float32 reduction
        # (the kernel's is float64), and its float32 row factor makes the new scales and biases float32
        # whatever the model's dtype; only the same ops give the same bytes.
        with mx.stream(mx.cpu):
            w = mx.dequantize(parts["weight"], parts["scales"], biases, group_size=group, bits=bits, mode=mode)
            out = mx.quantize(_fuse_float(w, factors), group_size=out_group, bits=out_bits, mode=out_mode)
        return _named(out)
    kw = {}
    if options.requant == "calibrated" and calibration is None:
        raise ValueError("requant='calibrated' needs the module's calibration inputs")
    if factors is not None:
        kw = dict(lora_a=factors.a, lora_b=factors.b, scale=factors.scale, dora_magnitude=factors.magnitude)
        if factors.magnitude is not None and parts["weight"].ndim == 3:
            kw["dora_magnitude"] = mx.broadcast_to(factors.magnitude, parts["weight"].shape[:2])
    if options.requant == "calibrated":
        wq, s, b, calibration.fallback = fuse_calibrated(
            parts["weight"], parts["scales"], biases, group_size=group, bits=bits, mode=mode,
            hessian=calibration.hessians(), **kw
        )  # fmt: skip
        return _named((wq, s, b))
    fresh = options.requant == "fresh"
    out = fuse_quantized(
        parts["weight"],
        parts["scales"],
        biases,
        group_size=group,
        bits=bits,
        requant=options.requant,
        out_bits=out_bits if fresh else None,
        out_group_size=out_group if fresh else None,
        mode=mode,
        out_mode=out_mode if fresh else None,
        **kw,
    )
    return _named(out)


def _named(out) -> dict:
    """``(wq, scales[, biases])`` by suffix; an fp-mode output has no biases (None or absent)."""
    named = dict(zip(PARTS, out))
    if named.get("biases") is None:
        named.pop("biases", None)
    return named
