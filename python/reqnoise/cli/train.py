"""``reqnoise train`` (an adapter through mlx-lm's tuner) and ``reqnoise clean-data`` (chat data cleaning)."""

import json


def _layers(text: str):
    """``8,14,20`` or ranges like ``0-3,8``."""
    out = set()
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise ValueError(f"--layers takes layer indices like 8,14,20 or 0-3, got {text!r}") from None
    return sorted(out)


def _names(values):
    """Repeated and/or comma-separated options -> one list (None when not given)."""
    if values is None:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a LoRA/DoRA/full adapter with mlx-lm's tuner",
        description="Train an adapter with mlx-lm's tuner. Targets are chosen by module type: "
        "--modules down_proj --layers 8,14,20 reaches the expert stacks' down_proj "
        "(switch_mlp/experts/switch_glu) of exactly those layers. Chat data is "
        "rendered with thinking disabled.",
    )
    p.add_argument("--model", required=True, help="mlx-lm model directory (a fused model for stacking)")
    p.add_argument("--data", required=True, help="directory with train.jsonl (and valid.jsonl), chat format")
    p.add_argument("--adapter-path", required=True, help="output adapter directory (created atomically)")
    p.add_argument("--fine-tune-type", choices=["lora", "dora", "full"], default="lora")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=20.0, help="mlx-lm's LoRA scale (a plain multiplier)")
    p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--layers", type=_layers, default=None, help="block indices, e.g. 8,14,20 or 0-3")
    p.add_argument(
        "--modules",
        action="append",
        default=None,
        help="block-relative name suffixes, e.g. down_proj or self_attn.q_proj (comma-separated "
        "or repeated); default: every linear-type module in the selected blocks",
    )
    p.add_argument(
        "--keys",
        action="append",
        default=None,
        help="exact full module paths (comma-separated or repeated); exclusive with --layers/--modules",
    )
    p.add_argument("--mask-prompt", action="store_true", help="train only on the last assistant message")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --adapter-path")
    p.add_argument("--quiet", action="store_true", help="no training display")
    p.add_argument("--summary-json", default=None, help="also write the training summary to this JSON file")
    p.set_defaults(func=run_train)

    c = sub.add_parser(
        "clean-data",
        help="drop short/meta responses, shorten system prompts (chat JSONL)",
        description="Clean chat training data: drop examples whose last assistant response is "
        "shorter than --min-chars or contains a drop pattern; with --system, "
        "replace the system prompt by that one line. IN and OUT are JSONL files or "
        "directories of train/valid/test.jsonl.",
    )
    c.add_argument("input", metavar="IN")
    c.add_argument("output", metavar="OUT")
    c.add_argument("--min-chars", type=int, default=10)
    c.add_argument("--system", default=None, help="one-line system prompt for every kept example")
    c.add_argument(
        "--drop-pattern",
        action="append",
        default=None,
        metavar="P",
        help="literal substring that drops a response (repeatable; replaces the defaults)",
    )
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    c.set_defaults(func=run_clean)


def _compact(paths) -> str:
    from reqnoise.fuse.model_io import layer_index

    groups: dict = {}
    for p in paths:
        li = layer_index(p)
        rel = p if li is None else p.split(f"layers.{li}.", 1)[1]
        groups.setdefault(rel, []).append(li)
    return "; ".join(rel if ls == [None] else f"{rel} in layers {','.join(map(str, ls))}" for rel, ls in groups.items())


def run_train(args) -> int:
    from pathlib import Path

    from reqnoise.atomic import write_text
    from reqnoise.errors import ReqnoiseError
    from reqnoise.train.tuner import train_adapter

    if args.summary_json and Path(args.summary_json).exists() and not args.overwrite:
        raise ReqnoiseError(f"{args.summary_json} already exists (pass --overwrite to replace it)")
    summary = train_adapter(
        args.model,
        args.data,
        args.adapter_path,
        fine_tune_type=args.fine_tune_type,
        rank=args.rank,
        scale=args.scale,
        lr=args.lr,
        iters=args.iters,
        batch_size=args.batch_size,
        layers=args.layers,
        modules=_names(args.modules),
        keys=_names(args.keys),
        mask_prompt=args.mask_prompt,
        seed=args.seed,
        max_seq_length=args.max_seq_length,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    from reqnoise.distributed import rank_and_size

    if rank_and_size()[0] != 0:  # under mlx.launch (data-parallel) rank 0 wrote the adapter and reports
        return 0
    first = summary["train_losses"][0][1]
    print(
        f"trained {summary['trainable_parameters']:,} parameters ({summary['fine_tune_type']}) in "
        f"{len(summary['modules'])} module(s): {_compact(summary['modules'])}"
    )
    print(
        f"train loss {first:.4f} (first report) -> {summary['final_train_loss']:.4f} (last) over "
        f"{summary['iters']} iterations, {summary['iterations_per_second']:.2f} it/s, "
        f"{summary['seconds']:.1f}s; adapter written to {summary['adapter_path']}"
    )
    if summary["val_losses"]:
        (i0, v0), (i1, v1) = summary["val_losses"][0], summary["val_losses"][-1]
        print(f"validation loss {v0:.4f} (iteration {i0}) -> {v1:.4f} (iteration {i1})")
    if args.summary_json:
        write_text(args.summary_json, json.dumps(summary, indent=2) + "\n", overwrite=args.overwrite)
    return 0


def run_clean(args) -> int:
    from reqnoise.train.clean_data import DEFAULT_DROP_PATTERNS, clean_chat_data

    patterns = DEFAULT_DROP_PATTERNS if args.drop_pattern is None else tuple(args.drop_pattern)
    counts = clean_chat_data(
        args.input,
        args.output,
        min_chars=args.min_chars,
        system=args.system,
        drop_patterns=patterns,
        overwrite=args.overwrite,
    )
    for name, c in counts["files"].items():
        skipped = ", ".join(f"{reason} {n}" for reason, n in c["skipped"].items())
        system = (
            f"; system prompt replaced {c['system_replaced']}, inserted {c['system_inserted']}"
            if args.system is not None
            else ""
        )
        print(f"{name}: read {c['read']}, kept {c['kept']}, skipped {c['read'] - c['kept']} ({skipped}){system}")
    print(f"wrote {args.output}")
    return 0
