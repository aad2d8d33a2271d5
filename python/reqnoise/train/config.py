"""Every option of ``train_adapter`` in one dataclass, in the manner of mlx-lm's ``TrainingArgs``.

One field per option, its help string in the field's metadata. ``reqnoise train`` builds its options from these
fields and the spec's ``[adapters.*]`` tables accept their names, so an option is added here once. mlx-free:
the CLI and the spec import it cheaply.
"""

import math
from dataclasses import dataclass, field, fields

from reqnoise.errors import ReqnoiseError

FINE_TUNE_TYPES = ("lora", "dora", "full")
MODES = ("sft", "dpo")


@dataclass
class TrainConfig:
    """The settings of one adapter training run (see ``reqnoise.train.tuner.train_adapter``)."""

    fine_tune_type: str = field(
        default="lora",
        metadata={
            "help": "lora, dora (dense layers at 2/4/8 bits or float only) or full (float weights only)",
            "choices": FINE_TUNE_TYPES,
        },
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank"})
    scale: float = field(default=20.0, metadata={"help": "mlx-lm's LoRA scale (a plain multiplier)"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate"})
    iters: int = field(default=100, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "examples per step"})
    layers: list[int] | None = field(default=None, metadata={"help": "block indices, e.g. 8,14,20 or 0-3"})
    modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "block-relative name suffixes, e.g. down_proj or self_attn.q_proj (comma-separated "
            "or repeated); default: every linear-type module in the selected blocks"
        },
    )
    keys: list[str] | None = field(
        default=None,
        metadata={"help": "exact full module paths (comma-separated or repeated); exclusive with --layers/--modules"},
    )
    mask_prompt: bool = field(default=False, metadata={"help": "train only on the last assistant message"})
    seed: int = field(default=0, metadata={"help": "LoRA initialisation and batch order"})
    max_seq_length: int = field(
        default=512, metadata={"help": "tokens per example; longer ones are truncated (counted in the summary)"}
    )

    mode: str = field(
        default="sft",
        metadata={
            "help": "sft (chat data) or dpo (pairs with prompt, chosen, rejected; loss on mlx-lm's trainer)",
            "choices": MODES,
        },
    )
    beta: float = field(default=0.1, metadata={"help": "DPO: inverse temperature of the preference loss"})
    reference: str | None = field(
        default=None,
        metadata={"help": "DPO: model directory anchoring the log-probabilities; default the stage's --model"},
    )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in field order."""
        return tuple(f.name for f in fields(cls))

    def check(self) -> "TrainConfig":
        """Refuse, before any work, settings mlx-lm would fail on late or train garbage with; returns self.

        Target selection (layers, modules, keys) is checked against the model by ``find_targets``.
        """
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise ReqnoiseError(f"fine_tune_type must be one of {FINE_TUNE_TYPES}, got {self.fine_tune_type!r}")
        for name in ("rank", "iters", "batch_size"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ReqnoiseError(f"{name} must be a positive integer, got {value!r}")
        if self.max_seq_length < 2:
            raise ReqnoiseError(f"max_seq_length must be at least 2, got {self.max_seq_length}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ReqnoiseError(f"lr must be a positive number, got {self.lr!r}")
        if not math.isfinite(self.scale):
            raise ReqnoiseError(f"scale must be a finite number, got {self.scale!r}")
        if self.mode not in MODES:
            raise ReqnoiseError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ReqnoiseError(f"beta must be a positive number, got {self.beta!r}")
        if self.reference is not None and self.mode != "dpo":
            raise ReqnoiseError("reference is the DPO reference model; it needs mode='dpo'")
        return self
