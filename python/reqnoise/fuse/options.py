"""The options of a fuse, in one place: ``FuseOptions`` and the names its fields accept.

A fuse option is one field of ``FuseOptions``; its metadata (help, choices, argparse type) is what
``reqnoise fuse``/``reqnoise noise`` offer, its name is what a spec's ``[models.*]`` table accepts, and
``check`` is the one validation ``fuse_model``, ``noise_report`` and the runner go through. No mlx import:
the CLI builds its parser from this module. The requant modes are the kernel's format rules
(``kernel/formats.py``); the control names are defined here.
"""

from dataclasses import asdict, dataclass, field, fields

from reqnoise.errors import ReqnoiseError
from reqnoise.kernel.formats import (
    DEFAULT_MODE,
    MODES,
    REQUANT_MODES,
    SUPPORTED_BITS,
    SUPPORTED_MODES,
    check_width,
    mode_params,
)

# The zero control is requantization alone; random is a norm-matched random delta (fuse/controls.py).
CONTROLS = ("none", "zero", "random")


def parse_layers(text: str):
    """``"8,14,20"`` -> ``[8, 14, 20]`` (sorted, duplicates dropped): the ``--layers`` argument type."""
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--layers takes comma-separated layer indices like 8,14,20, got {text!r}") from None


def _option(default, help: str, *, choices=None, type=None):
    """A field with what the command line shows: ``help``, ``choices`` and the argparse ``type``."""
    return field(default=default, metadata={"help": help, "choices": choices, "type": type})


@dataclass(frozen=True)
class FuseOptions:
    """How an adapter (or a control) is fused; the defaults are mlx-lm's fuse of the adapter itself.

    A new option is one more field here (with its help text) plus its use in ``fuse_model``: the CLI flags,
    the spec's accepted keys, the runner's step parameters and ``noise_report`` follow from the fields.
    """

    requant: str = _option(
        "fresh",
        "fresh: what mlx-lm's fuse does; keep-grid: keep every group's scale and bias (a zero "
        "delta gives the identical model); calibrated: keep the grid and choose codes by error feedback from "
        "calibration activations (zero delta: identical model); dequantize: float output",
        choices=REQUANT_MODES,
    )
    out_bits: int | None = _option(
        None, "fresh only: re-quantize fused modules at this width", choices=SUPPORTED_BITS, type=int
    )
    control: str = _option(
        "none",
        "zero: zero delta through the same pipeline; random: norm-matched random delta",
        choices=CONTROLS,
    )
    seed: int = _option(0, "seed of the random control", type=int)
    # Layer indices as given (None: every adapted module); fuse_model reports them sorted.
    layers: list | None = _option(None, "fuse only these layer indices, e.g. 8,14,20", type=parse_layers)
    # After layers, so the positional order of the fields above stays what it was.
    calib_data: str | None = _option(
        None,
        "calibrated only: calibration data, a .jsonl file or directory in an mlx-lm format (chat, completions, "
        "text); default: the adapter's training data if its config names it, else built-in prompts",
    )
    calib_tokens: int | None = _option(None, "calibrated only: calibration tokens at most (default 4096)", type=int)
    # Last, so the positional order of the fields above stays what it was.
    out_mode: str | None = _option(
        None,
        "fresh only: re-quantize fused modules into this MLX mode (from an fp mode to affine: 8 bits, group 64 "
        "unless --out-bits says otherwise)",
        choices=SUPPORTED_MODES,
    )

    @classmethod
    def names(cls) -> tuple:
        """The option names, in declaration order (also the spec keys and the runner's step parameters)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_table(cls, table) -> "FuseOptions":
        """The options a mapping (a spec's ``[models.X]`` table, parsed arguments' ``vars``) sets; other keys
        are ignored, absent ones take the default."""
        return cls(**cls.table_subset(table))

    @classmethod
    def table_subset(cls, table) -> dict:
        """Only the fuse options ``table`` sets, as given: the runner hashes this into its step keys, so a
        default left implicit in a spec keeps the key it always had."""
        return {k: table[k] for k in cls.names() if k in table}

    @classmethod
    def merge(cls, options, keywords: dict, caller: str) -> "FuseOptions":
        """``options`` if given, else a FuseOptions of ``keywords`` (the fields given to ``caller`` as keyword
        arguments, as ``fuse_model(..., requant="keep-grid")`` always took them); not both."""
        unknown = sorted(set(keywords) - set(cls.names()))
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
        if options is None:
            return cls(**keywords)
        if not isinstance(options, cls):
            raise ReqnoiseError(f"options must be a FuseOptions, got {type(options).__name__}")
        if keywords:
            raise ReqnoiseError(
                f"pass the fuse options either as options= or as keywords, not both ({sorted(keywords)})"
            )
        return options

    def check(self) -> "FuseOptions":
        """Refuse an option value or combination the fuse cannot honour (ReqnoiseError); returns self."""
        if self.requant not in REQUANT_MODES:
            raise ReqnoiseError(f"requant must be one of {REQUANT_MODES}, got {self.requant!r}")
        if self.control not in CONTROLS:
            raise ReqnoiseError(f"control must be one of {CONTROLS}, got {self.control!r}")
        if self.out_mode is not None:
            if self.out_mode not in SUPPORTED_MODES:
                raise ReqnoiseError(f"out_mode must be one of {SUPPORTED_MODES}, got {self.out_mode!r}")
            if self.requant != "fresh":
                raise ReqnoiseError(
                    f"--out-mode re-quantizes from scratch and needs --requant fresh, not {self.requant}"
                )
        if self.out_bits is not None:
            if self.requant != "fresh":
                raise ReqnoiseError(
                    f"--out-bits re-quantizes from scratch and needs --requant fresh, not {self.requant}"
                )
            om = self.out_mode or DEFAULT_MODE
            try:
                # the group size is the module's own (or the fp mode's); any supported one pairs with any width
                check_width(self.out_bits, MODES[om].group_sizes[-1], "out_bits", om)
            except ValueError as err:
                raise ReqnoiseError(f"{err} (mode {om})" if om != DEFAULT_MODE else str(err)) from None
        if self.requant != "calibrated" and (self.calib_data is not None or self.calib_tokens is not None):
            raise ReqnoiseError(f"--calib-data/--calib-tokens need --requant calibrated, not {self.requant}")
        if self.calib_tokens is not None and (not isinstance(self.calib_tokens, int) or self.calib_tokens < 1):
            raise ReqnoiseError(f"calib_tokens must be a positive integer, got {self.calib_tokens!r}")
        if self.layers is not None:
            try:
                [int(x) for x in self.layers]
            except (TypeError, ValueError):
                raise ReqnoiseError(f"layers must be a list of layer indices, got {self.layers!r}") from None
        return self

    def output_format(self, qp, mode: str = DEFAULT_MODE):
        """``(bits, group_size, mode)`` of a module quantized as ``qp`` in ``mode`` after this fuse; None: float
        output (a float module, or ``dequantize``). keep-grid keeps the grid; fresh may change width and mode.

        Into another mode: an fp mode's fixed (bits, group); affine from an fp mode: ``out_bits`` or 8, group
        64 (the kernel's default); affine to affine keeps the group. A width the output mode lacks (e.g.
        ``--out-bits 8`` on an nvfp4 model without ``--out-mode``) is a ReqnoiseError.
        """
        if qp is None or self.requant == "dequantize":
            return None
        if self.requant != "fresh" or (not self.out_bits and self.out_mode in (None, mode)):
            return (*qp, mode)
        om = self.out_mode or mode
        if MODES[om].has_biases:
            bits = self.out_bits or (qp[0] if om == mode else 8)
            group = qp[1] if om == mode else 64
        else:
            bits, group = self.out_bits, None
        try:
            bits, group = mode_params(om, bits, group, "output")
        except ValueError as err:
            raise ReqnoiseError(f"cannot re-quantize a {mode} module into {om}: {err}") from None
        return (bits, group, om)

    def output_quant(self, qp, mode: str = DEFAULT_MODE):
        """The (bits, group_size) of ``output_format``; None: float output."""
        fmt = self.output_format(qp, mode)
        return None if fmt is None else fmt[:2]

    def to_dict(self) -> dict:
        return asdict(self)


def add_arguments(parser) -> None:
    """One ``--name`` argparse option per field, with the field's default, choices, type and help."""
    for f in fields(FuseOptions):
        kw = {"default": f.default, "help": f.metadata["help"]}
        if f.metadata["choices"] is not None:
            kw["choices"] = f.metadata["choices"]
        if f.metadata["type"] is not None:
            kw["type"] = f.metadata["type"]
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
