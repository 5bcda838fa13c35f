"""Published shapes of the models people fine-tune: the config.json fields that set memory and compute, as plain
data (no imports), shared by the memory plan (`jqlora.planning.memory`), its CLI (`python -m jqlora.plan`) and
tools/bench.py."""

from __future__ import annotations

from typing import Any

# Published config.json values (the fields that shape memory and compute), shared with tools/bench.py.
PUBLISHED: dict[str, dict[str, Any]] = {
    "llama3-8b": {  # meta-llama/Meta-Llama-3-8B (3.1 has the same shapes)
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "llama3-70b": {  # meta-llama/Meta-Llama-3-70B
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "mistral-7b": {  # mistralai/Mistral-7B-v0.1
        "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 32768, "sliding_window": 4096,
        "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "qwen2.5-7b": {  # Qwen/Qwen2.5-7B (q/k/v biases)
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "use_sliding_window": False,
        "sliding_window": 131072, "max_window_layers": 28, "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "gemma2-9b": {  # google/gemma-2-9b (1:1 local/global layers, soft-capping, tied 256k vocabulary)
        "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 3584, "intermediate_size": 14336,
        "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "query_pre_attn_scalar": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 8192,
        "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
    },
    "gemma3-12b": {  # google/gemma-3-12b-pt, its text_config (5:1 local/global layers, two RoPE bases)
        "model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 3840, "intermediate_size": 15360,
        "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
        "query_pre_attn_scalar": 256, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131072, "sliding_window": 1024, "sliding_window_pattern": 6,
        "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh",
    },
    # Phi: fused qkv_proj / gate_up_proj. Their LongRoPE factor lists are left out here: they change no shape.
    "phi3.5-mini": {  # microsoft/Phi-3.5-mini-instruct
        "model_type": "phi3", "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "sliding_window": 262144, "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "phi4-mini": {  # microsoft/Phi-4-mini-instruct (GQA, partial rotary 0.75, tied 200k vocabulary)
        "model_type": "phi3", "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8, "rope_theta": 10000.0,
        "partial_rotary_factor": 0.75, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "sliding_window": 262144, "tie_word_embeddings": True,
        "hidden_act": "silu",
    },
    "mixtral-8x7b": {  # mistralai/Mixtral-8x7B-v0.1: 8 experts, 2 per token
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 1e6,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 32768, "num_local_experts": 8, "num_experts_per_tok": 2,
        "tie_word_embeddings": False, "hidden_act": "silu",
    },
    "qwen3-30b-a3b": {  # Qwen/Qwen3-30B-A3B: 128 experts of width 768, 8 per token
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "tie_word_embeddings": False,
        "hidden_act": "silu",
    },
}
NAMES = {"llama3-8b": "Llama-3-8B", "llama3-70b": "Llama-3-70B", "mistral-7b": "Mistral-7B",
         "qwen2.5-7b": "Qwen2.5-7B", "gemma2-9b": "Gemma-2-9B", "gemma3-12b": "Gemma-3-12B",
         "phi3.5-mini": "Phi-3.5-mini", "phi4-mini": "Phi-4-mini", "mixtral-8x7b": "Mixtral-8x7B",
         "qwen3-30b-a3b": "Qwen3-30B-A3B"}

# Hugging Face hub ids (lower case) with the published shapes above; `--model` also takes the last part alone
# (a checkpoint directory's usual name) and a recipe's name (configs/<name>.yaml).
HUB_IDS: dict[str, str] = {
    **{f"meta-llama/{n}": "llama3-8b" for n in (
        "meta-llama-3-8b", "meta-llama-3-8b-instruct", "llama-3.1-8b", "llama-3.1-8b-instruct",
        "meta-llama-3.1-8b", "meta-llama-3.1-8b-instruct")},
    **{f"meta-llama/{n}": "llama3-70b" for n in (
        "meta-llama-3-70b", "meta-llama-3-70b-instruct", "llama-3.1-70b", "llama-3.1-70b-instruct",
        "meta-llama-3.1-70b", "meta-llama-3.1-70b-instruct", "llama-3.3-70b-instruct")},
    "mistralai/mistral-7b-v0.1": "mistral-7b", "mistralai/mistral-7b-instruct-v0.1": "mistral-7b",
    "mistralai/mistral-7b-v0.3": "mistral-7b-v0.3", "mistralai/mistral-7b-instruct-v0.3": "mistral-7b-v0.3",
    "qwen/qwen2.5-7b": "qwen2.5-7b", "qwen/qwen2.5-7b-instruct": "qwen2.5-7b",
}
