"""The toy model's sizes and dtypes: what `reqnoise toy-model` offers, importable without numpy or mlx."""

import dataclasses
from dataclasses import dataclass, field, fields

from reqnoise.errors import ReqnoiseError
from reqnoise.toy.tokenizer import DEFAULT_VOCAB_SIZE

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# float32 by default: on CPU, bf16/fp16 quantized matmuls are several times slower (see build_toy_model).
DEFAULT_DTYPE = "float32"


@dataclass(frozen=True)
class ToyShape:
    """The toy model's sizes, in Qwen3-MoE's config names (``vocab_size`` is also the tokenizer's size).

    Every layer is an MoE layer; ``intermediate_size`` (the dense MLP width) is written to config.json only.
    """

    num_layers: int = field(default=4, metadata={"help": "decoder layers"})
    num_experts: int = field(default=8, metadata={"help": "experts per MoE layer"})
    num_experts_per_tok: int = field(default=2, metadata={"help": "experts each token is routed to: top-k routing"})
    hidden_size: int = field(default=128, metadata={"help": "residual stream width, a multiple of 128"})
    moe_intermediate_size: int = field(default=128, metadata={"help": "expert MLP width, a multiple of 128"})
    intermediate_size: int = field(
        default=256, metadata={"help": "dense MLP width in config.json (every toy layer is MoE), a multiple of 128"}
    )
    num_attention_heads: int = field(default=4, metadata={"help": "query heads"})
    num_key_value_heads: int = field(default=2, metadata={"help": "key/value heads (grouped-query attention)"})
    head_dim: int = field(default=32, metadata={"help": "width of one attention head"})
    vocab_size: int = field(
        default=DEFAULT_VOCAB_SIZE, metadata={"help": "tokens of the tokenizer trained on the spot and of the model"}
    )

    @classmethod
    def of(cls, shape: "ToyShape | None" = None, **sizes) -> "ToyShape":
        """``shape`` (None = the defaults) with the given fields replaced; an unknown name is a TypeError."""
        unknown = sorted(set(sizes) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown toy shape field(s) {unknown}; ToyShape has {[f.name for f in fields(cls)]}")
        return dataclasses.replace(shape if shape is not None else cls(), **sizes)

    def check(self) -> None:
        """Refuse sizes the toy cannot be built or fully quantized with (ReqnoiseError)."""
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ReqnoiseError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and num_experts={self.num_experts}"
            )
        # mlx-lm's quantize_model silently leaves a layer in float when its input dim does not divide.
        inputs = {
            "hidden_size": self.hidden_size,
            "num_attention_heads*head_dim": self.num_attention_heads * self.head_dim,
            "moe_intermediate_size": self.moe_intermediate_size,
            "intermediate_size": self.intermediate_size,
        }
        for name, size in inputs.items():
            if size <= 0 or size % 128:
                raise ReqnoiseError(f"{name}={size} must be a positive multiple of 128 (quantization group sizes)")
