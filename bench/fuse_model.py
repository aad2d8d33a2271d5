"""Benchmark: `reqnoise fuse` vs `mlx_lm fuse` on a synthetic multi-shard 3-bit MoE model (>= 2 GB).

Builds, offline, a qwen3_moe model directory in mlx-lm's layout with random packed weights (3-bit experts,
8-bit routers as mlx-lm quantizes them), an adapter on the last layers' expert down projections and query
projections, then runs both fuses as separate processes and prints JSON: wall time and peak RSS of each
(from wait4's rusage of that process), their ratios, and whether the fused weights agree.

    python bench/fuse_model.py [--layers 16] [--experts 64] [--workdir DIR] [--keep]
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

import mlx.core as mx
import numpy as np

SHARD_BYTES = 512 << 20


def build_model(
    root: Path, layers: int, experts: int, hidden=2048, moe_inter=768, heads=16, kv_heads=4, head_dim=128, seed=0
):
    from reqnoise.toy.model import build_toy_model

    toy = build_toy_model(root / "toy-tokenizer")
    vocab = json.loads((toy / "config.json").read_text())["vocab_size"]
    cfg = json.loads((toy / "config.json").read_text())
    cfg.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_experts=experts,
        num_experts_per_tok=8,
        moe_intermediate_size=moe_inter,
        intermediate_size=4 * hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        torch_dtype="bfloat16",
    )
    q = {"group_size": 64, "bits": 3, "mode": "affine"}
    for i in range(layers):
        q[f"model.layers.{i}.mlp.gate"] = {"group_size": 64, "bits": 8}
    cfg["quantization"] = q
    cfg["quantization_config"] = dict(q)
    rng = np.random.default_rng(seed)

    def quant(shape, bits, group=64):
        out, inn = shape[:-1], shape[-1]
        wq = mx.array(rng.integers(0, 2**32, out + (inn * bits // 32,), dtype=np.uint32))
        s = mx.array((rng.uniform(0.5, 1.5, out + (inn // group,)) * 0.005).astype(np.float32)).astype(mx.bfloat16)
        b = mx.array(-s.astype(mx.float32) * (2**bits - 1) / 2).astype(mx.bfloat16)
        return wq, s, b

    tensors = {}
    model_dir = root / "model"
    model_dir.mkdir()
    shards, sizes = [], []

    def flush(final=False):
        if tensors and (final or sum(v.nbytes for v in tensors.values()) >= SHARD_BYTES):
            shards.append(dict(tensors))
            tensors.clear()

    def add(name, shape, bits):
        wq, s, b = quant(shape, bits)
        tensors[f"{name}.weight"], tensors[f"{name}.scales"], tensors[f"{name}.biases"] = wq, s, b

    add("model.embed_tokens", (vocab, hidden), 3)
    for i in range(layers):
        p = f"model.layers.{i}"
        add(f"{p}.self_attn.q_proj", (heads * head_dim, hidden), 3)
        add(f"{p}.self_attn.k_proj", (kv_heads * head_dim, hidden), 3)
        add(f"{p}.self_attn.v_proj", (kv_heads * head_dim, hidden), 3)
        add(f"{p}.self_attn.o_proj", (hidden, heads * head_dim), 3)
        tensors[f"{p}.self_attn.q_norm.weight"] = mx.ones((head_dim,), dtype=mx.bfloat16)
        tensors[f"{p}.self_attn.k_norm.weight"] = mx.ones((head_dim,), dtype=mx.bfloat16)
        add(f"{p}.mlp.gate", (experts, hidden), 8)
        add(f"{p}.mlp.switch_mlp.gate_proj", (experts, moe_inter, hidden), 3)
        add(f"{p}.mlp.switch_mlp.up_proj", (experts, moe_inter, hidden), 3)
        add(f"{p}.mlp.switch_mlp.down_proj", (experts, hidden, moe_inter), 3)
        tensors[f"{p}.input_layernorm.weight"] = mx.ones((hidden,), dtype=mx.bfloat16)
        tensors[f"{p}.post_attention_layernorm.weight"] = mx.ones((hidden,), dtype=mx.bfloat16)
        flush()
    tensors["model.norm.weight"] = mx.ones((hidden,), dtype=mx.bfloat16)
    add("lm_head", (vocab, hidden), 3)
    flush(final=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(model_dir / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
        sizes.append((model_dir / name).stat().st_size)
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": sum(v.nbytes for s in shards for v in s.values())},
                "weight_map": dict(sorted(weight_map.items())),
            },
            indent=4,
        )
    )
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=4))
    for f in toy.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy2(f, model_dir / f.name)
    return model_dir, sum(sizes), len(shards), max(sizes)


def build_adapter(
    root: Path,
    layers: int,
    experts: int,
    num_adapted: int,
    rank=8,
    hidden=2048,
    moe_inter=768,
    heads=16,
    head_dim=128,
    seed=1,
):
    rng = np.random.default_rng(seed)
    t = {}
    for i in range(layers - num_adapted, layers):
        p = f"model.layers.{i}"
        t[f"{p}.mlp.switch_mlp.down_proj.lora_a"] = rng.standard_normal((experts, rank, moe_inter)) * 0.01
        t[f"{p}.mlp.switch_mlp.down_proj.lora_b"] = rng.standard_normal((experts, hidden, rank)) * 0.01
        t[f"{p}.self_attn.q_proj.lora_a"] = rng.standard_normal((hidden, rank)) * 0.01
        t[f"{p}.self_attn.q_proj.lora_b"] = rng.standard_normal((rank, heads * head_dim)) * 0.01
    ad = root / "adapter"
    ad.mkdir()
    mx.save_safetensors(str(ad / "adapters.safetensors"), {k: mx.array(v.astype(np.float32)) for k, v in t.items()})
    (ad / "adapter_config.json").write_text(
        json.dumps(
            {
                "fine_tune_type": "lora",
                "num_layers": num_adapted,
                "lora_parameters": {
                    "rank": rank,
                    "scale": 2.0,
                    "dropout": 0.0,
                    "keys": ["mlp.switch_mlp.down_proj", "self_attn.q_proj"],
                },
            }
        )
    )
    return ad


def timed(cmd):
    """Wall time and peak RSS (bytes) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    return wall, ru.ru_maxrss * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--adapted-layers", type=int, default=4)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="reqnoise-bench-"))
    if args.build_only:
        model, size, n_shards, largest = build_model(root, args.layers, args.experts)
        build_adapter(root, args.layers, args.experts, args.adapted_layers)
        (root / "built.json").write_text(json.dumps([size, n_shards, largest]))
        return
    try:
        # Build in a child: a forked child's peak RSS would otherwise include this process's pages.
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--build-only",
                "--workdir",
                str(root),
                "--layers",
                str(args.layers),
                "--experts",
                str(args.experts),
                "--adapted-layers",
                str(args.adapted_layers),
            ],
            check=True,
        )
        size, n_shards, largest = json.loads((root / "built.json").read_text())
        model, adapter = root / "model", root / "adapter"
        build_s = time.perf_counter() - t0
        t_rn, rss_rn = timed(
            [
                sys.executable,
                "-m",
                "reqnoise",
                "fuse",
                "--quiet",
                "--model",
                str(model),
                "--adapter-path",
                str(adapter),
                "--save-path",
                str(root / "out-reqnoise"),
            ]
        )
        t_ml, rss_ml = timed(
            [
                sys.executable,
                "-m",
                "mlx_lm",
                "fuse",
                "--model",
                str(model),
                "--adapter-path",
                str(adapter),
                "--save-path",
                str(root / "out-mlx-lm"),
            ]
        )
        agree = total = 0
        for f in sorted((root / "out-reqnoise").glob("model-*.safetensors")):
            ours = mx.load(str(f))
            theirs = {}
            for g in sorted((root / "out-mlx-lm").glob("model*.safetensors")):
                theirs.update({k: v for k, v in mx.load(str(g)).items() if k in ours})
            for k, v in ours.items():
                total += 1
                agree += int(k in theirs and v.shape == theirs[k].shape and mx.array_equal(v, theirs[k]).item())
            del theirs, ours
        print(
            json.dumps(
                {
                    "model_bytes": size,
                    "shards": n_shards,
                    "largest_shard_bytes": largest,
                    "layers": args.layers,
                    "experts": args.experts,
                    "adapted_layers": args.adapted_layers,
                    "build_s": round(build_s, 1),
                    "reqnoise_s": round(t_rn, 2),
                    "mlx_lm_s": round(t_ml, 2),
                    "time_ratio_mlx_lm_over_reqnoise": round(t_ml / t_rn, 2),
                    "reqnoise_peak_rss_bytes": rss_rn,
                    "mlx_lm_peak_rss_bytes": rss_ml,
                    "peak_rss_ratio_reqnoise_over_mlx_lm": round(rss_rn / rss_ml, 3),
                    "tensors_bit_identical": f"{agree}/{total}",
                }
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
