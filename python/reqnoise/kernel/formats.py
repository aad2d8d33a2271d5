"""MLX's quantization formats as plain data: the modes, and the widths and group sizes reqnoise supports in each.

The one home of these constants. It imports no mlx, so the CLI (choices in ``--help``), the spec checker and the
toy model read them without loading MLX; ``kernel/quant_format.py`` adds the checks that need mlx arrays, and
the native kernel's own list (``_core.supported_bits()``) is tested against this one.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantMode:
    """One MLX quantization mode as reqnoise handles it.

    ``bits``/``group_sizes``: the (code width, values per group) reqnoise accepts; ``has_biases``: whether the
    mode stores a bias per group beside the scale (affine does, the floating-point modes do not);
    ``scale_kind``: how a scale is stored ("float": in the weights' dtype; "e8m0": a uint8 power-of-two
    exponent; "e4m3": a uint8 FP8 value); ``code``: the element code ("int", "e2m1", "e4m3"); ``kernel_id``:
    the mode's number in the native kernel (csrc/fuse_kernel.h QuantModeId).
    """

    name: str
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    has_biases: bool
    scale_kind: str = "float"
    code: str = "int"
    kernel_id: int = 0


# MLX 0.32 knows four modes: affine (bits 1-8 but 7, groups 32/64/128), mxfp4 (4 bits, group 32), mxfp8 (8, 32)
# and nvfp4 (4, 16); the native kernel implements all four (1-bit affine excepted). The floating-point modes'
# rules, measured against mx.quantize: docs/mlx-fp-formats.md; their codec: csrc/fp_codec.h.
MODES = {
    "affine": QuantMode("affine", bits=(2, 3, 4, 5, 6, 8), group_sizes=(32, 64, 128), has_biases=True),
    "mxfp4": QuantMode("mxfp4", (4,), (32,), False, scale_kind="e8m0", code="e2m1", kernel_id=1),
    "nvfp4": QuantMode("nvfp4", (4,), (16,), False, scale_kind="e4m3", code="e2m1", kernel_id=2),
    "mxfp8": QuantMode("mxfp8", (8,), (32,), False, scale_kind="e8m0", code="e4m3", kernel_id=3),
}
FP_MODES = tuple(m for m in MODES if not MODES[m].has_biases)
SUPPORTED_MODES = tuple(MODES)
DEFAULT_MODE = "affine"

# The affine mode's, under the names the rest of the package has always used.
SUPPORTED_BITS = MODES["affine"].bits
SUPPORTED_GROUP_SIZES = MODES["affine"].group_sizes

# What a fuse does to a quantized module's grid. The native kernel does fresh (requantize as mx.quantize),
# keep-grid (re-encode against the stored scales and biases) and calibrated (the stored grid too, codes chosen by
# error feedback from calibration activations); the model-level fuse adds dequantize (float output, mlx's own
# arithmetic, never the kernel). Both tuples live here so the kernel needs nothing from fuse/.
KERNEL_REQUANTS = ("fresh", "keep-grid", "calibrated")
REQUANT_MODES = (*KERNEL_REQUANTS, "dequantize")


def check_width(bits, group_size, what: str = "", mode: str = DEFAULT_MODE) -> None:
    """Refuse a (bits, group_size) pair that ``mode`` does not support (ValueError naming ``what``)."""
    pre = f"{what}: " if what else ""
    if mode not in MODES:
        raise ValueError(f"{pre}mode must be one of {SUPPORTED_MODES}, got {mode!r}")
    fmt = MODES[mode]
    if bits not in fmt.bits:
        raise ValueError(f"{pre}bits must be one of {fmt.bits}, got {bits!r}")
    if group_size not in fmt.group_sizes:
        raise ValueError(f"{pre}group_size must be one of {fmt.group_sizes}, got {group_size!r}")


def mode_params(mode: str, bits=None, group_size=None, what: str = "") -> tuple[int, int]:
    """``(bits, group_size)`` of ``mode``: a floating-point mode's fixed pair when not given; checked."""
    if mode not in MODES:
        pre = f"{what}: " if what else ""
        raise ValueError(f"{pre}mode must be one of {SUPPORTED_MODES}, got {mode!r}")
    fmt = MODES[mode]
    if not fmt.has_biases:
        bits = fmt.bits[0] if bits is None else bits
        group_size = fmt.group_sizes[0] if group_size is None else group_size
    check_width(bits, group_size, what, mode)
    return bits, group_size


def logical_in_dim(wq_last: int, bits: int) -> int:
    """Number of values per row encoded by ``wq_last`` uint32 words of ``bits``-bit codes."""
    return wq_last * 32 // bits
