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
    held = p.add_mutually_exclusive_group()
    held.add_argument(
        "--prompts",
        default=None,
        help="held-out prompts, one per line (default: the built-in probe prompts minus the calibration prompts)",
    )
    held.add_argument(
        "--heldout-data",
        default=None,
        help="held-out data instead: an mlx-lm dataset file (chat, completions, text) or a directory with "
        "valid.jsonl; under --requant calibrated it must not overlap the calibration data",
    )
    p.add_argument(
        "--heldout-tokens",
        type=int,
        default=None,
        help="held-out tokens at most (default 1024; the adapter's and base model's logits of each are kept)",
    )
    p.add_argument("--json", default=None, help="write the full report as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG (survival heatmap and curve) here")
    p.add_argument(
        "--no-outputs",
        action="store_true",
        help="weight-level metrics only: no held-out measures, no model loads (calibrated still runs the "
        "adapter model on its calibration data)",
    )
    p.add_argument(
        "--compare-calibrated",
        action="store_true",
        help="also fuse under --requant calibrated (the adapter's own training data, else the built-in prompts) "
        "and measure its residual over effect on the same held-out inputs; the verdict says which keeps more",
    )
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
    extra = {} if args.heldout_tokens is None else {"heldout_tokens": args.heldout_tokens}
    rep = noise_report(
        args.model,
        args.adapter_path,
        options=FuseOptions.from_table(vars(args)),
        prompts=prompts,
        heldout_data=args.heldout_data,
        outputs=not args.no_outputs,
        compare_calibrated=args.compare_calibrated,
        progress=not args.quiet,
        **extra,
    )
    print_report(rep)
    if args.json:
        atomic.write_text(args.json, json.dumps(rep, indent=2) + "\n", overwrite=args.overwrite)
    if args.plot:
        from reqnoise.noise.plot import plot_noise

        plot_noise(rep, args.plot, overwrite=args.overwrite)
    return 0


def print_report(rep) -> None:
    """The text table (per module: medians over its experts; res/eff and out-cos pooled over them) and the
    held-out, calibration and output lines."""
    by_module = {}
    for r in rep["modules"]:
        by_module.setdefault(r["module"], []).append(r)
    held = {m["module"]: m for m in rep.get("heldout_modules") or []}
    print(
        f"{'module':52s} {'experts':>7s} {'codes':>7s} {'cosine':>7s} {'rms/step':>8s} {'res/eff':>7s} {'out-cos':>7s}"
    )
    for name, rows in by_module.items():
        cos = [r["delta_cosine"] for r in rows if r["delta_cosine"] is not None]
        codes = [r["code_change_frac"] for r in rows if r["code_change_frac"] is not None]
        steps = [r["delta_rms_over_step"] for r in rows if r["delta_rms_over_step"]]
        med = lambda v: sorted(v)[len(v) // 2] if v else None  # noqa: E731
        h = held.get(name, {})
        print(
            f"{name:52s} {len(rows) if rows[0]['expert'] is not None else '-':>7} "
            f"{_fmt(med(codes), '.1%'):>7s} {_fmt(med(cos)):>7s} {_fmt(med(steps), '.2f'):>8s} "
            f"{_fmt(h.get('residual_over_effect')):>7s} {_fmt(h.get('output_cosine')):>7s}"
        )
    c = rep.get("calibration")
    if c:
        print(
            f"calibration: {c['source']} (sha256 {c['sha256'][:12]}), {c['tokens']} tokens in {c['sequences']} "
            f"sequences; {c['fallback_entries']} expert(s) with fewer than {c['min_expert_tokens']} rows rounded "
            "as keep-grid"
        )
    hd = rep.get("heldout")
    if hd:
        dropped = hd["dropped_overlapping_calibration"]
        against = hd["disjoint_from"]
        print(
            f"held out: {hd['source']}, {hd['sequences']} sequences, {hd['tokens']} tokens"
            + (f" ({len(dropped)} probe prompt(s) dropped: in the calibration data)" if dropped else "")
            + (
                f"; checked disjoint from {against['source']} (sha256 {against['sha256'][:12]})"
                if against
                else "; not checked against calibration data"
            )
        )
    o = rep["outputs"]
    if o:
        s = rep["summary"]
        print(
            f"outputs at {o['positions']} held-out positions ({o['prompts']} sequences): KL(adapter||fused) "
            f"{o['kl_adapter_fused']:.4g}, KL(adapter||base) {o['kl_adapter_base']:.4g}, ratio "
            f"{_fmt(o['kl_ratio'])}; logit-change cosine {_fmt(o['logit_change_cosine'])}; top-1 fused=adapter "
            f"{o['top1_fused_vs_adapter']:.0%}, fused=base {o['top1_fused_vs_base']:.0%}; median over modules: "
            f"residual/effect {_fmt(s['median_residual_over_effect'])}, output cosine {_fmt(s['median_output_cosine'])}"
        )
    print(rep["verdict"])
