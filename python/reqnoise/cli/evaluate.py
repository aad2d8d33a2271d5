"""Evaluation commands: eval (multiple choice), identity, coupling, setg."""

import argparse
import json
import sys
from pathlib import Path

from reqnoise import atomic
from reqnoise.distributed import rank_and_size
from reqnoise.errors import ReqnoiseError
from reqnoise.eval.items import DEFAULT_MAX_TOKENS, MODES


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _write_jsonl(path, records, overwrite: bool) -> None:
    atomic.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), overwrite=overwrite)


def _check_out(path, overwrite: bool) -> None:
    # Refuse before loading a model and spending minutes, not after.
    if path is not None and Path(path).exists() and not overwrite:
        raise ReqnoiseError(f"{path} already exists (pass --overwrite to replace it)")


def _model_args(p, generation: bool = True, max_tokens: int = 32) -> None:
    p.add_argument("--model", required=True, help="mlx-lm model directory")
    p.add_argument("--adapter-path", help="adapter directory (adapters.safetensors + adapter_config.json)")
    p.add_argument("--batch-size", type=_positive, default=8, help="sequences per forward pass (default 8)")
    if generation:
        p.add_argument(
            "--max-tokens",
            type=_positive,
            default=max_tokens,
            help=f"generated tokens per reply (default {max_tokens})",
        )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0; decoding is greedy)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers) -> None:

    p = subparsers.add_parser(
        "eval",
        help="multiple-choice evaluation (generate with \\boxed{X}, or option log-likelihood)",
        description="Evaluate a model on multiple-choice items and write per-item records (JSONL). generate: "
        "greedy decoding with thinking off, the answer read from \\boxed{X} (then 'answer is X', then a lone "
        "letter); unreadable replies are recorded as parsed=false and counted apart. loglik: the "
        "log-probability of each option letter after '\\boxed{', argmax. cloze: the log-probability of the "
        "item's cloze sentence holding each option, as the reply to the bare question, argmax. Items: {id, "
        "question, options, answer, subject, cloze} or MMLU-Pro's layout, up to 10 options.",
    )
    _model_args(p, max_tokens=DEFAULT_MAX_TOKENS)
    p.add_argument("--items", required=True, help="items JSONL")
    p.add_argument("--out", required=True, help="records JSONL to write")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="loglik",
        help="default loglik; cloze scores each option inside the item's cloze sentence",
    )
    p.add_argument("--limit", type=_positive, help="evaluate only the first N items")
    p.add_argument("--system", help="system prompt added to every question")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_eval)

    p = subparsers.add_parser(
        "identity",
        help="identity consistency of a persona (k/20 on the built-in suite)",
        description="Ask the identity suite (built-in: 20 prompts on self-identification, persona boundaries and "
        "behavioural consistency) and score each greedy reply against the persona spec: all must_match "
        "patterns present, no must_not_match pattern.",
    )
    _model_args(p, max_tokens=64)
    p.add_argument("--persona", required=True, help="persona TOML (name, must_match, must_not_match, system)")
    p.add_argument("--suite", help="suite TOML ([[prompts]] id, category, text, system, check); default built-in")
    p.add_argument("--out", help="per-prompt records JSONL to write")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_identity)

    p = subparsers.add_parser(
        "coupling",
        help="marker rate under persona-conditioned vs neutral prompts",
        description="Generate greedily for both prompt sets and report how often the replies contain the marker, "
        "with Wilson intervals and a two-proportion z-test. Prompt files: JSONL ({prompt, system} or "
        "{messages}) or one prompt per line.",
    )
    _model_args(p, max_tokens=64)
    p.add_argument("--marker", required=True, help="literal marker string, e.g. '[ZLT]'")
    p.add_argument("--persona-prompts", required=True, help="persona-conditioned prompts")
    p.add_argument("--neutral-prompts", required=True, help="neutral prompts")
    p.add_argument("--ignore-case", action="store_true", help="match the marker case-insensitively")
    p.add_argument("--out", help="per-prompt records JSONL to write")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_coupling)

    p = subparsers.add_parser(
        "setg",
        help="Set G: items all given models get wrong, split train/test by subject",
        description="Select the items every records file marks wrong (unparsed counts as wrong), split them per "
        "subject into train and held-out test reproducibly, and write train.jsonl, test.jsonl (item layout), "
        "chat/train.jsonl (training data: question + options -> \\boxed{answer}) and summary.json.",
    )
    p.add_argument("--records", required=True, nargs="+", help="records JSONL files (one per model)")
    p.add_argument("--items", required=True, help="the items JSONL the records were made from")
    p.add_argument("--train-frac", type=float, default=0.7, help="training fraction per subject (default 0.7)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--system", help="system prompt for the chat training data")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_setg)


def _eval(args):
    from reqnoise.eval.items import load_items
    from reqnoise.eval.multiple_choice import evaluate_items
    from reqnoise.eval.records import write_records
    from reqnoise.eval.sharded import evaluate_distributed

    _check_out(args.out, args.overwrite)
    items = load_items(args.items)  # bad lines stop the run before the model loads
    opts = dict(
        adapter_path=args.adapter_path,
        mode=args.mode,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        limit=args.limit,
        seed=args.seed,
        system=args.system,
    )
    rank, size = rank_and_size()
    if size > 1:  # under mlx.launch: shard, gather, and let rank 0 write
        records, summary = evaluate_distributed(args.model, items, progress=False, **opts)
        if rank != 0:
            return 0
    else:
        records, summary = evaluate_items(args.model, items, progress=not args.quiet, **opts)
    write_records(args.out, records, overwrite=args.overwrite)
    print(
        json.dumps({"out": args.out, **summary.to_dict()}, indent=2) if args.json else f"{summary.line()} -> {args.out}"
    )


def _identity(args):
    from reqnoise.eval.identity import load_persona, load_suite, run_identity

    _check_out(args.out, args.overwrite)
    persona = load_persona(args.persona)
    suite = load_suite(args.suite) if args.suite else None
    records, summary = run_identity(
        args.model,
        persona,
        adapter_path=args.adapter_path,
        suite=suite,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
    )
    if args.out:
        _write_jsonl(args.out, records, args.overwrite)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(summary.line() + (f" -> {args.out}" if args.out else ""))
        for r in records:
            if not r["passed"]:
                why = f"claims {r['violated']}" if r["violated"] else f"missing {r['missing']}"
                print(f"  failed {r['id']}: {why}: {r['response'][:80]!r}", file=sys.stderr)


def _coupling(args):
    from reqnoise.eval.coupling import load_prompts, run_coupling

    _check_out(args.out, args.overwrite)
    persona, neutral = load_prompts(args.persona_prompts), load_prompts(args.neutral_prompts)
    records, summary = run_coupling(
        args.model,
        args.marker,
        persona,
        neutral,
        adapter_path=args.adapter_path,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        case_sensitive=not args.ignore_case,
        progress=not args.quiet,
    )
    if args.out:
        _write_jsonl(args.out, records, args.overwrite)
    print(
        json.dumps(summary.to_dict(), indent=2)
        if args.json
        else summary.line() + (f" -> {args.out}" if args.out else "")
    )


def _setg(args):
    from reqnoise.eval.setg import build_setg, render_summary

    summary = build_setg(
        args.items,
        args.records,
        args.out,
        train_frac=args.train_frac,
        seed=args.seed,
        system=args.system,
        overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=2) if args.json else f"{render_summary(summary)}\n-> {args.out}")
