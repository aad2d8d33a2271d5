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
OVERRIDES: dict = {
    "glm4_moe": {"use_qk_norm": True, "partial_rotary_factor": 0.5},
    "minimax": {"shared_intermediate_size": 0, "rotary_dim": 16},
    "qwen3_next": _LINEAR_ATTN,
    "qwen3_5": {"text_config": dict(_LINEAR_ATTN, model_type="qwen3_5_text")},
    "qwen3_5_moe": {"text_config": dict(_LINEAR_ATTN, model_type="qwen3_5_moe_text")},
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
    },
    "granitemoe": {
        "logits_scaling": 1.0,
        "attention_multiplier": 0.125,
        "embedding_multiplier": 1.0,
        "residual_multiplier": 1.0,
    },
    "solar_open": {"partial_rotary_factor": 1.0},
    "step3p5": {"num_attention_groups": 1},
    "mellum": {"sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"]},
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
}
# multimodal wrappers: the text model's config nests under text_config
TEXT_CONFIG_TYPES = ("qwen3_5", "qwen3_5_moe")


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
    if "text_config" in extra:
        text = dict(BASE, vocab_size=vocab_size, **extra.pop("text_config"))
        return dict(model_type=model_type, text_config=text, tie_word_embeddings=False, **extra)
    return dict(BASE, model_type=model_type, vocab_size=vocab_size, **extra)


# Types the suite enumerates but cannot build yet, with what stops a tiny instance (the tests skip them, saying so).
UNCONFIGURED: dict = {
    "bailing_hybrid": "ModelArgs needs 2 more fields: 'layer_group_size' and 'group_norm_size'",
    "bailing_moe_linear": "ModelArgs needs 2 more fields: 'layer_group_size' and 'group_norm_size'",
    "deepseek_v2": "'NoneType' object has no attribute 'get'",
    "gemma4": "the base config leaves gemma4's nested text/vision defaults at full size (4.2e9 pa...",
    "gemma4_text": "list index out of range",
    "glm_moe_dsa": "ModelArgs needs 4 more fields: 'index_head_dim', 'index_n_heads', 'index_topk', an",
    "granitemoehybrid": "ModelArgs needs 5 more fields: 'embedding_multiplier', 'attention_multiplier', 'lo",
    "hunyuan": "'NoneType' object is not subscriptable",
    "jamba": "ModelArgs needs 7 more fields: 'attn_layer_offset', 'attn_layer_period', 'expert_l",
    "kimi_k25": "ModelArgs needs 1 more field: 'text_config'",
    "kimi_k3": "Unsupported activation 'silu'",
    "kimi_linear": "ModelArgs needs 2 more fields: 'linear_attn_config' and 'model_max_length'",
    "kimi_vl": "ModelArgs needs 1 more field: 'text_config'",
    "llama4": "ModelArgs needs 1 more field: 'text_config'",
    "longcat_flash": "ModelArgs needs 6 more fields: 'attention_method', 'zero_expert_type', 'expert_ffn",
    "longcat_flash_ngram": "ModelArgs needs 4 more fields: 'expert_ffn_hidden_size', 'zero_expert_num', 'mla_s",
    "mellum": "'sliding_attention'",
    "mimo_v2_flash": "ModelArgs needs 11 more fields: 'hybrid_layer_pattern', 'add_swa_attention_sink_bi",
    "minimax_m3_vl": "ModelArgs needs 1 more field: 'text_config'",
    "mistral3": "ModelArgs needs 1 more field: 'text_config'",
    "mistral4": "'NoneType' object is not subscriptable",
    "muse_spark": "ModelArgs needs 1 more field: 'text_config'",
    "nemotron_h": "ModelArgs needs 10 more fields: 'mamba_num_heads', 'mamba_head_dim', 'mamba_proj_b",
    "phixtral": "ModelArgs ignores the base sizes (its own field names); the default instance has 7...",
    "prism_hadamard_qwen35": "Unsupported Hadamard pack: schema 2, namespace ''",
    "qwen3_vl_moe": "ModelArgs needs 1 more field: 'text_config'",
    "step3p5": "[argpartition] Received invalid kth 7 along axis -1 for array with shape: (1,4,4)",
}
