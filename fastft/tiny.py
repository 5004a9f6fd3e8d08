"""Tiny random-weight models built from an architecture's own config class (no hub access).

Used by ``fastft-inspect MODEL_TYPE`` and by tests: the architecture's code is the real one, only
the sizes are small (hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 128).
"""
from __future__ import annotations

import torch
import torch.nn as nn

TINY_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def tiny_config(model_type: str, **overrides):
    """The config of ``model_type`` with tiny sizes; for multimodal configs, their text part."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.for_model(model_type, **{**TINY_SIZES, **overrides})
    except ValueError as error:
        raise ValueError(f"unknown model type {model_type!r}: transformers knows no config for it") from error
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config and text.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config = AutoConfig.for_model(text.model_type, **{**TINY_SIZES, **overrides})
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"model type {model_type!r} has no causal-LM class in transformers")
    return config


def build_tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def random_batch(model: nn.Module, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids and labels inside the model's vocabulary, on the model's device."""
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else 128
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids.clone()}
