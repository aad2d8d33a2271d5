"""reqnoise: fuse LoRA adapters into MLX affine-quantized models and tell learning from requantization noise.

Heavy submodules (mlx, the native extension, mlx-lm) are imported on first use, so ``import reqnoise`` and the
statistics stay cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "fuse_quantized": "reqnoise.kernel.op",
    "fuse_model": "reqnoise.fuse.model",
    "noise_report": "reqnoise.noise.report",
    "ReqnoiseError": "reqnoise.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reqnoise' has no attribute {name!r}")
