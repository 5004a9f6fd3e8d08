"""The benchmark shapes (published configs, random weights) and the per-shape run defaults."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Every linear of a decoder layer carries an adapter, as in Unsloth's and most QLoRA recipes.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK = 16
LORA_ALPHA = 16
MODES = ("lora", "qlora", "full")


def _llama3_rope(factor: float) -> dict[str, Any]:
    return dict(rope_type="llama3", rope_theta=500000.0, factor=factor, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=8192)


# Values from the models' config.json on the hub (ENVIRONMENT.md, "Benchmark shapes").
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-1b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters=_llama3_rope(32.0), bos_token_id=128000, eos_token_id=128001)),
    "llama-3.1-8b": ("LlamaConfig", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=_llama3_rope(8.0), bos_token_id=128000, eos_token_id=128001)),
    "qwen3-4b": ("Qwen3Config", dict(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), max_window_layers=36,
        use_sliding_window=False, bos_token_id=151643, eos_token_id=151645)),
    # Qwen2's attention gives q, k and v biases (the config has no switch for them): the shape for
    # adapted linears with a bias, 4-bit ones included.
    "qwen2.5-1.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        use_sliding_window=False, max_window_layers=21, bos_token_id=151643, eos_token_id=151643)),
    # Gemma3TextConfig's own rope defaults are the published ones (local 10,000, global 1e6),
    # with a sliding layer pattern of 5 local : 1 global.
    "gemma-3-1b": ("Gemma3TextConfig", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768, rms_norm_eps=1e-6,
        sliding_window=512, tie_word_embeddings=True, final_logit_softcapping=None,
        attn_logit_softcapping=None, pad_token_id=0, bos_token_id=2, eos_token_id=1)),
    # CPU smoke tests: the Llama code path at tests/'s tiny sizes.
    "tiny": ("LlamaConfig", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)),
}
SHAPES = tuple(CONFIGS)


def make_config(shape: str):
    import transformers

    class_name, values = CONFIGS[shape]
    config = getattr(transformers, class_name)(**values)
    config.use_cache = False
    return config


@dataclass(frozen=True)
class RunDefaults:
    batch: int
    seq: int
    warmup: int
    steps: int
    checkpointing: str  # "none" | "layer"
    timeout_s: int  # one system's subprocess (load + all steps)
    prepare_timeout_s: int  # building and saving the random-weight model once


def run_defaults(shape: str, mode: str) -> RunDefaults:
    """Sizes that let one shape + mode, five systems, finish in one 10-minute GPU call."""
    if shape == "tiny":
        return RunDefaults(batch=2, seq=32, warmup=1, steps=2, checkpointing="none", timeout_s=300,
                           prepare_timeout_s=120)
    if shape == "llama-3.1-8b":
        # QLoRA on 8B is what people run on one card, and it only fits there with checkpointing.
        ckpt = "layer" if mode in ("qlora", "full") else "none"
        return RunDefaults(batch=1, seq=2048, warmup=2, steps=5, checkpointing=ckpt, timeout_s=240,
                           prepare_timeout_s=240)
    ckpt = "layer" if mode == "qlora" else "none"
    return RunDefaults(batch=4, seq=2048, warmup=3, steps=10, checkpointing=ckpt, timeout_s=150,
                       prepare_timeout_s=150)
