"""``reqnoise run`` (an experiment spec) and ``reqnoise demo`` (the stacking confound, end to end)."""

# Beyond a few ranks the demo's waves hold too few independent steps to keep them busy.
DEMO_MAX_RANKS = 4


def register(sub) -> None:
    p = sub.add_parser("run", help="run an experiment spec (train, fuse, noise, evaluate, compare, verdict)")
    p.add_argument("spec", help="spec TOML file (see reqnoise.experiment.spec for the format)")
    p.add_argument("--out", required=True, help="output directory; an existing one is resumed from its cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)

    d = sub.add_parser("demo", help="reproduce the stacking confound in miniature on the embedded model, offline")
    d.add_argument(
        "--out", default="reqnoise-demo", help="output directory (default: ./reqnoise-demo); an existing one is resumed"
    )
    d.add_argument("--quick", action="store_true", help="a smaller world and fewer iterations (a smoke test)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument(
        "--ranks",
        type=int,
        default=None,
        help="processes on this machine, one ring group (MLX runs a CPU model's ops on one thread each); "
        f"default: the CPU count up to {DEMO_MAX_RANKS}; the results are the same bytes for any number",
    )
    d.set_defaults(func=demo)


def run(args) -> int:
    from reqnoise.experiment.runner import run_spec

    results = run_spec(args.spec, args.out, progress=not args.quiet)
    if not results:  # a rank other than 0 under mlx.launch: rank 0 reports
        return 0
    v = results.get("verdict")
    print(f"results in {args.out}/results.json and {args.out}/report.md")
    if v:
        print(
            ("kill criterion met" if v["met"] else "kill criterion not met")
            + ("" if v["preregistered"] else " (post hoc: the criteria were NOT pre-registered for these results)")
        )
    return 0


def demo(args) -> int:
    import os

    from reqnoise.distributed import launched, run_local_ranks
    from reqnoise.errors import ReqnoiseError
    from reqnoise.toy.demo import run_demo

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = args.ranks if args.ranks is not None else min(cpus, DEMO_MAX_RANKS)
    if ranks < 1:
        raise ReqnoiseError(f"--ranks must be at least 1, got {ranks}")
    if ranks > 1 and not launched():
        print(f"running on {ranks} ranks on this machine (MLX ring backend); --ranks 1 runs in this process")
        flags = [f for f, on in (("--quick", args.quick), ("--quiet", args.quiet)) if on]
        return run_local_ranks(["demo", "--out", str(args.out), *flags, "--ranks", str(ranks)], ranks)
    run_demo(args.out, quick=args.quick, progress=not args.quiet)
    return 0
