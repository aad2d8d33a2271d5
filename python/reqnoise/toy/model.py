"""The embedded small MoE model: a qwen3_moe mlx-lm model directory built offline and deterministically.

Tests, benchmarks and the demo run on it instead of downloading a real model. It has the real layout of a
quantized Qwen3-MoE checkpoint (switch expert stacks, an 8-bit router through mlx-lm's own quant predicate,
quantized embedding and lm_head, a ChatML tokenizer with think tokens) at a size that runs on a laptop CPU.
Every quantizable input dimension divides by 128, so group sizes 32, 64 and 128 quantize every layer.
"""

import contextlib
import io
import zlib
from pathlib import Path

import numpy as np

from reqnoise.atomic import atomic_dir
from reqnoise.errors import ReqnoiseError
from reqnoise.kernel.formats import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from reqnoise.toy.shape import DEFAULT_DTYPE, SUPPORTED_DTYPES, ToyShape
from reqnoise.toy.tokenizer import builtin_corpus, save_tokenizer, train_tokenizer

__all__ = ["ToyShape", "build_toy_model", "toy_config", "init_toy_weights", "builtin_corpus", "train_tokenizer"]

WEIGHT_STD = 0.02


def toy_config(shape: ToyShape | None = None, *, dtype: str = DEFAULT_DTYPE, **sizes) -> dict:
    """The config.json fields of the toy model (before quantization), in Qwen3-MoE's naming.

    ``sizes`` are ToyShape fields replacing those of ``shape``.
    """
    shape = ToyShape.of(shape, **sizes)
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "intermediate_size": shape.intermediate_size,
        "moe_intermediate_size": shape.moe_intermediate_size,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "num_experts": shape.num_experts,
        "num_experts_per_tok": shape.num_experts_per_tok,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }


def _weight_std(name: str, config: dict, mlp_std=None) -> float:
    if mlp_std is not None and name.endswith(("gate_proj.weight", "up_proj.weight")):
        return mlp_std[0]
    if mlp_std is not None and name.endswith("down_proj.weight"):
        return mlp_std[1]
    if name.endswith("mlp.gate.weight"):
        # Router logits of order 1 (inputs are RMS-normalised), so routing is decided, not a coin toss.
        return config["hidden_size"] ** -0.5
    if name == "lm_head.weight":
        # Output logits of order 1: with 0.02 a 128-wide model caps them near +-2.6 and fine-tuning that leaves
        # lm_head alone (every adapter) cannot get below ~5 nats/token; real checkpoints have wide logits.
        return config["hidden_size"] ** -0.5
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        # GPT-2 style: residual-branch outputs shrink with depth so activations stay O(1).
        return WEIGHT_STD / (2 * config["num_hidden_layers"]) ** 0.5
    return WEIGHT_STD


def _random_matrix(rng: np.random.Generator, shape: tuple, std: float) -> np.ndarray:
    """Gaussian rows with a log-normal per-row scale and ~3% heavy-tailed (Student-t, 3 dof) rows, so that
    quantization groups show the spread of ranges and outliers of trained weights."""
    rows = int(np.prod(shape[:-1]))
    w = rng.standard_normal((rows, shape[-1]), dtype=np.float32)
    heavy = rng.random(rows) < 0.03
    if heavy.any():
        w[heavy] = (rng.standard_t(3, size=(int(heavy.sum()), shape[-1])) / np.sqrt(3.0)).astype(np.float32)
    w *= rng.lognormal(0.0, 0.3, size=(rows, 1)).astype(np.float32)
    return (w * std).reshape(shape)


def init_toy_weights(model, config: dict, seed: int, dtype: str = DEFAULT_DTYPE, mlp_std=None) -> None:
    """Replace every parameter of ``model`` with seeded random values (norms get ones) cast to ``dtype``.

    Each tensor draws from its own generator keyed by (seed, CRC32 of its name), so a tensor's values do not
    depend on which other tensors exist or on the iteration order. ``mlp_std`` = (gate/up std, down std)
    overrides the MLP projections' scales (see ``build_toy_model``).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    mx_dtype = getattr(mx, dtype)
    new = []
    for name, param in sorted(tree_flatten(model.parameters())):
        if name.endswith("norm.weight"):
            values = np.ones(param.shape, dtype=np.float32)
        else:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))
            values = _random_matrix(rng, tuple(param.shape), _weight_std(name, config, mlp_std))
        new.append((name, mx.array(values).astype(mx_dtype)))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def _validate(shape: ToyShape, bits, group_size: int, dtype: str, mlp_std=None) -> None:
    if mlp_std is not None and (
        not isinstance(mlp_std, (list, tuple))
        or len(mlp_std) != 2
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in mlp_std)
    ):
        raise ReqnoiseError(f"mlp_std={mlp_std!r} must be two positive numbers (gate/up std, down std)")
    if bits is not None and bits not in SUPPORTED_BITS:
        raise ReqnoiseError(f"bits={bits} is not an MLX affine bit width {SUPPORTED_BITS} (or None)")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ReqnoiseError(f"group_size={group_size} is not one of {SUPPORTED_GROUP_SIZES}")
    if dtype not in SUPPORTED_DTYPES:
        raise ReqnoiseError(f"dtype={dtype!r} is not one of {SUPPORTED_DTYPES}")
    shape.check()


def build_toy_model(
    save_path,
    shape: ToyShape | None = None,
    *,
    bits: int | None = 3,
    group_size: int = 64,
    seed: int = 0,
    dtype: str = DEFAULT_DTYPE,
    overwrite: bool = False,
    extra_corpus: list[str] | None = None,
    mlp_std: tuple[float, float] | None = None,
    **sizes,
) -> Path:
    """Build the toy qwen3_moe model and write it as an mlx-lm model directory at ``save_path``.

    The sizes are ``shape`` (None = ToyShape's defaults) with ``sizes`` (ToyShape fields as keywords, e.g.
    ``num_experts=32``) replacing its fields. Weights are random from ``seed`` and stored in ``dtype``; with
    ``bits`` set they are then quantized by ``mlx_lm.utils.quantize_model`` (affine, ``group_size``), keeping
    mlx-lm's qwen3_moe predicate, which puts the routers at 8 bits group 64. ``bits=None`` writes the
    unquantized model. The tokenizer is trained on the built-in corpus plus ``extra_corpus``; ``vocab_size``
    is its total token count and the model's. Same arguments give byte-identical files. The directory appears
    only when complete; an existing ``save_path`` is refused unless ``overwrite``. Returns the directory's path.

    ``mlp_std`` = (gate/up std, down std) of the MLP projections (experts and dense); None keeps 0.02 and the
    depth-scaled 0.02 / sqrt(2 L), at which the experts' pre-activations are ~0.2, SiLU is nearly linear and
    the experts add a few percent to the residual stream, so the outputs hardly move when expert weights do: a
    zero-delta 3-bit requantization of 3 layers' down projections changed 1.5% of the 200 demo items'
    calibrated answers. (0.1, 0.02) gives O(1) pre-activations, as in trained models: the same requantization
    changed 16.5%. (The demo keeps the default: with (0.1, 0.02) its zero-delta control moved 1 of 36 Set-G
    answers, while its positive-control adapter learned too little in the same budget to be detected.)

    Measured on a 2-core x86 CPU with the defaults (mlx's CPU kernels run single-threaded there): a forward
    pass over 8 x 64 tokens takes 0.32 s in float32, 2.6-4.2 s in bfloat16, 13-18 s in float16; a rank-8
    LoRA step (attention and expert projections of all 4 layers, batch 4 x 64 tokens, mlx-lm's trainer)
    0.49 s in float32 vs 2.1-5.8 s in bfloat16. Hence float32 by default. Unquantized bfloat16/float16
    models do not run on CPU at all (GatherMM is float32-only there).
    """
    import mlx_lm.utils as mlx_utils
    from mlx_lm.models import qwen3_moe

    save_path = Path(save_path)
    shape = ToyShape.of(shape, **sizes)
    _validate(shape, bits, group_size, dtype, mlp_std)
    config = toy_config(shape, dtype=dtype)
    with atomic_dir(save_path, overwrite=overwrite) as tmp:
        tokenizer = train_tokenizer(extra_corpus, vocab_size=shape.vocab_size)
        if len(tokenizer) != shape.vocab_size:
            raise ReqnoiseError(
                f"the toy tokenizer reached only {len(tokenizer)} tokens, not vocab_size={shape.vocab_size}: "
                "pass a smaller vocab_size or a larger extra_corpus"
            )
        config.update(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))
        init_toy_weights(model, config, seed, dtype, mlp_std)
        if bits is not None:
            # quantize_model prints a bits-per-weight line; keep library callers' stdout clean.
            with contextlib.redirect_stdout(io.StringIO()):
                model, config = mlx_utils.quantize_model(model, config, group_size, bits)
        mlx_utils.save_model(tmp, model)
        mlx_utils.save_config(config, config_path=tmp / "config.json")
        save_tokenizer(tokenizer, tmp)
    return save_path
