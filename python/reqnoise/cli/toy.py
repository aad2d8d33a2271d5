"""``reqnoise toy-model``: write the embedded small qwen3_moe model as an mlx-lm model directory."""

import argparse
from dataclasses import fields

from reqnoise.kernel.formats import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from reqnoise.toy.shape import DEFAULT_DTYPE, SUPPORTED_DTYPES, ToyShape


def _bits(text: str):
    if text.lower() in ("none", "0", "fp", "float"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits must be an integer or 'none', got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "toy-model",
        help="build the small offline qwen3_moe test model (random weights, quantized)",
        description="Build a small qwen3_moe model with random weights from --seed, a tokenizer trained on the "
        "spot, quantized with mlx-lm's own recipe (router at 8 bits), as a directory mlx_lm.load reads. "
        "Same arguments give byte-identical files.",
    )
    p.add_argument("--save-path", required=True, help="output model directory (must not exist unless --overwrite)")
    p.add_argument(
        "--bits",
        type=_bits,
        default=3,
        help=f"affine bits {'/'.join(map(str, SUPPORTED_BITS))}, or 'none' for unquantized (default 3)",
    )
    p.add_argument(
        "--group-size", type=int, default=64, choices=SUPPORTED_GROUP_SIZES, help="quantization group size (default 64)"
    )
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.add_argument(
        "--dtype",
        default=DEFAULT_DTYPE,
        choices=SUPPORTED_DTYPES,
        help=f"dtype of weights and quantization scales (default {DEFAULT_DTYPE}: fastest on CPU)",
    )
    for f in fields(ToyShape):  # one option per size: --num-layers, --num-experts, ...
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=int,
            default=f.default,
            help=f"{f.metadata['help']} (default {f.default})",
        )
    p.add_argument(
        "--mlp-std",
        type=float,
        nargs=2,
        metavar=("GATE_UP", "DOWN"),
        help="std of the MLP projections' weights (0.1 0.02: trained-like O(1) pre-activations; "
        "default 0.02 and 0.02/sqrt(2 layers), as the demo's toy)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save-path")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from reqnoise.toy.model import build_toy_model  # here: it loads numpy, which --help need not

    path = build_toy_model(
        args.save_path,
        ToyShape(**{f.name: getattr(args, f.name) for f in fields(ToyShape)}),
        bits=args.bits,
        group_size=args.group_size,
        seed=args.seed,
        dtype=args.dtype,
        mlp_std=None if args.mlp_std is None else tuple(args.mlp_std),
        overwrite=args.overwrite,
    )
    quant = "unquantized" if args.bits is None else f"{args.bits}-bit group {args.group_size}"
    print(f"wrote toy qwen3_moe model ({quant}, {args.dtype}, seed {args.seed}) to {path}")
    return 0
