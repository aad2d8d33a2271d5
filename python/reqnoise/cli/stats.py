"""Statistics commands: compare, power, decompose, preregister, verdict."""

import argparse
import json

from reqnoise.errors import ReqnoiseError


def _json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)


def _compare(args):
    from reqnoise.eval.records import read_records
    from reqnoise.stats.inference import compare, equivalence, render_comparison

    c = compare(
        read_records(args.a), read_records(args.b), alpha=args.alpha, power=args.power, flip_rate=args.flip_rate
    )
    eq = None if args.margin is None else equivalence(c, args.margin)
    if args.json:
        out = {"a": str(args.a), "b": str(args.b), **c.to_dict()}
        if eq is not None:
            out["equivalence"] = eq.to_dict()
        print(_json(out))
    else:
        print(f"A = {args.a}\nB = {args.b}\n")
        print(render_comparison(c, "A", "B"), end="")
        if eq is not None:
            print(f"equivalence (TOST, alpha {eq.alpha:g}): {eq.describe()}")


def _power(args):
    from reqnoise.stats import inference as stats

    if args.p is None and args.flip_rate is None:
        raise ReqnoiseError("give --p (accuracy, for the unpaired design) and/or --flip-rate (for the paired one)")
    design = f"alpha {args.alpha:g} (two-sided), power {args.power:g}"
    out = {"alpha": args.alpha, "power": args.power}
    lines = []
    if args.n is not None:
        out["n"] = args.n
        lines.append(f"n = {args.n} items per arm, {design}")
        if args.p is not None:
            out["unpaired_mde"] = stats.unpaired_mde(args.n, args.p, args.alpha, args.power)
            lines.append(
                f"unpaired MDE (two-proportion z-test, accuracy ~{args.p:g}): {100 * out['unpaired_mde']:.2f} pp"
            )
        if args.flip_rate is not None:
            out["paired_mde"] = stats.paired_mde(args.n, args.flip_rate, args.alpha, args.power)
            lines.append(f"paired MDE (same items, flip rate {args.flip_rate:g}): {100 * out['paired_mde']:.2f} pp")
    else:
        out["mde"] = args.mde
        lines.append(f"MDE = {100 * args.mde:g} pp, {design}")
        if args.p is not None:
            out["unpaired_n"] = stats.unpaired_n_needed(args.mde, args.p, args.alpha, args.power)
            lines.append(
                f"unpaired (two-proportion z-test, accuracy ~{args.p:g}): n = {out['unpaired_n']} items per arm"
            )
        if args.flip_rate is not None:
            out["paired_n"] = stats.paired_n_needed(args.mde, args.flip_rate, args.alpha, args.power)
            lines.append(f"paired (same items, flip rate {args.flip_rate:g}): n = {out['paired_n']} items")
    print(_json(out) if args.json else "\n".join(lines))


def _decompose(args):
    from reqnoise.eval.records import read_records
    from reqnoise.stats.inference import decompose, render_decomposition

    dec = decompose(
        read_records(args.base),
        read_records(args.trained),
        read_records(args.zero_control),
        [read_records(p) for p in args.random_control or []],
    )
    print(_json(dec.to_dict()) if args.json else render_decomposition(dec), end="\n" if args.json else "")


def _preregister(args):
    from reqnoise.stats.prereg import lock_criteria

    lock = lock_criteria(args.criteria, args.out, overwrite=args.overwrite)
    print(
        f"locked {args.criteria} -> {args.out}\n  SHA-256 {lock['criteria_sha256']}\n"
        f"  at {lock['locked_at']}\n  {lock['rule']}: {' '.join(lock['expression'].split())}\n"
        f"  conditions: {', '.join(lock['conditions'])}"
    )


def _verdict(args):
    from dataclasses import asdict

    from reqnoise.stats.prereg import evaluate_lock

    v = evaluate_lock(args.lock, args.results)
    if args.json:
        d = asdict(v)
        d.pop("lock")
        d.pop("text")
        print(_json(d))
    else:
        print(v.text, end="")


def _fraction(text):
    # argparse turns ArgumentTypeError into a one-line usage error naming the option.
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return v


def _add_design(p):
    p.add_argument("--alpha", type=float, default=0.05, help="two-sided significance level (default 0.05)")
    p.add_argument("--power", type=float, default=0.8, help="power for the MDE (default 0.8)")


def register(subparsers):
    p = subparsers.add_parser(
        "compare",
        help="compare two per-item result files (paired by id)",
        description="Accuracies with Wilson CIs, B - A difference with its paired confidence interval (Newcombe's "
        "hybrid score), unpaired z-test and paired McNemar p, fixed/broken items, MDE at a planning flip rate.",
    )
    p.add_argument("a", help="reference condition records (JSONL)")
    p.add_argument("b", help="compared condition records (JSONL)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument(
        "--flip-rate",
        type=_fraction,
        help="planning flip rate for the paired MDE, declared before looking (default: the upper end of the "
        "Wilson interval of the observed discordance rate; the observed rate itself is never used)",
    )
    p.add_argument(
        "--margin",
        type=_fraction,
        help="equivalence margin as a fraction (0.05 = 5 pp): also say whether B and A are equivalent within it "
        "(TOST: the 1 - 2 alpha paired CI inside +-margin), differ, or neither",
    )
    _add_design(p)
    p.set_defaults(func=_compare)

    p = subparsers.add_parser(
        "power",
        help="minimal detectable effect for n, or n for an effect",
        description="Unpaired (--p) and/or paired (--flip-rate) design power.",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--n", type=int, help="items (per arm for the unpaired design)")
    g.add_argument("--mde", type=float, help="effect to detect, as a fraction (0.05 = 5 pp)")
    p.add_argument("--p", type=float, help="expected accuracy (fraction) for the unpaired design")
    p.add_argument("--flip-rate", type=float, help="fraction of items changing correctness between arms")
    p.add_argument("--json", action="store_true")
    _add_design(p)
    p.set_defaults(func=_power)

    p = subparsers.add_parser(
        "decompose",
        help="split a gain into requantization artifact and content effect",
        description="artifact = zero_control - base, content = trained - zero_control, band of random-delta controls.",
    )
    p.add_argument("--base", required=True, help="unfused base model records")
    p.add_argument("--trained", required=True, help="trained adapter, fused + requantized")
    p.add_argument("--zero-control", required=True, help="zero-delta adapter through the same pipeline")
    p.add_argument("--random-control", nargs="*", help="random-delta adapters of the trained adapter's size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_decompose)

    p = subparsers.add_parser(
        "preregister",
        help="lock kill criteria (text, SHA-256, UTC time) before results",
        description="Criteria file format: see `python -m pydoc reqnoise.stats.prereg`.",
    )
    p.add_argument("criteria", help="criteria TOML file")
    p.add_argument("--out", required=True, help="lock file to write (JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing lock")
    p.set_defaults(func=_preregister)

    p = subparsers.add_parser(
        "verdict",
        help="evaluate locked criteria on result files",
        description="Exit 2 if the criteria changed since locking or a result file is older than the lock.",
    )
    p.add_argument("lock", help="lock file written by `reqnoise preregister`")
    p.add_argument("--results", required=True, help="directory holding <CONDITION>.jsonl for every condition")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_verdict)
