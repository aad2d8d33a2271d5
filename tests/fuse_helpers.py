"""Adapters made through mlx-lm's own linear_to_lora_layers on the toy model, and a model comparer."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

KEYS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.switch_mlp.down_proj", "mlp.switch_mlp.up_proj"]


def make_adapter(
    model_dir,
    out_dir,
    *,
    rank=4,
    scale=2.0,
    keys=KEYS,
    seed=0,
    dyadic=True,
    size=0.02,
    fine_tune_type="lora",
    num_layers=4,
):
    """Wrap the model with mlx-lm's LoRA layers and fill every factor with non-zero values.

    dyadic: multiples of 2^-6 in [-1/8, 1/8], so every delta is exact in float32 and a fuse can be compared
    bit for bit with mlx-lm's."""
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = mlx_lm.load(str(model_dir))
    model.freeze()
    cfg = {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(keys)}
    linear_to_lora_layers(model, num_layers, cfg, use_dora=fine_tune_type == "dora")
    rng = np.random.default_rng(seed)
    params = dict(tree_flatten(model.trainable_parameters()))
    new = {}
    for k, v in params.items():
        if k.endswith(".m"):
            new[k] = v * mx.array(rng.uniform(0.9, 1.1, v.shape).astype(np.float32))
        elif dyadic:
            new[k] = mx.array(rng.integers(-8, 9, v.shape).astype(np.float32) / 64)
        else:
            new[k] = mx.array((rng.standard_normal(v.shape) * size).astype(np.float32))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "adapters.safetensors"), new)
    (out_dir / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": fine_tune_type, "num_layers": num_layers, "lora_parameters": cfg})
    )
    return out_dir


def weights(model_dir):
    out = {}
    for f in sorted(Path(model_dir).glob("model*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def dequantized(model_dir, module):
    """A module's weight as float32, dequantized with MLX's own op when quantized."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    w = weights(model_dir)
    if f"{module}.scales" not in w:
        return np.array(w[f"{module}.weight"].astype(mx.float32))
    q = cfg["quantization"]
    qp = q.get(module, q)
    return np.array(
        mx.dequantize(
            w[f"{module}.weight"],
            w[f"{module}.scales"],
            w[f"{module}.biases"],
            group_size=qp["group_size"],
            bits=qp["bits"],
        ).astype(mx.float32)
    )


def tree_bytes(model_dir):
    """{relative path: bytes} of every file."""
    root = Path(model_dir)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# Four memorisable chat examples (a question, one short fact as the reply): the training tests' data.
MEMO = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [
        ("Who guards the gate?", "The tall knight guards it."),
        ("Where is the key?", "Under the red stone."),
        ("What is the password?", "Seven green apples."),
        ("When does the ship leave?", "At dawn on Monday."),
    ]
]
