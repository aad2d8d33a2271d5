"""Adapter training through mlx-lm's tuner: ``train_adapter``, from a model directory to an adapter directory.

What reqnoise adds around ``mlx_lm.tuner`` (``linear_to_lora_layers``, ``ChatDataset``/``CacheDataset``,
``train`` with ``TrainingArgs``), in four steps:

1. prepare the model: targets selected by module type (``reqnoise.train.targets``), frozen, then wrapped
   (lora/dora) or unfrozen (full), refusing anything mlx-lm would not actually train;
2. build the datasets: chat examples rendered with thinking off (``reqnoise.train.data``), every example
   tokenized and checked for a trainable response before the first step;
3. train: mlx-lm's loop over seeded batches that use every example, data-parallel under ``mlx.launch``;
4. write the outputs: the adapter directory (``adapters.safetensors`` + ``adapter_config.json``) appears
   atomically and loads with ``mlx_lm.load(..., adapter_path=...)`` and ``reqnoise.fuse.model.fuse_model``.

The settings are a ``reqnoise.train.config.TrainConfig``.
"""

import contextlib
import dataclasses
import functools
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from reqnoise import __version__
from reqnoise.atomic import atomic_dir, check_target
from reqnoise.distributed import rank_and_size
from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.adapters import ADAPTER_FILE, CONFIG_FILE
from reqnoise.train.config import TrainConfig
from reqnoise.train.data import (
    chat_dataset,
    count_truncated,
    global_mean_loss,
    load_chat_data,
    misaligned_prompts,
    seeded_batches,
)
from reqnoise.train.targets import check_fine_tune_type, find_targets


class _LossLog:
    """mlx-lm TrainingCallback that keeps the reported losses."""

    def __init__(self):
        self.train, self.valid = [], []

    def on_train_loss_report(self, info):
        self.train.append((int(info["iteration"]), float(info["train_loss"])))

    def on_val_loss_report(self, info):
        self.valid.append((int(info["iteration"]), float(info["val_loss"])))


def _resolve_config(config, options: dict) -> TrainConfig:
    """``config`` with ``options`` (TrainConfig field names) applied over it, checked."""
    unknown = sorted(set(options) - set(TrainConfig.names()))
    if unknown:
        raise TypeError(
            f"train_adapter() got unknown option(s) {unknown}; the options are TrainConfig's fields: "
            f"{', '.join(TrainConfig.names())}"
        )
    if config is None:
        config = TrainConfig(**options)
    elif isinstance(config, TrainConfig):
        config = dataclasses.replace(config, **options)
    else:
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    return config.check()


def _wrap_targets(model, targets, config: TrainConfig) -> int:
    """Freeze, then wrap (lora/dora) or unfreeze (full) exactly ``targets``; return the trainable count."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    mx.random.seed(config.seed)  # LoRA factors are initialised from MLX's global generator
    if config.fine_tune_type == "full":
        named = dict(model.named_modules())
        for path in targets:
            named[path].unfreeze()
    else:
        params = {"rank": config.rank, "scale": config.scale, "dropout": 0.0, "keys": targets}
        linear_to_lora_layers(model, len(model.layers), params, use_dora=config.fine_tune_type == "dora")
    trainable = dict(tree_flatten(model.trainable_parameters()))
    reached = {name.rsplit(".", 1)[0] for name in trainable}  # MODULE.lora_a / .lora_b / .m / .weight
    missing = [t for t in targets if t not in reached]
    if missing or not trainable:
        raise ReqnoiseError(
            f"mlx-lm did not make {missing[:3] or targets[:3]} trainable "
            f"({len(trainable)} trainable tensors); nothing would be learned there"
        )
    return sum(v.size for v in trainable.values())


def _prepare_model(model_path: Path, config: TrainConfig):
    """Step 1: load the model, select and check the targets, make exactly them trainable.

    Returns ``(model, tokenizer, targets, trainable parameter count)``.
    """
    from mlx_lm.utils import load

    net, tokenizer = load(str(model_path))
    targets = find_targets(net, layers=config.layers, modules=config.modules, keys=config.keys)
    check_fine_tune_type(net, targets, config.fine_tune_type)
    return net, tokenizer, targets, _wrap_targets(net, targets, config)


def _build_datasets(splits: dict, tokenizer, config: TrainConfig):
    """Step 2: mlx-lm datasets of the train and (possibly absent) valid split, every example tokenized and
    checked now; warnings on stderr for truncated examples and misaligned prompt masks.

    Returns ``(train_set, valid_set or None, truncated count, misaligned count)``.
    """
    train_set = chat_dataset(splits["train"], tokenizer, config.mask_prompt)
    valid_set = chat_dataset(splits["valid"], tokenizer, config.mask_prompt) if splits["valid"] else None
    truncated = count_truncated(train_set, config.max_seq_length, "train")
    if valid_set is not None:
        truncated += count_truncated(valid_set, config.max_seq_length, "valid")
    misaligned = misaligned_prompts(train_set, tokenizer) if config.mask_prompt else 0
    if misaligned:
        print(
            f"reqnoise train: in {misaligned} example(s) the prompt does not tokenize as a prefix of the "
            "conversation; their prompt mask is off by a token or so",
            file=sys.stderr,
        )
    if truncated:
        print(
            f"reqnoise train: {truncated} example(s) longer than max_seq_length={config.max_seq_length} are truncated",
            file=sys.stderr,
        )
    return train_set, valid_set, truncated, misaligned


def _prepare_dpo(model_path: Path, splits: dict, config: TrainConfig):
    """Steps 1 and 2 of a DPO run: the reference log-probabilities are computed on the model before it is
    wrapped (or on ``config.reference``, loaded and released first), then the targets are made trainable.

    Returns ``(model, tokenizer, targets, trainable count, train_set, valid_set, truncated)``.
    """
    from mlx_lm.utils import load

    from reqnoise.train.dpo import dpo_datasets

    net, tokenizer = load(str(model_path))
    targets = find_targets(net, layers=config.layers, modules=config.modules, keys=config.keys)
    check_fine_tune_type(net, targets, config.fine_tune_type)
    if config.reference is None:
        reference = net
    else:
        if not (Path(config.reference) / "config.json").is_file():
            raise ReqnoiseError(f"reference model directory {config.reference} has no config.json")
        reference = load(str(config.reference))[0]
    train_set, valid_set, truncated = dpo_datasets(splits, tokenizer, config, reference)
    del reference
    if truncated:
        print(
            f"reqnoise train: {truncated} DPO replies truncated to max_seq_length={config.max_seq_length}",
            file=sys.stderr,
        )
    return net, tokenizer, targets, _wrap_targets(net, targets, config), train_set, valid_set, truncated


def _train(net, train_set, valid_set, config: TrainConfig, adapter_file: Path, progress: bool, ranks: int):
    """Step 3: mlx-lm's training loop (Adam, validation once at the end, weights saved to ``adapter_file``).

    Returns ``(loss log, seconds)``; refuses a run whose final train loss is not finite.
    """
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as mlx_train

    args = TrainingArgs(
        batch_size=config.batch_size,
        iters=config.iters,
        val_batches=-1,
        steps_per_report=min(10, config.iters),
        steps_per_eval=config.iters,
        steps_per_save=config.iters + 1,
        max_seq_length=config.max_seq_length,
        adapter_file=str(adapter_file),
    )
    log = _LossLog()
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO())
    t_train = time.perf_counter()
    # Under mlx.launch mlx-lm trains data-parallel over the global group; see seeded_batches.
    loss = {"loss": global_mean_loss} if ranks > 1 else {}
    batches = seeded_batches
    if config.mode == "dpo":
        from reqnoise.train.dpo import dpo_loss, pair_batches

        loss, batches = {"loss": functools.partial(dpo_loss, beta=config.beta)}, pair_batches
    with quiet:
        mlx_train(
            net,
            optim.Adam(learning_rate=config.lr),
            train_set,
            valid_set,
            args=args,
            iterate_batches=functools.partial(batches, seed=config.seed),
            training_callback=log,
            **loss,
        )
    seconds = time.perf_counter() - t_train
    final = log.train[-1][1] if log.train else float("nan")
    if not math.isfinite(final):
        raise ReqnoiseError(f"training diverged: final train loss {final}; lower lr (now {config.lr}) or scale")
    return log, seconds


def _adapter_config(model_path, data, targets, n_blocks: int, config: TrainConfig) -> dict:
    # The keys mlx_lm.tuner.utils.load_adapters reads (fine_tune_type, num_layers, lora_parameters) plus the
    # run's settings, in the names mlx-lm's CLI writes. Full paths in "keys" reach every block whatever
    # num_layers says, so num_layers is just the block count. layers/modules are not written: "keys" is what
    # they resolved to.
    return {
        "model": str(model_path),
        "data": str(data) if isinstance(data, (str, Path)) else "<in-memory examples>",
        "fine_tune_type": config.fine_tune_type,
        "num_layers": n_blocks,
        "lora_parameters": {"rank": config.rank, "scale": config.scale, "dropout": 0.0, "keys": list(targets)},
        "learning_rate": config.lr,
        "optimizer": "adam",
        "iters": config.iters,
        "batch_size": config.batch_size,
        "mask_prompt": config.mask_prompt,
        "max_seq_length": config.max_seq_length,
        "seed": config.seed,
        **(
            {"mode": "dpo", "beta": config.beta, "reference": config.reference or str(model_path)}
            if config.mode == "dpo"
            else {}
        ),
        "chat_rendering": "reqnoise.chat.render_chat (enable_thinking=False)",
        "trained_by": f"reqnoise {__version__}",
    }


def train_adapter(
    model,
    data,
    adapter_path,
    config: TrainConfig | None = None,
    *,
    overwrite=False,
    progress=True,
    **options,
) -> dict:
    """Train an adapter with mlx-lm's tuner and write it as an mlx-lm adapter directory.

    Args:
        model: mlx-lm model directory (quantized or not; a fused model directory for stacking).
        data: directory with ``train.jsonl`` (and optional ``valid.jsonl``) in mlx-lm's chat format, or a
            list of ``{"messages": [...]}`` dicts. Every example must end with the assistant's message.
            With ``mode="dpo"``: pairs ``{"prompt", "chosen", "rejected", "system"?}`` (a directory, a JSONL
            file or a list), see ``reqnoise.train.dpo``; the reported losses are then DPO losses.
        adapter_path: output directory; appears only when complete; an existing one needs ``overwrite``.
        config: the settings (``TrainConfig``; None = its defaults).
        progress: mlx-lm's training display on stdout; False keeps stdout quiet.
        **options: TrainConfig fields given as keywords (``rank=4, layers=[1, 3]``), applied over ``config``:
            fine_tune_type "lora", "dora" (dense layers at 2/4/8 bits or float only) or "full" (float only);
            rank, scale: LoRA rank and mlx-lm's plain multiplier of ``lora_b @ lora_a`` (not alpha/rank);
            lr, iters, batch_size: Adam learning rate, optimizer steps, examples per step;
            layers, modules, keys: target selection, see ``reqnoise.train.targets.find_targets``;
            mask_prompt: train only on the last assistant message;
            seed: LoRA initialisation and batch order; same inputs + seed give byte-identical adapters on CPU;
            max_seq_length: tokens per example; longer ones are truncated (counted in the summary);
            mode "sft" or "dpo", beta (DPO inverse temperature), reference (DPO reference model directory,
            default ``model``).

    Returns a summary dict: ``trainable_parameters``, ``modules`` (paths adapted), ``final_train_loss`` (mean
    over the last reporting window of up to 10 steps), ``train_losses`` / ``val_losses`` as
    [iteration, loss] lists, ``seconds`` (total), ``train_seconds`` and ``iterations_per_second`` (mlx-lm's
    train call, compilation and validation included), ``train_examples``, ``truncated_examples``,
    ``adapter_path``.
    """
    t_start = time.perf_counter()
    config = _resolve_config(config, options)
    model_path = Path(model)
    if not (model_path / "config.json").is_file():
        raise ReqnoiseError(f"model directory {model_path} has no config.json")
    if config.mode == "dpo":
        from reqnoise.train.dpo import load_pair_data

        splits = load_pair_data(data)
    else:
        splits = load_chat_data(data)
    world_rank, ranks = rank_and_size()
    if config.mode == "dpo" and ranks > 1:
        raise ReqnoiseError("DPO training runs in one process; launch it without mlx.launch")
    if world_rank != 0:
        # Data-parallel under mlx.launch: every rank trains, rank 0 alone writes adapter_path. Same checks on
        # every rank, so a refusal stops all of them before the first collective.
        check_target(Path(adapter_path), overwrite)
        private = tempfile.TemporaryDirectory(prefix="reqnoise-rank-")
        adapter_path, overwrite = Path(private.name) / "adapter", False
    with atomic_dir(adapter_path, overwrite=overwrite) as tmp:
        if config.mode == "dpo":
            net, tokenizer, targets, n_trainable, train_set, valid_set, truncated = _prepare_dpo(
                model_path, splits, config
            )
            misaligned = 0
        else:
            net, tokenizer, targets, n_trainable = _prepare_model(model_path, config)
            train_set, valid_set, truncated, misaligned = _build_datasets(splits, tokenizer, config)
        log, train_seconds = _train(net, train_set, valid_set, config, tmp / ADAPTER_FILE, progress, ranks)
        adapter_config = _adapter_config(model_path, data, targets, len(net.layers), config)
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=4) + "\n", encoding="utf-8")
    return {
        "adapter_path": str(adapter_path),
        "mode": config.mode,
        "fine_tune_type": config.fine_tune_type,
        "trainable_parameters": int(n_trainable),
        "modules": list(targets),
        "final_train_loss": log.train[-1][1],
        "train_losses": [list(x) for x in log.train],
        "val_losses": [list(x) for x in log.valid],
        "train_examples": len(splits["train"]),
        "truncated_examples": truncated,
        "misaligned_prompts": misaligned,
        "iters": config.iters,
        "ranks": ranks,
        "train_seconds": train_seconds,
        "iterations_per_second": config.iters / train_seconds,
        "seconds": time.perf_counter() - t_start,
    }
