"""``reqnoise run`` (an experiment spec) and ``reqnoise demo`` (the stacking confound, end to end)."""


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
    from reqnoise.toy.demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.quiet)
    return 0
