"""``reqnoise floor``: how many eval answers a zero-delta fuse of a target choice moves, before any training."""

import json
from dataclasses import fields
from pathlib import Path

from reqnoise import atomic
from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.options import FuseOptions
from reqnoise.noise.floor import CALIBRATIONS, DEFAULT_GROUPS, EVAL_MODES, FLOOR_REQUANTS  # mlx: lazily

GROUPS_HELP = (
    "groups of modules to requantize with a zero delta, each measured on its own: KIND[.MODULE][@LAYERS] with "
    "KIND attention, experts, router or all-linear (e.g. experts.down_proj@8,14,20, attention@0-3), layer:N, "
    "per-layer (one group per block), or an adapter directory (its modules); default: " + " ".join(DEFAULT_GROUPS)
)


def register(sub) -> None:
    p = sub.add_parser(
        "floor", help="requantization floor: answers a zero-delta fuse of each target group moves (in memory)"
    )
    p.add_argument("--model", required=True, help="mlx-lm model directory (quantized)")
    p.add_argument("--items", required=True, help="multiple-choice items JSONL")
    p.add_argument("--targets", nargs="+", default=list(DEFAULT_GROUPS), metavar="GROUP", help=GROUPS_HELP)
    p.add_argument(
        "--requant",
        nargs="+",
        default=list(FLOOR_REQUANTS),
        choices=FLOOR_REQUANTS,
        help="requant modes to measure (default both: fresh is what mlx-lm's fuse does; keep-grid must move nothing)",
    )
    out_bits = next(f for f in fields(FuseOptions) if f.name == "out_bits")
    p.add_argument(
        "--out-bits", type=int, default=None, choices=out_bits.metadata["choices"], help=out_bits.metadata["help"]
    )
    p.add_argument("--eval-mode", default="loglik", choices=EVAL_MODES, help="how items are scored (default loglik)")
    p.add_argument(
        "--calibrate",
        default="none",
        choices=CALIBRATIONS,
        help="mean option-prior calibration: own prior per copy (as a spec's calibrate = true) or the unfused "
        "model's prior shared by every copy (default none)",
    )
    p.add_argument(
        "--prior-from",
        default=None,
        help="with --calibrate shared: take the prior from these records (JSONL with option_logprobs, e.g. the "
        "model's records of the eval a Set G was built from) instead of from the model's records of --items",
    )
    p.add_argument("--batch-size", type=int, default=8, help="items per forward pass (default 8)")
    p.add_argument("--kl-items", type=int, default=64, help="items the output KL is read on (default 64)")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG bar chart here")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json/--plot files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    if not Path(args.items).is_file():
        raise ReqnoiseError(f"items file {args.items} does not exist")
    for out in (args.json, args.plot):
        if out and Path(out).exists() and not args.overwrite:
            raise ReqnoiseError(f"{out} already exists (pass --overwrite to replace it)")
    if args.batch_size < 1 or args.kl_items < 0:
        raise ReqnoiseError("--batch-size must be at least 1 and --kl-items at least 0")
    from reqnoise.noise.floor import floor, plot_floor, render_table

    rep = floor(
        args.model,
        args.items,
        args.targets,
        requants=args.requant,
        out_bits=args.out_bits,
        mode=args.eval_mode,
        batch_size=args.batch_size,
        calibrate=args.calibrate,
        kl_items=args.kl_items,
        prior_records=args.prior_from,
        progress=not args.quiet,
    )
    print(render_table(rep))
    if args.json:
        atomic.write_text(args.json, json.dumps(rep.to_dict(), indent=2) + "\n", overwrite=args.overwrite)
    if args.plot:
        plot_floor(rep, args.plot, overwrite=args.overwrite)
    return 0
