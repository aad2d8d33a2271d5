"""Control deltas: the zero delta (pure requantization) and norm-matched random deltas.

A random control replaces an adapted module's factors with Gaussian ones of the same rank, rescaled per
module (and per expert of a switch stack) so that ``||scale * b @ a||_F`` equals that of the adapter's own
delta. It separates "this adapter's content" from "any perturbation of this size".
"""

import zlib

import mlx.core as mx
import numpy as np

from reqnoise.fuse.adapters import ModuleAdapter
from reqnoise.fuse.options import CONTROLS


def delta_norms(a, b, scale: float) -> np.ndarray:
    """Frobenius norm of ``scale * b @ a`` per expert (a scalar array for a dense module), computed from the
    r x r Gram matrices in float64 without forming the dense delta: ||BA||^2 = sum((B^T B) * (A A^T))."""
    a = np.array(a, dtype=np.float64) if not isinstance(a, np.ndarray) else a.astype(np.float64)
    b = np.array(b, dtype=np.float64) if not isinstance(b, np.ndarray) else b.astype(np.float64)
    gram_b = np.swapaxes(b, -1, -2) @ b
    gram_a = a @ np.swapaxes(a, -1, -2)
    sq = (gram_b * gram_a).sum(axis=(-1, -2))
    return abs(scale) * np.sqrt(np.maximum(sq, 0.0))


def random_like(mod: ModuleAdapter, seed: int) -> ModuleAdapter:
    """Norm-matched random factors for one module. The stream depends on (seed, module path) only, so a
    module's control does not change when other modules are added or filtered out."""
    rng = np.random.default_rng([seed, zlib.crc32(mod.module.encode())])
    a = rng.standard_normal(mod.a.shape)
    b = rng.standard_normal(mod.b.shape)
    target = delta_norms(np.array(mod.a), np.array(mod.b), mod.scale)
    current = delta_norms(a, b, mod.scale)
    factor = np.divide(target, current, out=np.zeros_like(target), where=current > 0)
    b = b * np.asarray(factor)[..., None, None]
    return ModuleAdapter(
        mod.module, mx.array(a.astype(np.float32)), mx.array(b.astype(np.float32)), mod.scale, mod.magnitude
    )


def apply_control(mod: ModuleAdapter, control: str, seed: int):
    """The factors to fuse for ``control``: the adapter's own, None (zero delta: requantization only, no
    DoRA renormalisation either), or a norm-matched random draw."""
    if control == "none":
        return mod
    if control == "zero":
        return None
    if control == "random":
        return random_like(mod, seed)
    raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
