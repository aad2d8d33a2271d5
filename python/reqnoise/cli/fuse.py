"""``reqnoise fuse``: fuse an mlx-lm adapter (or a control) into a model directory."""


def _layers(text: str):
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--layers takes comma-separated layer indices like 8,14,20, got {text!r}") from None


def add_fuse_options(p) -> None:
    """Options shared by ``fuse`` and ``noise``."""
    p.add_argument("--model", required=True, help="mlx-lm model directory")
    p.add_argument("--adapter-path", required=True, help="mlx-lm adapter directory")
    p.add_argument(
        "--requant",
        choices=["fresh", "keep-grid", "dequantize"],
        default="fresh",
        help="fresh: what mlx-lm's fuse does; keep-grid: keep every group's scale and bias (a zero "
        "delta gives the identical model); dequantize: float output",
    )
    p.add_argument(
        "--out-bits",
        type=int,
        choices=[2, 3, 4, 5, 6, 8],
        default=None,
        help="fresh only: re-quantize fused modules at this width",
    )
    p.add_argument(
        "--control",
        choices=["none", "zero", "random"],
        default="none",
        help="zero: zero delta through the same pipeline; random: norm-matched random delta",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random control")
    p.add_argument("--layers", type=_layers, default=None, help="fuse only these layer indices, e.g. 8,14,20")


def register(sub) -> None:
    p = sub.add_parser("fuse", help="fuse an adapter into a quantized model directory, with controls")
    add_fuse_options(p)
    p.add_argument("--save-path", required=True, help="output model directory (created atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save-path")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from reqnoise.fuse.model import fuse_model

    report = fuse_model(
        args.model,
        args.adapter_path,
        args.save_path,
        requant=args.requant,
        out_bits=args.out_bits,
        control=args.control,
        seed=args.seed,
        layers=args.layers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(
        f"fused {len(report.modules)} module(s) ({report.requant}, control={report.control}) into "
        f"{report.save_path} in {report.seconds:.1f}s; {len(report.rewritten_shards)} shard(s) rewritten, "
        f"{len(report.copied_shards)} copied"
        + (
            f"; {len(report.ignored_modules)} adapter module(s) outside --layers ignored"
            if report.ignored_modules
            else ""
        )
    )
    return 0
