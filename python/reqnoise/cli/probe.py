"""``reqnoise probe``: per-layer persona representation of several models and how it moved between them."""

import json
from pathlib import Path

from reqnoise.atomic import write_text
from reqnoise.errors import ReqnoiseError


def register(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="persona centroids/directions per layer and their shift between models",
        description="Read each model's block outputs (last prompt token; mean over reply tokens when the "
        "prompts carry replies) on persona prompts and optional contrast prompts, one model loaded at a "
        "time; compare models per layer: cosine of persona directions, centroid shift over the first "
        "model's spread, a difference-of-means probe fit on one model and tested on the other "
        "(permutation p-value).",
    )
    p.add_argument("--models", nargs="+", required=True, metavar="DIR", help="two or more mlx-lm model directories")
    p.add_argument("--prompts", required=True, help="persona prompts: JSONL of {prompt, reply?, system?} or chats")
    p.add_argument("--contrast", default=None, help="contrast (neutral) prompts, same format")
    p.add_argument("--layers", default=None, help="block indices, e.g. 0-3 or 8,14,20 (default: all)")
    p.add_argument("--adapter", default=None, help="adapter directory: cosine of its change with the direction")
    p.add_argument("--adapter-on", type=int, default=0, help="index in --models the adapter applies to")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--permutations", type=int, default=2000, help="label permutations for the probe p-value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the full result here")
    p.add_argument("--plot", default=None, help="write the per-pair plot here (PNG)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run_probe)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def run_probe(args) -> int:
    from reqnoise.cli.train import _layers
    from reqnoise.eval.probe import plot_probe, probe_models

    for out in (args.json, args.plot):
        if out and Path(out).exists() and not args.overwrite:
            raise ReqnoiseError(f"{out} already exists (pass --overwrite to replace it)")
    if args.permutations < 1:
        raise ReqnoiseError(f"--permutations must be at least 1, got {args.permutations}")
    result = probe_models(
        args.models,
        args.prompts,
        contrast=args.contrast,
        layers=None if args.layers is None else _layers(args.layers),
        adapter=args.adapter,
        adapter_on=args.adapter_on,
        batch_size=args.batch_size,
        permutations=args.permutations,
        seed=args.seed,
        progress=not args.quiet,
    )
    for pair in result["pairs"]:
        print(f"{pair['a']} -> {pair['b']}")
        for place in result["places"]:
            for r in pair[place]:
                extra = ""
                if "cosine" in r:
                    extra = (
                        f"  cos {_fmt(r['cosine'])}  probe acc A {_fmt(r['probe_acc_a'])} "
                        f"B {_fmt(r['probe_acc_b'])} (p {_fmt(r['probe_p_b'])})"
                    )
                print(f"  {place:<11} layer {r['layer']:>3}: shift/spread {_fmt(r['shift'])}{extra}")
    if "adapter" in result:
        for place in result["places"]:
            for r in result["adapter"][place]:
                print(
                    f"adapter {place} layer {r['layer']}: change {_fmt(r['change_norm'])}, "
                    f"cos to direction {_fmt(r['cosine_to_direction'])}"
                )
    if args.json:
        write_text(args.json, json.dumps(result, indent=2) + "\n", overwrite=args.overwrite)
    if args.plot:
        plot_probe(result, args.plot)
    return 0
