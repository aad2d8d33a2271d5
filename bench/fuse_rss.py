"""Benchmark: peak memory of `reqnoise fuse` on a multi-shard 3-bit MoE model of several GB, against the largest
shard and the model.

Builds a qwen3_moe model directory in mlx-lm's layout (random packed 3-bit codes, 8-bit routers, bf16 scales
and biases), writing each safetensors shard tensor by tensor in chunks, so the builder itself holds at most
one chunk (64 MiB) and not the model. Shards are cut at a byte limit wherever a tensor ends, so some modules
straddle two shards as in published models. An mlx-lm LoRA adapter on every layer's query and expert-down
projections is fused with `python -m reqnoise fuse` in a child process; its peak RSS comes from that child's
rusage (``os.wait4``). The same is measured for a child that only imports what the fuse imports (the fixed
cost). Prints one JSON object. The parent never imports mlx or numpy, so a child's peak cannot include the
parent's pages.

    python bench/fuse_rss.py [--layers 32] [--experts 64] [--shard-mib 1024] [--workdir DIR] [--keep]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK_BYTES = 64 << 20
DTYPE_BYTES = {"U32": 4, "BF16": 2, "F32": 4}


# ------------------------------------------------------------------------------------ model layout (no mlx)


def layout(layers, experts, hidden=2048, moe_inter=768, heads=16, kv_heads=4, head_dim=128, vocab=32768):
    """(config, tensors): tensors as (name, dtype, shape, kind) in file order; kind says how to fill it."""
    q = {"group_size": 64, "bits": 3, "mode": "affine"}
    out = []

    def quant(name, shape, bits):
        *lead, inn = shape
        out.append((f"{name}.weight", "U32", (*lead, inn * bits // 32), "codes"))
        out.append((f"{name}.scales", "BF16", (*lead, inn // 64), f"scales{bits}"))
        out.append((f"{name}.biases", "BF16", (*lead, inn // 64), f"biases{bits}"))

    quant("model.embed_tokens", (vocab, hidden), 3)
    for i in range(layers):
        p = f"model.layers.{i}"
        out.append((f"{p}.input_layernorm.weight", "BF16", (hidden,), "ones"))
        quant(f"{p}.mlp.gate", (experts, hidden), 8)
        q[f"{p}.mlp.gate"] = {"group_size": 64, "bits": 8}
        quant(f"{p}.mlp.switch_mlp.down_proj", (experts, hidden, moe_inter), 3)
        quant(f"{p}.mlp.switch_mlp.gate_proj", (experts, moe_inter, hidden), 3)
        quant(f"{p}.mlp.switch_mlp.up_proj", (experts, moe_inter, hidden), 3)
        out.append((f"{p}.post_attention_layernorm.weight", "BF16", (hidden,), "ones"))
        quant(f"{p}.self_attn.k_proj", (kv_heads * head_dim, hidden), 3)
        out.append((f"{p}.self_attn.k_norm.weight", "BF16", (head_dim,), "ones"))
        quant(f"{p}.self_attn.o_proj", (hidden, heads * head_dim), 3)
        quant(f"{p}.self_attn.q_proj", (heads * head_dim, hidden), 3)
        out.append((f"{p}.self_attn.q_norm.weight", "BF16", (head_dim,), "ones"))
        quant(f"{p}.self_attn.v_proj", (kv_heads * head_dim, hidden), 3)
    out.append(("model.norm.weight", "BF16", (hidden,), "ones"))
    quant("lm_head", (vocab, hidden), 3)
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "moe_intermediate_size": moe_inter,
        "num_hidden_layers": layers,
        "num_experts": experts,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization": q,
        "quantization_config": dict(q),
    }
    return config, out


def nbytes(dtype, shape):
    n = DTYPE_BYTES[dtype]
    for d in shape:
        n *= d
    return n


def plan_shards(tensors, limit):
    """Consecutive tensors per shard, a new shard once ``limit`` bytes are reached (cut between tensors)."""
    shards, cur, size = [], [], 0
    for t in tensors:
        cur.append(t)
        size += nbytes(t[1], t[2])
        if size >= limit:
            shards.append(cur)
            cur, size = [], 0
    if cur:
        shards.append(cur)
    return shards


# ------------------------------------------------------------------------------------- streaming builder


def _fill(rng, dtype, kind, count):
    """``count`` elements of one tensor, as bytes."""
    import numpy as np

    if kind == "codes":
        return rng.integers(0, 2**32, count, dtype=np.uint32).tobytes()
    if kind == "ones":
        x = np.ones(count, dtype=np.float32)
    else:
        bits = int(kind[6:])
        s = rng.uniform(0.5, 1.5, count).astype(np.float32) * 0.005
        x = s if kind.startswith("scales") else -s * (2**bits - 1) / 2
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # bf16 by truncation


def write_shard(path, tensors, rng):
    """One safetensors file, written tensor by tensor, each in chunks of at most CHUNK_BYTES."""
    header, off = {"__metadata__": {"format": "mlx"}}, 0
    for name, dtype, shape, _ in tensors:
        n = nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for _, dtype, shape, kind in tensors:
            left = nbytes(dtype, shape) // DTYPE_BYTES[dtype]
            step = CHUNK_BYTES // DTYPE_BYTES[dtype]
            while left:
                k = min(step, left)
                fh.write(_fill(rng, dtype, kind, k))
                left -= k
    return path.stat().st_size


def build(root: Path, layers: int, experts: int, shard_mib: int, rank: int, seed: int = 0) -> dict:
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(seed)
    config, tensors = layout(layers, experts)
    shards = plan_shards(tensors, shard_mib << 20)
    model = root / "model"
    model.mkdir(parents=True)
    weight_map, sizes = {}, []
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        sizes.append(write_shard(model / name, shard, rng))
        weight_map.update({t[0]: name for t in shard})
    total = sum(nbytes(t[1], t[2]) for t in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (model / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    (model / "config.json").write_text(json.dumps(config, indent=4))
    modules = {}
    for name, file in weight_map.items():
        modules.setdefault(name.rsplit(".", 1)[0], set()).add(file)
    straddling = sorted(m for m, files in modules.items() if len(files) > 1)

    # The adapter: every layer's q_proj (LoRALinear) and expert down_proj (LoRASwitchLinear), float32.
    hidden, inter, q_out = config["hidden_size"], config["moe_intermediate_size"], 16 * 128
    ad = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        ad[f"{p}.self_attn.q_proj.lora_a"] = rng.standard_normal((hidden, rank), dtype=np.float32) * 0.01
        ad[f"{p}.self_attn.q_proj.lora_b"] = rng.standard_normal((rank, q_out), dtype=np.float32) * 0.01
        ad[f"{p}.mlp.switch_mlp.down_proj.lora_a"] = (
            rng.standard_normal((experts, rank, inter), dtype=np.float32) * 0.01
        )
        ad[f"{p}.mlp.switch_mlp.down_proj.lora_b"] = (
            rng.standard_normal((experts, hidden, rank), dtype=np.float32) * 0.01
        )
    adapter = root / "adapter"
    adapter.mkdir()
    mx.save_safetensors(str(adapter / "adapters.safetensors"), {k: mx.array(v) for k, v in ad.items()})
    lora = {"rank": rank, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.switch_mlp.down_proj"]}
    (adapter / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": layers, "lora_parameters": lora})
    )
    largest_module = max(
        sum(nbytes(t[1], t[2]) for t in tensors if t[0].rsplit(".", 1)[0] == m)
        for m in {n.rsplit(".", 1)[0] for n in ad}
    )
    return {
        "model_bytes": sum(sizes),
        "tensor_bytes": total,
        "shards": len(sizes),
        "largest_shard_bytes": max(sizes),
        "straddling_modules": len(straddling),
        "straddling_example": straddling[:2],
        "adapter_bytes": (adapter / "adapters.safetensors").stat().st_size,
        "adapted_modules": len(ad) // 2,
        "largest_adapted_module_bytes": largest_module,
    }


# ------------------------------------------------------------------------------------------------ measure


def child(cmd):
    """Run ``cmd``; (wall seconds, peak RSS bytes of that process from wait4's rusage, stderr tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode()  # drained before waiting, so a chatty child cannot block on a full pipe
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return time.perf_counter() - t0, ru.ru_maxrss * 1024  # Linux reports KiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--shard-mib", type=int, default=1024, help="shard size limit (MiB), cut between tensors")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the model, adapter and fused output")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="reqnoise-fuse-rss-"))
    if args.build_only:
        info = build(root, args.layers, args.experts, args.shard_mib, args.rank)
        (root / "built.json").write_text(json.dumps(info))
        return
    try:
        build_cmd = [sys.executable, __file__, "--build-only", "--workdir", str(root)]
        build_cmd += ["--layers", str(args.layers), "--experts", str(args.experts)]
        build_cmd += ["--shard-mib", str(args.shard_mib), "--rank", str(args.rank)]
        build_s, build_rss = child(build_cmd)
        info = json.loads((root / "built.json").read_text())
        _, base_rss = child([sys.executable, "-c", "import mlx.core, reqnoise.cli, reqnoise.fuse.model"])
        fuse_cmd = [sys.executable, "-m", "reqnoise", "fuse", "--quiet", "--model", str(root / "model")]
        fuse_cmd += ["--adapter-path", str(root / "adapter"), "--save-path", str(root / "fused")]
        fuse_s, fuse_rss = child(fuse_cmd)
        report = json.loads((root / "fused" / "fuse_report.json").read_text())
        out_bytes = sum(f.stat().st_size for f in (root / "fused").glob("*.safetensors"))
        gib = 1 << 30
        print(
            json.dumps(
                {
                    **info,
                    "layers": args.layers,
                    "experts": args.experts,
                    "fused_model_bytes": out_bytes,
                    "rewritten_shards": len(report["rewritten_shards"]),
                    "fused_modules": len(report["modules"]),
                    "build_s": round(build_s, 1),
                    "builder_peak_rss_bytes": build_rss,
                    "fuse_s": round(fuse_s, 1),
                    "fuse_peak_rss_bytes": fuse_rss,
                    "import_only_peak_rss_bytes": base_rss,
                    "fuse_peak_rss_gib": round(fuse_rss / gib, 3),
                    "peak_rss_over_largest_shard": round(fuse_rss / info["largest_shard_bytes"], 3),
                    "peak_rss_over_model": round(fuse_rss / info["model_bytes"], 3),
                    "peak_rss_minus_import_over_largest_shard": round(
                        (fuse_rss - base_rss) / info["largest_shard_bytes"], 3
                    ),
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
