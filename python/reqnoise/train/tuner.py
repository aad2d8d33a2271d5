"""Adapter training through mlx-lm's tuner: type-based target selection, chat data rendered with thinking off.

What reqnoise adds around ``mlx_lm.tuner`` (``linear_to_lora_layers``, ``ChatDataset``/``CacheDataset``,
``train`` with ``TrainingArgs``):

- Targets are found by module TYPE (Linear, QuantizedLinear, SwitchLinear, QuantizedSwitchLinear), filtered by
  layer index and by block-relative name suffix, and handed to mlx-lm as an exact list of full module paths,
  so ``modules=["down_proj"], layers=[8, 14, 20]`` reaches ``mlp.switch_mlp.down_proj`` (or ``experts`` /
  ``switch_glu`` in other architectures) of exactly those blocks. A selection that matches nothing is refused
  (mlx-lm would train zero parameters without a word).
- Chat examples are rendered by ``reqnoise.chat.render_chat`` (the tokenizer's template with
  ``enable_thinking=False``, the rendering evaluation uses) through a tokenizer wrapper handed to mlx-lm's
  ``ChatDataset``. With ``mask_prompt`` the loss covers only the last assistant message: the prompt is the
  conversation before it plus the generation prompt (for Qwen3 templates that includes the empty think block).
- Batches come from a seeded generator that uses every example once per epoch (mlx-lm's own batcher sorts by
  length and never trains on the ``len % batch_size`` longest examples, and seeds NumPy's global state).
- The adapter directory (``adapters.safetensors`` + ``adapter_config.json``) appears atomically and loads with
  ``mlx_lm.load(..., adapter_path=...)`` and ``reqnoise.fuse.model.fuse_model``.
"""

import contextlib
import functools
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from reqnoise import __version__
from reqnoise.atomic import atomic_dir, check_target
from reqnoise.chat import render_chat
from reqnoise.distributed import rank_and_size
from reqnoise.errors import ReqnoiseError
from reqnoise.fuse.adapters import ADAPTER_FILE, CONFIG_FILE
from reqnoise.fuse.model_io import layer_index

FINE_TUNE_TYPES = ("lora", "dora", "full")
DATA_SPLITS = ("train", "valid")
_ROLES = ("system", "user", "assistant", "tool")
_PAD_TO = 8  # pad to 1 + a multiple of 8: little wasted compute, few distinct shapes (one compile each)


# ----------------------------------------------------------------------------------------------- targets


def _target_types():
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    return (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)


def _as_module(model):
    """A loaded mlx-lm model, or a model directory loaded lazily (weights are not read)."""
    import mlx.nn as nn

    if isinstance(model, nn.Module):
        return model
    from mlx_lm.utils import load_model

    path = Path(model)
    if not (path / "config.json").is_file():
        raise ReqnoiseError(f"model directory {path} has no config.json")
    return load_model(path, lazy=True)[0]


def adaptable_modules(model) -> dict:
    """Full module path -> module, for every module mlx-lm can wrap with LoRA (by type, not by name)."""
    types_ = _target_types()
    return {p: m for p, m in model.named_modules() if isinstance(m, types_) or hasattr(m, "to_lora")}


def _relative(path: str) -> str:
    """``model.layers.8.mlp.switch_mlp.down_proj`` -> ``mlp.switch_mlp.down_proj``."""
    marker = f"layers.{layer_index(path)}."
    return path[path.index(marker) + len(marker) :]


def _kind(module) -> str:
    bits = getattr(module, "bits", None)
    experts = getattr(module, "num_experts", None)
    extra = [f"{bits}-bit"] if bits is not None and hasattr(module, "scales") else []
    if experts:
        extra.append(f"{experts} experts")
    return type(module).__name__ + (f" {', '.join(extra)}" if extra else "")


def _ranges(idx) -> str:
    idx, out, start = sorted(idx), [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def describe_adaptable(model) -> str:
    """One line per block-relative module name (with its type and the layers that have it), for messages."""
    mods = adaptable_modules(_as_module(model))
    per_name: dict = {}
    outside = []
    for path, m in mods.items():
        li = layer_index(path)
        if li is None:
            outside.append(f"{path} ({_kind(m)})")
        else:
            per_name.setdefault(_relative(path), [set(), _kind(m)])[0].add(li)
    lines = [f"  {name} ({kind}) in layers {_ranges(layers)}" for name, (layers, kind) in sorted(per_name.items())]
    if outside:
        lines.append("  outside the blocks (reachable with keys): " + ", ".join(sorted(outside)))
    return "\n".join(lines) if lines else "  (none)"


def _sort_key(path: str):
    li = layer_index(path)
    return (li is None, -1 if li is None else li, path)


def find_targets(model, layers=None, modules=None, keys=None) -> list[str]:
    """Full module paths to adapt, selected by module type.

    Args:
        model: a loaded mlx-lm model (``nn.Module``) or a model directory (loaded lazily).
        layers: block indices (e.g. ``[8, 14, 20]``); None = every block.
        modules: block-relative name suffixes matched on ``.`` boundaries (``"down_proj"`` matches
            ``mlp.switch_mlp.down_proj``; ``"switch_mlp.down_proj"`` or ``"self_attn.q_proj"`` are narrower);
            None = every adaptable module in the selected blocks (mlx-lm's default set, routers included).
        keys: exact full module paths (``model.layers.8.mlp.switch_mlp.down_proj``); exclusive with
            ``layers``/``modules``; the only way to reach modules outside the blocks (e.g. ``lm_head``).

    Returns the paths sorted by layer index. Raises ReqnoiseError, listing what exists, when the selection is
    empty, a layer is out of range, a ``modules`` entry matches nothing, or a key is not an adaptable module.
    """
    model = _as_module(model)
    mods = adaptable_modules(model)
    if keys is not None:
        if layers is not None or modules is not None:
            raise ReqnoiseError("keys are full module paths: give either keys or layers/modules, not both")
        keys = list(dict.fromkeys(keys))
        if not keys:
            raise ReqnoiseError("keys is empty; nothing would be trained")
        named = dict(model.named_modules())
        for key in keys:
            if key not in mods:
                what = (
                    f"is a {type(named[key]).__name__}, not a linear layer"
                    if key in named
                    else "is not a module of this model"
                )
                raise ReqnoiseError(f"key {key!r} {what}; adaptable modules:\n{describe_adaptable(model)}")
        return sorted(keys, key=_sort_key)

    n_blocks = len(model.layers)
    if layers is not None:
        layers = sorted({int(i) for i in layers})
        bad = [i for i in layers if not 0 <= i < n_blocks]
        if bad:
            raise ReqnoiseError(f"layers {bad} do not exist: the model has {n_blocks} blocks (0-{n_blocks - 1})")
        if not layers:
            raise ReqnoiseError("layers is empty; nothing would be trained")
    in_blocks = {
        p: m for p, m in mods.items() if layer_index(p) is not None and (layers is None or layer_index(p) in layers)
    }
    if modules is None:
        selected = set(in_blocks)
    else:
        modules = [str(m).strip().strip(".") for m in modules]
        if not any(modules):
            raise ReqnoiseError("modules is empty; nothing would be trained")
        selected = set()
        for name in modules:
            hits = {p for p in in_blocks if p == name or p.endswith("." + name)}
            if not hits:
                where = "any block" if layers is None else f"layers {_ranges(layers)}"
                raise ReqnoiseError(
                    f"module {name!r} matches no adaptable module in {where}; adaptable modules:\n"
                    f"{describe_adaptable(model)}"
                )
            selected |= hits
    if not selected:
        raise ReqnoiseError(
            f"the selection matches no adaptable module; adaptable modules:\n{describe_adaptable(model)}"
        )
    return sorted(selected, key=_sort_key)


def _check_fine_tune_type(model, targets, fine_tune_type: str) -> None:
    """Refuse, before any work, what mlx-lm cannot train (it would fail deep inside or train garbage)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    named = dict(model.named_modules())
    for path in targets:
        m = named[path]
        quantized = hasattr(m, "scales")
        if fine_tune_type == "dora":
            if isinstance(m, (SwitchLinear, QuantizedSwitchLinear)):
                raise ReqnoiseError(
                    f"DoRA is not available for expert stacks: {path} is a {type(m).__name__} and "
                    "mlx-lm has no DoRA switch layer; use fine_tune_type lora for experts"
                )
            if quantized and 32 % m.bits:
                raise ReqnoiseError(
                    f"DoRA cannot be built on {path}: it is {m.bits}-bit quantized and mlx-lm's DoRALinear "
                    f"recovers the input size as packed*(32//bits), wrong for {m.bits} bits (only 2, 4 and 8 work); "
                    "use fine_tune_type lora, or a model quantized at 4 or 8 bits or unquantized"
                )
        elif fine_tune_type == "full" and quantized:
            raise ReqnoiseError(
                f"full fine-tuning needs float weights: {path} is {m.bits}-bit quantized and MLX "
                "cannot differentiate through quantized weights; use lora/dora or a dequantized model"
            )


# ------------------------------------------------------------------------------------------------- data


def _check_example(ex, where: str) -> dict:
    if not isinstance(ex, dict) or "messages" not in ex:
        raise ReqnoiseError(f"{where}: expected a JSON object with a 'messages' list (mlx-lm chat format)")
    if "tools" in ex:
        raise ReqnoiseError(
            f"{where}: tool definitions ('tools') are not supported; reqnoise renders chats without tools"
        )
    msgs = ex["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ReqnoiseError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ReqnoiseError(
                f"{where}: messages[{i}] must be {{'role': one of {_ROLES}, 'content': str}}, got {json.dumps(m)[:120]}"
            )
    if msgs[-1]["role"] != "assistant":
        raise ReqnoiseError(
            f"{where}: the last message must be the assistant's (the trained response), got role {msgs[-1]['role']!r}"
        )
    return {"messages": msgs}


def read_chat_jsonl(path) -> list[dict]:
    """Read and validate a chat JSONL file (``{"messages": [...]}`` per line; blank lines skipped)."""
    from reqnoise.jsonl import iter_jsonl

    return [_check_example(ex, where) for _, where, ex in iter_jsonl(Path(path))]


def load_chat_data(data) -> dict:
    """``{"train": [...], "valid": [...]}`` from a directory (train.jsonl, optional valid.jsonl) or a list."""
    if isinstance(data, (str, Path)):
        root = Path(data)
        if not (root / "train.jsonl").is_file():
            raise ReqnoiseError(f"data directory {root} has no train.jsonl")
        splits = {
            s: read_chat_jsonl(root / f"{s}.jsonl") if (root / f"{s}.jsonl").is_file() else [] for s in DATA_SPLITS
        }
    else:
        splits = {"train": [_check_example(ex, f"data[{i}]") for i, ex in enumerate(data)], "valid": []}
    if not splits["train"]:
        raise ReqnoiseError(f"no training examples in {data if isinstance(data, (str, Path)) else 'data'}")
    return splits


class _NoThinkingTokenizer:
    """What mlx-lm's ChatDataset calls, answered with ``render_chat`` (thinking off) + plain encoding, so
    training sees the exact text evaluation renders. Everything else is forwarded."""

    def __init__(self, tokenizer):
        self._wrapped = tokenizer

    def apply_chat_template(self, messages, tools=None, add_generation_prompt=False, tokenize=True, **_):
        text = render_chat(self._wrapped, messages, add_generation_prompt=add_generation_prompt)
        return self._wrapped.encode(text, add_special_tokens=False) if tokenize else text

    def __getattr__(self, name):
        return getattr(self._wrapped, name)


def chat_dataset(examples, tokenizer, mask_prompt: bool):
    """mlx-lm's ChatDataset (in a CacheDataset) over ``render_chat``: item ``i`` is ``(tokens, offset)``,
    the loss covering ``tokens[offset:]`` (offset 0 without ``mask_prompt``)."""
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset

    return CacheDataset(ChatDataset(examples, _NoThinkingTokenizer(tokenizer), mask_prompt=mask_prompt))


def _check_lengths(dataset, max_seq_length: int, split: str) -> int:
    """Tokenize every example now (CacheDataset keeps the tokens); refuse examples with no trained token
    left after truncation; return how many get truncated."""
    truncated = 0
    for i in range(len(dataset)):
        tokens, offset = dataset[i]
        n = min(len(tokens), max_seq_length)
        truncated += len(tokens) > max_seq_length
        if offset >= n or n < 2:
            raise ReqnoiseError(
                f"{split} example {i}: {len(tokens)} tokens with the prompt ending at {offset}; "
                f"max_seq_length={max_seq_length} leaves no response token to train on"
            )
    return truncated


def _misaligned_prompts(dataset, tokenizer) -> int:
    """Examples whose prompt tokens are not a prefix of the whole conversation's tokens (a BPE merge across
    the boundary): there mlx-lm's offset-based mask is off by a token or so."""
    wrapped = _NoThinkingTokenizer(tokenizer)
    bad = 0
    for i in range(len(dataset)):
        tokens, offset = dataset[i]
        prompt = wrapped.apply_chat_template(dataset._data[i]["messages"][:-1], add_generation_prompt=True)
        bad += tokens[:offset] != prompt
    return bad


def seeded_batches(dataset, batch_size, max_seq_length, loop=False, comm_group=None, *, seed=0):
    """mlx-lm's ``iterate_batches`` contract, seeded and using every example.

    ``loop=True`` (training): an endless stream of per-epoch permutations drawn from ``seed``, cut into
    batches of ``batch_size`` (a batch may straddle two epochs). ``loop=False`` (validation): every example
    once, in order, the last batch possibly smaller. Yields ``(tokens [B, T] int32, [(offset, length)] [B, 2])``
    with T = 1 + a multiple of 8 (mlx-lm pads to 32; 8 wastes less compute on short examples for a few
    more compiled shapes), at most ``max_seq_length``.

    Under ``mlx.launch`` (``comm_group`` of N > 1 ranks) the training batches are the single-process ones,
    rank r taking rows r, r + N, ...; each row then carries a third column, the target-token count of the
    whole batch, by which ``global_mean_loss`` divides, so that mlx-lm's gradient average is the
    single-process gradient (up to summation order). Validation batches go whole to every rank: mlx-lm
    sums totals and token counts over ranks, which leaves the mean unchanged.
    """
    import mlx.core as mx

    size = comm_group.size() if comm_group is not None else 1
    rank = comm_group.rank() if comm_group is not None else 0
    if loop and batch_size % size:
        raise ReqnoiseError(
            f"batch_size {batch_size} is not divisible by the {size} launched ranks "
            "(each rank takes batch_size / ranks examples of every step)"
        )
    n = len(dataset)
    rng = np.random.Generator(np.random.PCG64(seed))

    def index_stream():
        if not loop:
            yield from range(n)
            return
        while True:
            yield from rng.permutation(n).tolist()

    stream = index_stream()
    while True:
        idx = [i for _, i in zip(range(batch_size), stream)]
        if not idx:
            return
        items = [dataset[i] for i in idx]
        lengths = [min(len(t), max_seq_length) for t, _ in items]
        extra = []
        if loop and size > 1:
            total = sum(_target_tokens(off, length, max_seq_length) for (_, off), length in zip(items, lengths))
            items, lengths, extra = items[rank::size], lengths[rank::size], [total]
        width = min(1 + _PAD_TO * math.ceil(max(lengths) / _PAD_TO), max_seq_length)
        arr = np.zeros((len(items), width), np.int32)
        for row, ((tokens, _), length) in enumerate(zip(items, lengths)):
            arr[row, :length] = tokens[:length]
        yield mx.array(arr), mx.array([[off, length, *extra] for (_, off), length in zip(items, lengths)])


def _target_tokens(offset: int, length: int, max_seq_length: int) -> int:
    """Tokens mlx-lm's ``default_loss`` scores in a row: targets at steps max(offset, 1)..length, and at most
    max_seq_length - 1 of them (the row's last input token has no target)."""
    return max(0, min(length, max_seq_length - 1) - max(offset, 1) + 1)


def global_mean_loss(model, batch, lengths):
    """mlx-lm's ``default_loss`` rescaled for data-parallel training: this rank's summed cross-entropy times
    the rank count over the whole batch's token count (``lengths[:, 2]``, see ``seeded_batches``); mlx-lm
    averages the ranks' gradients, which then equals the gradient of the mean over the whole batch.
    Two-column ``lengths`` (validation) get ``default_loss`` unchanged."""
    import mlx.core as mx
    from mlx_lm.tuner.trainer import default_loss

    if lengths.shape[1] < 3:
        return default_loss(model, batch, lengths)
    ce, ntoks = default_loss(model, batch, lengths[:, :2])
    size = rank_and_size()[1]
    return ce * ntoks.astype(mx.float32) * size / lengths[0, 2].astype(mx.float32), ntoks


# --------------------------------------------------------------------------------------------- training


class _LossLog:
    """mlx-lm TrainingCallback that keeps the reported losses."""

    def __init__(self):
        self.train, self.valid = [], []

    def on_train_loss_report(self, info):
        self.train.append((int(info["iteration"]), float(info["train_loss"])))

    def on_val_loss_report(self, info):
        self.valid.append((int(info["iteration"]), float(info["val_loss"])))


def _check_args(fine_tune_type, rank, scale, lr, iters, batch_size, max_seq_length):
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise ReqnoiseError(f"fine_tune_type must be one of {FINE_TUNE_TYPES}, got {fine_tune_type!r}")
    for name, value in (("rank", rank), ("iters", iters), ("batch_size", batch_size)):
        if int(value) != value or value < 1:
            raise ReqnoiseError(f"{name} must be a positive integer, got {value!r}")
    if max_seq_length < 2:
        raise ReqnoiseError(f"max_seq_length must be at least 2, got {max_seq_length}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ReqnoiseError(f"lr must be a positive number, got {lr!r}")
    if not math.isfinite(scale):
        raise ReqnoiseError(f"scale must be a finite number, got {scale!r}")


def _prepare_model(model, targets, fine_tune_type, rank, scale, seed):
    """Freeze, then wrap (lora/dora) or unfreeze (full) exactly ``targets``; return the trainable count."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    mx.random.seed(seed)  # LoRA factors are initialised from MLX's global generator
    if fine_tune_type == "full":
        named = dict(model.named_modules())
        for path in targets:
            named[path].unfreeze()
    else:
        params = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": targets}
        linear_to_lora_layers(model, len(model.layers), params, use_dora=fine_tune_type == "dora")
    trainable = dict(tree_flatten(model.trainable_parameters()))
    reached = {name.rsplit(".", 1)[0] for name in trainable}  # MODULE.lora_a / .lora_b / .m / .weight
    missing = [t for t in targets if t not in reached]
    if missing or not trainable:
        raise ReqnoiseError(
            f"mlx-lm did not make {missing[:3] or targets[:3]} trainable "
            f"({len(trainable)} trainable tensors); nothing would be learned there"
        )
    return sum(v.size for v in trainable.values())


def _adapter_config(
    model_path,
    data,
    targets,
    n_blocks,
    fine_tune_type,
    rank,
    scale,
    lr,
    iters,
    batch_size,
    mask_prompt,
    seed,
    max_seq_length,
) -> dict:
    # The keys mlx_lm.tuner.utils.load_adapters reads (fine_tune_type, num_layers, lora_parameters) plus the
    # run's settings, in the names mlx-lm's CLI writes. Full paths in "keys" reach every block whatever
    # num_layers says, so num_layers is just the block count.
    return {
        "model": str(model_path),
        "data": str(data) if isinstance(data, (str, Path)) else "<in-memory examples>",
        "fine_tune_type": fine_tune_type,
        "num_layers": n_blocks,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(targets)},
        "learning_rate": lr,
        "optimizer": "adam",
        "iters": iters,
        "batch_size": batch_size,
        "mask_prompt": mask_prompt,
        "max_seq_length": max_seq_length,
        "seed": seed,
        "chat_rendering": "reqnoise.chat.render_chat (enable_thinking=False)",
        "trained_by": f"reqnoise {__version__}",
    }


def train_adapter(
    model,
    data,
    adapter_path,
    *,
    fine_tune_type="lora",
    rank=8,
    scale=20.0,
    lr=1e-4,
    iters=100,
    batch_size=4,
    layers=None,
    modules=None,
    keys=None,
    mask_prompt=False,
    seed=0,
    max_seq_length=512,
    overwrite=False,
    progress=True,
) -> dict:
    """Train an adapter with mlx-lm's tuner and write it as an mlx-lm adapter directory.

    Args:
        model: mlx-lm model directory (quantized or not; a fused model directory for stacking).
        data: directory with ``train.jsonl`` (and optional ``valid.jsonl``) in mlx-lm's chat format, or a
            list of ``{"messages": [...]}`` dicts. Every example must end with the assistant's message.
        adapter_path: output directory; appears only when complete; an existing one needs ``overwrite``.
        fine_tune_type: "lora", "dora" (dense layers at 2/4/8 bits or float only) or "full" (float only).
        rank, scale: LoRA rank and mlx-lm's plain multiplier of ``lora_b @ lora_a`` (not alpha/rank).
        lr, iters, batch_size: Adam learning rate, optimizer steps, examples per step.
        layers, modules, keys: target selection, see ``find_targets``.
        mask_prompt: train only on the last assistant message.
        seed: LoRA initialisation and batch order; same inputs + seed give byte-identical adapters on CPU.
        max_seq_length: tokens per example; longer ones are truncated (counted in the summary).
        progress: mlx-lm's training display on stdout; False keeps stdout quiet.

    Returns a summary dict: ``trainable_parameters``, ``modules`` (paths adapted), ``final_train_loss`` (mean
    over the last reporting window of up to 10 steps), ``train_losses`` / ``val_losses`` as
    [iteration, loss] lists, ``seconds`` (total), ``train_seconds`` and ``iterations_per_second`` (mlx-lm's
    train call, compilation and validation included), ``train_examples``, ``truncated_examples``,
    ``adapter_path``.
    """
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.tuner.trainer import train as mlx_train
    from mlx_lm.utils import load

    t_start = time.perf_counter()
    _check_args(fine_tune_type, rank, scale, lr, iters, batch_size, max_seq_length)
    model_path = Path(model)
    if not (model_path / "config.json").is_file():
        raise ReqnoiseError(f"model directory {model_path} has no config.json")
    splits = load_chat_data(data)
    world_rank, ranks = rank_and_size()
    if world_rank != 0:
        # Data-parallel under mlx.launch: every rank trains, rank 0 alone writes adapter_path. Same checks on
        # every rank, so a refusal stops all of them before the first collective.
        check_target(Path(adapter_path), overwrite)
        private = tempfile.TemporaryDirectory(prefix="reqnoise-rank-")
        adapter_path, overwrite = Path(private.name) / "adapter", False
    with atomic_dir(adapter_path, overwrite=overwrite) as tmp:
        net, tokenizer = load(str(model_path))
        targets = find_targets(net, layers=layers, modules=modules, keys=keys)
        _check_fine_tune_type(net, targets, fine_tune_type)
        n_trainable = _prepare_model(net, targets, fine_tune_type, rank, scale, seed)

        train_set = chat_dataset(splits["train"], tokenizer, mask_prompt)
        valid_set = chat_dataset(splits["valid"], tokenizer, mask_prompt) if splits["valid"] else None
        truncated = _check_lengths(train_set, max_seq_length, "train")
        if valid_set is not None:
            truncated += _check_lengths(valid_set, max_seq_length, "valid")
        misaligned = _misaligned_prompts(train_set, tokenizer) if mask_prompt else 0
        if misaligned:
            print(
                f"reqnoise train: in {misaligned} example(s) the prompt does not tokenize as a prefix of the "
                "conversation; their prompt mask is off by a token or so",
                file=sys.stderr,
            )
        if truncated:
            print(
                f"reqnoise train: {truncated} example(s) longer than max_seq_length={max_seq_length} are truncated",
                file=sys.stderr,
            )

        args = TrainingArgs(
            batch_size=batch_size,
            iters=iters,
            val_batches=-1,
            steps_per_report=min(10, iters),
            steps_per_eval=iters,
            steps_per_save=iters + 1,
            max_seq_length=max_seq_length,
            adapter_file=str(tmp / ADAPTER_FILE),
        )
        log = _LossLog()
        quiet = contextlib.nullcontext() if progress else contextlib.redirect_stdout(io.StringIO())
        t_train = time.perf_counter()
        # Under mlx.launch mlx-lm trains data-parallel over the global group; see seeded_batches.
        loss = {"loss": global_mean_loss} if ranks > 1 else {}
        with quiet:
            mlx_train(
                net,
                optim.Adam(learning_rate=lr),
                train_set,
                valid_set,
                args=args,
                iterate_batches=functools.partial(seeded_batches, seed=seed),
                training_callback=log,
                **loss,
            )
        train_seconds = time.perf_counter() - t_train
        final = log.train[-1][1] if log.train else float("nan")
        if not math.isfinite(final):
            raise ReqnoiseError(f"training diverged: final train loss {final}; lower lr (now {lr}) or scale")
        config = _adapter_config(
            model_path,
            data,
            targets,
            len(net.layers),
            fine_tune_type,
            rank,
            scale,
            lr,
            iters,
            batch_size,
            mask_prompt,
            seed,
            max_seq_length,
        )
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    return {
        "adapter_path": str(adapter_path),
        "fine_tune_type": fine_tune_type,
        "trainable_parameters": int(n_trainable),
        "modules": list(targets),
        "final_train_loss": final,
        "train_losses": [list(x) for x in log.train],
        "val_losses": [list(x) for x in log.valid],
        "train_examples": len(splits["train"]),
        "truncated_examples": truncated,
        "misaligned_prompts": misaligned,
        "iters": iters,
        "ranks": ranks,
        "train_seconds": train_seconds,
        "iterations_per_second": iters / train_seconds,
        "seconds": time.perf_counter() - t_start,
    }
