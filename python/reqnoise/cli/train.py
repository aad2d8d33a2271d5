"""``reqnoise train`` (an adapter through mlx-lm's tuner) and ``reqnoise clean-data`` (chat data cleaning)."""

import json
from dataclasses import fields
from pathlib import Path

from reqnoise.atomic import write_text
from reqnoise.distributed import rank_and_size
from reqnoise.errors import ReqnoiseError
from reqnoise.train.clean_data import DEFAULT_DROP_PATTERNS, clean_chat_data
from reqnoise.train.config import TrainConfig


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


# What the command line adds to a TrainConfig field: list syntax, and mlx-lm's flag name for lr as an alias.
# A field of another type than bool/int/float/str needs an entry here (register refuses it otherwise).
_CLI_FORM = {
    "lr": {"flags": ("--lr", "--learning-rate")},
    "layers": {"type": _layers},
    "modules": {"action": "append"},
    "keys": {"action": "append"},
    "reference": {"type": str},
}


def _add_config_options(p) -> None:
    """One option per TrainConfig field: ``--field-name``, the field's default, help and choices."""
    for f in fields(TrainConfig):
        form = dict(_CLI_FORM.get(f.name, {}))
        flags = form.pop("flags", ("--" + f.name.replace("_", "-"),))
        kw = {"dest": f.name, "default": f.default, "help": f.metadata["help"]}
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        if f.type is bool:
            kw["action"] = "store_true"
        elif f.type in (int, float, str):
            kw["type"] = f.type
        elif not form:
            raise TypeError(f"TrainConfig.{f.name} ({f.type}) has no command-line form; add one to _CLI_FORM")
        p.add_argument(*flags, **kw, **form)


def _config(args) -> TrainConfig:
    """The TrainConfig of parsed arguments; repeated/comma-separated list options flattened."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    for name, form in _CLI_FORM.items():
        if form.get("action") == "append":
            values[name] = _names(values[name])
    return TrainConfig(**values)


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
    p.add_argument(
        "--data",
        required=True,
        help="directory with train.jsonl (and valid.jsonl), chat format; with --mode dpo pairs of prompt, "
        "chosen, rejected (a directory or one JSONL file)",
    )
    p.add_argument("--adapter-path", required=True, help="output adapter directory (created atomically)")
    _add_config_options(p)
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
    register_dpo_pairs(sub)


def _compact(paths) -> str:
    from reqnoise.fuse.model_io import layer_index  # here: model_io loads numpy and safetensors

    groups: dict = {}
    for p in paths:
        li = layer_index(p)
        rel = p if li is None else p.split(f"layers.{li}.", 1)[1]
        groups.setdefault(rel, []).append(li)
    return "; ".join(rel if ls == [None] else f"{rel} in layers {','.join(map(str, ls))}" for rel, ls in groups.items())


def run_train(args) -> int:
    # mlx is imported with the tuner, here and not at the top, so that `reqnoise --help` stays fast
    from reqnoise.train.tuner import train_adapter

    if args.summary_json and Path(args.summary_json).exists() and not args.overwrite:
        raise ReqnoiseError(f"{args.summary_json} already exists (pass --overwrite to replace it)")
    summary = train_adapter(
        args.model,
        args.data,
        args.adapter_path,
        _config(args),
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
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


def register_dpo_pairs(sub) -> None:
    d = sub.add_parser(
        "dpo-pairs",
        help="DPO pairs: chosen = real replies in chat data, rejected = the base model's greedy replies",
        description="Build DPO pairs for `reqnoise train --mode dpo`: for each single-turn example of "
        "--chosen-from (cleaned as clean-data does), chosen is its real reply and rejected the --base "
        "model's greedy reply to the same prompt (thinking off).",
    )
    d.add_argument("--base", required=True, help="model whose replies become 'rejected' (before SFT)")
    d.add_argument("--model", default=None, help="the SFT model; its greedy reply is recorded as sft_reply")
    d.add_argument("--prompts", default=None, help="JSONL of {'prompt': str}: use only these examples")
    d.add_argument("--chosen-from", required=True, dest="chosen_from", help="chat JSONL file or directory")
    d.add_argument("--out", required=True, help="output directory (train.jsonl, valid.jsonl)")
    d.add_argument("--min-chars", type=int, default=10)
    d.add_argument("--system", default=None, help="one-line system prompt for every pair")
    d.add_argument("--drop-pattern", action="append", default=None, metavar="P")
    d.add_argument("--max-tokens", type=int, default=256, help="length limit of the base replies")
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=run_dpo_pairs)


def run_dpo_pairs(args) -> int:
    from reqnoise.train.dpo import build_dpo_pairs

    counts = build_dpo_pairs(
        args.base,
        args.chosen_from,
        args.out,
        model=args.model,
        prompts=args.prompts,
        min_chars=args.min_chars,
        system=args.system,
        drop_patterns=args.drop_pattern,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    skipped = ", ".join(f"{k} {v}" for k, v in counts["skipped"].items()) or "none"
    pairs = ", ".join(f"{k} {v}" for k, v in counts["pairs"].items())
    print(f"read {counts['read']} examples, wrote {counts['kept']} pairs ({pairs}); skipped: {skipped}")
    print(f"wrote {args.out}")
    return 0
