"""``reqnoise noise``: does the adapter survive the fuse? Per layer and expert, before any evaluation."""

import json
from pathlib import Path

from reqnoise import atomic
from reqnoise.cli.fuse import add_fuse_options
from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.options import FuseOptions


def register(sub) -> None:
    p = sub.add_parser("noise", help="requantization-noise report: does the adapter survive the fuse?")
    add_fuse_options(p)
    p.add_argument("--prompts", default=None, help="probe prompts, one per line (default: a built-in set)")
    p.add_argument("--json", default=None, help="write the full report as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG (survival heatmap and curve) here")
    p.add_argument("--no-outputs", action="store_true", help="weight-level metrics only (no model loads)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --json/--plot files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def run(args) -> int:
    from reqnoise.noise.report import noise_report  # imports mlx: only when the command runs

    prompts = None
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise ReqnoiseError(f"prompts file {path} does not exist")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ReqnoiseError(f"prompts file {path} has no non-empty line")
    for out in (args.json, args.plot):
        if out and Path(out).exists() and not args.overwrite:
            raise ReqnoiseError(f"{out} already exists (pass --overwrite to replace it)")
    rep = noise_report(
        args.model,
        args.adapter_path,
        options=FuseOptions.from_table(vars(args)),
        prompts=prompts,
        outputs=not args.no_outputs,
        progress=not args.quiet,
    )
    by_module = {}
    for r in rep["modules"]:
        by_module.setdefault(r["module"], []).append(r)
    print(f"{'module':52s} {'experts':>7s} {'codes':>7s} {'cosine':>7s} {'rms/step':>8s}")
    for name, rows in by_module.items():
        cos = [r["delta_cosine"] for r in rows if r["delta_cosine"] is not None]
        codes = [r["code_change_frac"] for r in rows if r["code_change_frac"] is not None]
        steps = [r["delta_rms_over_step"] for r in rows if r["delta_rms_over_step"]]
        med = lambda v: sorted(v)[len(v) // 2] if v else None  # noqa: E731
        print(
            f"{name:52s} {len(rows) if rows[0]['expert'] is not None else '-':>7} "
            f"{_fmt(med(codes), '.1%'):>7s} {_fmt(med(cos)):>7s} {_fmt(med(steps), '.2f'):>8s}"
        )
    o = rep["outputs"]
    if o:
        print(
            f"outputs on {o['prompts']} prompts: KL(adapter||fused) {o['kl_adapter_fused']:.4f}, "
            f"KL(adapter||base) {o['kl_adapter_base']:.4f}; top-1 fused=adapter {o['top1_fused_vs_adapter']:.0%}, "
            f"fused=base {o['top1_fused_vs_base']:.0%}"
        )
    print(rep["verdict"])
    if args.json:
        atomic.write_text(args.json, json.dumps(rep, indent=2) + "\n", overwrite=args.overwrite)
    if args.plot:
        from reqnoise.noise.plot import plot_noise

        plot_noise(rep, args.plot, overwrite=args.overwrite)
    return 0
