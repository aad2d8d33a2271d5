"""The model zoo: every mlx-lm model type whose MoE uses SwitchLinear, found in the pinned mlx-lm's sources, and
a tiny random configuration of each.

``switch_model_types()`` is generated: it parses ``mlx_lm/models/*.py`` and keeps every module that imports
``switch_layers`` directly or through another model module (qwen3_5_moe through qwen3_next, kimi_vl through
deepseek_v3, ...). ``DENSE_EXPERT_TYPES`` are the MoE families whose experts are a list of plain linears (no
switch layer; they fuse through the dense path). ``tiny_config(model_type)`` is the config.json of an instance
of a few MB: ``BASE`` (every size a multiple of 64 so groups of 32 and 64 quantize every layer) with the
family's own keys from ``OVERRIDES``.
"""

import ast
from pathlib import Path

DENSE_EXPERT_TYPES = ("dbrx",)

H = 64  # hidden size
BASE = {
    "hidden_size": H,
    "d_model": H,
    "dim": H,
    "num_hidden_layers": 2,
    "n_layers": 2,
    "num_layers": 2,
    "intermediate_size": 128,
    "ffn_hidden_size": 128,
    "moe_intermediate_size": 64,
    "expert_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "num_attention_heads": 2,
    "n_heads": 2,
    "num_key_value_heads": 1,
    "n_kv_heads": 1,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "layer_norm_eps": 1e-6,
    "norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 1.0,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "kv_lora_rank": 64,
    "q_lora_rank": 64,
    "qk_rope_head_dim": 32,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "rope_scaling": None,
}
_LINEAR_ATTN = {  # qwen3_next-style gated delta-net layers (qwen3_next, qwen3_5*)
    "linear_num_value_heads": 2,
    "linear_num_key_heads": 2,
    "linear_key_head_dim": 32,
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 2,
    "partial_rotary_factor": 0.25,
}
_YARN = {
    "type": "yarn",
    "factor": 1.0,
    "original_max_position_embeddings": 512,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 0,
}
_GEMMA4 = {  # gemma-4's MoE text model (enable_moe_block), without the 2B/4B per-layer inputs
    "enable_moe_block": True,
    "top_k_experts": 2,
    "global_head_dim": 64,
    "num_kv_shared_layers": 0,
    "hidden_size_per_layer_input": 0,
    "use_double_wide_mlp": False,
    "sliding_window": 64,
    "layer_types": ["sliding_attention", "full_attention"],
}
_KDA = {"kda_layers": [1], "num_heads": 2, "head_dim": 32, "short_conv_kernel_size": 4}
_LONGCAT = {
    "attention_method": "MLA",
    "zero_expert_type": "identity",
    "expert_ffn_hidden_size": 64,
    "zero_expert_num": 1,
    "mla_scale_q_lora": True,
    "mla_scale_kv_lora": True,
    "router_bias": True,
}
_MISTRAL4_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 1.0,
    "original_max_position_embeddings": 512,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "llama_4_scaling_beta": 0.1,
}
OVERRIDES: dict = {
    "glm4_moe": {"use_qk_norm": True, "partial_rotary_factor": 0.5},
    "minimax": {"shared_intermediate_size": 0, "rotary_dim": 16},
    "qwen3_next": _LINEAR_ATTN,
    "qwen3_5": {"text_config": dict(_LINEAR_ATTN, model_type="qwen3_5_text")},
    "qwen3_5_moe": {"text_config": dict(_LINEAR_ATTN, model_type="qwen3_5_moe_text")},
    # a Hadamard pack of a qwen3_5 (PACKS below): packed inputs are multiples of 128, rotated ones of 512
    "prism_hadamard_qwen35": {
        "text_config": dict(
            _LINEAR_ATTN, model_type="qwen3_5_text", hidden_size=128, shared_expert_intermediate_size=512
        ),
        "schema_version": 1,
        "tensor_namespace": "mlx-lm-text",
        "gdn_activation_layout": "grouped",
        "quantization": {"bits": 2, "group_size": 128, "mode": "affine"},
        "modules": [
            {"path": "model.embed_tokens", "embedding": True, "dtype": "float16", "block": 0},
            {"path": "lm_head", "embedding": False, "dtype": "float16", "block": 0},
            # the same modules in every block: mlx-lm's linear_to_lora_layers applies one block's keys to all
            *(
                {
                    "path": f"model.layers.{i}.mlp.shared_expert.{name}",
                    "embedding": False,
                    "dtype": "float16",
                    "block": b,
                }
                for i in range(2)
                for name, b in (("up_proj", 0), ("down_proj", 512))
            ),
        ],
    },
    "dbrx": {
        "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": 4, "moe_top_k": 2},
        "attn_config": {"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": 8.0},
    },
    "ernie4_5_moe": {"use_bias": False, "moe_layer_start_index": 1, "moe_num_shared_experts": 1},
    "hunyuan": {
        "num_shared_expert": 1,
        "use_mixed_mlp_moe": True,
        "use_qk_norm": True,
        "use_cla": False,
        "cla_share_factor": 1,
        "rope_scaling": {"type": "dynamic", "factor": 1.0, "alpha": 1.0},
    },
    "granitemoe": {
        "logits_scaling": 1.0,
        "attention_multiplier": 0.125,
        "embedding_multiplier": 1.0,
        "residual_multiplier": 1.0,
    },
    "solar_open": {"partial_rotary_factor": 1.0},
    "step3p5": {
        "num_attention_groups": 1,
        "moe_top_k": 2,
        "moe_layers_enum": "1",
        "share_expert_dim": 64,
        "sliding_window": 64,
        "layer_types": ["sliding_attention", "full_attention"],
        "swiglu_limits": [0.0, 7.0],
    },
    "exaone_moe": {
        "sliding_window": 64,
        "layer_types": ["sliding_attention", "full_attention"],
        "is_moe_layer": [False, True],
    },
    "afmoe": {"layer_types": ["sliding_attention", "full_attention"], "num_dense_layers": 1, "sliding_window": 64},
    "lfm2_moe": {
        "use_expert_bias": True,
        "num_dense_layers": 1,
        "conv_bias": False,
        "conv_L_cache": 3,
        "full_attn_idxs": [1],
        "layer_types": ["conv", "full_attention"],
    },
    "bailing_hybrid": {"layer_group_size": 2, "group_norm_size": 1},
    "bailing_moe_linear": {"layer_group_size": 2, "group_norm_size": 1},
    # DeepSeek-V2 checkpoints all carry YaRN scaling; the attention reads it unconditionally
    "deepseek_v2": {"rope_scaling": _YARN},
    "gemma4_text": _GEMMA4,
    "gemma4": {"text_config": dict(_GEMMA4, model_type="gemma4_text")},
    "glm_moe_dsa": {
        "index_head_dim": 32,
        "index_n_heads": 2,
        "index_topk": 4,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    },
    "granitemoehybrid": {
        "embedding_multiplier": 1.0,
        "attention_multiplier": 0.125,
        "logits_scaling": 1.0,
        "residual_multiplier": 1.0,
        "layer_types": ["mamba", "attention"],
        "shared_intermediate_size": 64,
        "mamba_n_heads": 2,
        "mamba_d_head": 32,
        "mamba_proj_bias": False,
        "mamba_d_state": 16,
        "mamba_d_conv": 4,
        "mamba_n_groups": 1,
        "mamba_conv_bias": True,
        "mamba_expand": 1,  # transformers' config (the tokenizer loader reads it): heads x head dim = expand x hidden
    },
    "jamba": {
        "attn_layer_offset": 1,
        "attn_layer_period": 2,
        "expert_layer_offset": 1,
        "expert_layer_period": 2,
        "mamba_d_conv": 4,
        "mamba_d_state": 16,
        "mamba_expand": 2,
    },
    "kimi_vl": {"text_config": {"model_type": "deepseek_v3"}},
    "kimi_k25": {"text_config": {"model_type": "deepseek_v3"}},
    "kimi_linear": {
        "linear_attn_config": _KDA,
        "model_max_length": 512,
        "num_experts_per_token": 2,
    },
    "kimi_k3": {
        "text_config": {
            "model_type": "kimi_linear",
            "hidden_act": "situ",
            "linear_attn_config": _KDA,
            "num_experts_per_token": 2,
            # attn_res_block_size stays unset: mlx-lm's attention-residual path reads the res projections'
            # .weight, which its own LoRA wrapper lacks (mlx_lm.load with an adapter then fails in the forward)
        }
    },
    "llama4": {
        "text_config": {
            "model_type": "llama4_text",
            "num_hidden_layers": 4,  # mlx-lm's llama4 takes its global mask from layer 3
            "num_experts_per_tok": 1,  # mlx-lm's llama4 asserts one expert per token
            "attention_chunk_size": 64,
            "interleave_moe_layer_step": 2,
            "intermediate_size": 64,
            "intermediate_size_mlp": 128,
            "use_qk_norm": True,
        }
    },
    "longcat_flash": _LONGCAT,
    "longcat_flash_ngram": dict(_LONGCAT, ngram_vocab_size_ratio=2, emb_neighbor_num=2, emb_split_num=2),
    "mellum": {
        "sliding_window": 64,
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_theta": 10000.0},
            "full_attention": {"rope_theta": 10000.0},
        },
    },
    "mimo_v2_flash": {
        "hybrid_layer_pattern": [1, 0],
        "moe_layer_freq": [0, 1],
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "sliding_window_size": 64,
        "layernorm_epsilon": 1e-5,
        "swa_rope_theta": 10000.0,
        "swa_num_attention_heads": 2,
        "swa_num_key_value_heads": 1,
        "swa_head_dim": 32,
        "swa_v_head_dim": 32,
        "partial_rotary_factor": 0.5,
    },
    "minimax_m3_vl": {
        "text_config": {
            "intermediate_size": 64,
            "dense_intermediate_size": 128,
            "shared_intermediate_size": 64,
            "mlp_layer_types": ["dense", "sparse"],
            "layer_types": ["full_attention", "minimax_m3_sparse"],
            "index_n_heads": 2,
            "index_head_dim": 32,
            "index_block_size": 2,
            "index_topk_blocks": 2,
        }
    },
    "mistral4": {"rope_parameters": _MISTRAL4_ROPE},
    "mistral3": {"text_config": {"model_type": "mistral4", "rope_parameters": _MISTRAL4_ROPE}},
    # muse_spark quantizes only the experts of the layers between the first and the last: three layers
    "muse_spark": {
        "text_config": {
            "num_hidden_layers": 3,
            "num_shared_experts": 0,
            "post_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 10000.0},
            "layer_rope_theta": [10000.0, 0.0, 10000.0],
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "sliding_window": 64,
            "final_logit_softcapping": 30.0,
            "output_multiplier": 1.0,
            "moe_hidden_size": 64,
        },
        # mlx-lm reads no audio; transformers' config (the tokenizer loader builds it) checks this width
        "audio_config": {"out_hidden_size": H},
    },
    "nemotron_h": {
        "hybrid_override_pattern": ["M", "*", "-", "E"],
        "mamba_num_heads": 2,
        "mamba_head_dim": 32,
        "mamba_proj_bias": False,
        "ssm_state_size": 16,
        "conv_kernel": 4,
        "n_groups": 1,
        "mlp_bias": False,
        "layer_norm_epsilon": 1e-5,
        "use_bias": False,
        "use_conv_bias": True,
        "moe_shared_expert_intermediate_size": 64,
    },
    "phixtral": {"model_dim": H, "num_heads": 2, "rotary_dim": 16},
    "qwen3_vl_moe": {"text_config": {"model_type": "qwen3_moe"}},
}


def switch_model_types(models_dir=None) -> list[str]:
    """Model modules of the installed mlx-lm that reach ``switch_layers`` through their relative imports."""
    if models_dir is None:
        import mlx_lm.models

        models_dir = Path(mlx_lm.models.__file__).parent
    deps = {}
    for path in Path(models_dir).glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        deps[path.stem] = found

    def reaches(name, seen):
        return name == "switch_layers" or any(reaches(d, seen | {name}) for d in deps.get(name, ()) if d not in seen)

    return sorted(m for m in deps if m != "switch_layers" and reaches(m, frozenset()))


def tiny_config(model_type: str, vocab_size: int) -> dict:
    """config.json of a tiny random instance of ``model_type`` (before quantization)."""
    extra = dict(OVERRIDES.get(model_type, {}))
    vocab = {"vocab_size": vocab_size, "num_vocab": vocab_size}  # phixtral spells it num_vocab
    if "text_config" in extra:  # a multimodal wrapper: the text model's config nests (gemma4 reads the vocab outside)
        text = dict(BASE, **vocab, **extra.pop("text_config"))
        return dict(model_type=model_type, text_config=text, tie_word_embeddings=False, **vocab, **extra)
    return dict(BASE, model_type=model_type, **vocab, **extra)


# Types an external packer writes, not mlx-lm's quantize_model: the one mode column each format fits, and the
# group size of that format. prism_hadamard_qwen35 (a "Hadamard pack"): 2-bit affine, group 128 only (its ModelArgs
# refuses anything else), with the linears and embedding listed in the config's "modules" stored as
# HadamardQuantizedLinear (a signed Walsh-Hadamard rotation folded into the input axis, a ``signs`` vector beside
# weight/scales/biases). conftest.Zoo writes such a pack itself.
PACKS: dict = {"prism_hadamard_qwen35": {"mode": "affine2", "group_size": 128}}

# Types whose mlx-lm forward pass runs Metal kernels only: built, quantized and fused everywhere, run only on a Mac.
NEEDS_METAL: dict = {
    "muse_spark": "mlx-lm's muse_spark forward calls mx.fast.metal_kernel (mlx_lm/kernels/qk_norm.py and 6 more) "
    "with no fallback; mlx_lm.generate raises '[metal_kernel] No Metal back-end' here",
}

# Types the suite enumerates but cannot build yet, with what stops a tiny instance (the tests skip them, saying so).
UNCONFIGURED: dict = {}
