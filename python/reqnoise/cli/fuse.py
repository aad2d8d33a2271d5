"""``reqnoise fuse``: fuse an mlx-lm adapter (or a control) into a model directory."""

from reqnoise.fuse.options import FuseOptions, add_arguments


def add_fuse_options(p) -> None:
    """Options shared by ``fuse`` and ``noise``: the model, the adapter and one flag per FuseOptions field."""
    p.add_argument("--model", required=True, help="mlx-lm model directory")
    p.add_argument("--adapter-path", required=True, help="mlx-lm adapter directory")
    add_arguments(p)


def register(sub) -> None:
    p = sub.add_parser("fuse", help="fuse an adapter into a quantized model directory, with controls")
    add_fuse_options(p)
    p.add_argument("--save-path", required=True, help="output model directory (created atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save-path")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from reqnoise.fuse.model import fuse_model  # imports mlx: only when the command runs

    report = fuse_model(
        args.model,
        args.adapter_path,
        args.save_path,
        options=FuseOptions.from_table(vars(args)),
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
