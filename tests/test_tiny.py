"""Tiny configs are consistent: the fixed architectures build and train one step, and the fixes
come from a config's attributes alone, not from its model type."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import fastft  # noqa: F401 - first, as everywhere in the project
from fastft.tiny import TINY_SIZES, build_tiny_model, consistency_fixes, random_batch

# Each needed a different rule: rotary_dim, latent-attention head parts, a run-length attention
# pattern, a read-only head_dim, a fixed-length layer_types list, per-layer-type rope parameters,
# a count of kv-shared layers, prompt rows in the input embedding.
FIXED = ["gptj", "deepseek_v3", "gpt_neo", "falcon", "zamba2", "cohere_compass_text", "gemma3n_text", "cpmant"]


@pytest.mark.parametrize("model_type", FIXED)
def test_tiny_model_trains_one_step(model_type: str) -> None:
    model = build_tiny_model(model_type)
    model.train()
    out = model(**random_batch(model))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert sum(p.numel() for p in model.parameters()) < 20_000_000


@dataclasses.dataclass
class _SomeConfig:
    """No transformers class and no model type: only attribute names a real config might have."""
    rotary_dim: int = 64
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    num_key_value_heads: int = 2
    layer_types: list = dataclasses.field(default_factory=lambda: ["sliding_attention"] * 5 + ["full_attention"])
    num_kv_shared_layers: int = 4
    moe_intermediate_size: int = 1407
    vocab_size_per_layer_input: int = 262_144
    decoder_attention_heads: int = 12
    attention_types: list = dataclasses.field(default_factory=lambda: [[["global", "local"], 12]])


def test_fixes_come_from_attributes_alone() -> None:
    fixes = consistency_fixes(_SomeConfig())
    head = TINY_SIZES["head_dim"]
    assert fixes["rotary_dim"] == head // 2
    assert fixes["qk_rope_head_dim"] == fixes["qk_nope_head_dim"] == fixes["v_head_dim"] == head
    assert fixes["num_key_value_heads"] == TINY_SIZES["num_attention_heads"]
    assert "q_lora_rank" not in fixes  # None: no low-rank query path, left as it is
    assert fixes["layer_types"] == ["sliding_attention", "full_attention"]  # one of each kind
    assert fixes["num_kv_shared_layers"] == 1
    assert fixes["moe_intermediate_size"] == TINY_SIZES["intermediate_size"]
    assert fixes["vocab_size_per_layer_input"] == TINY_SIZES["vocab_size"]
    assert fixes["decoder_attention_heads"] == TINY_SIZES["num_attention_heads"]  # 12 does not divide 64
    assert fixes["attention_types"] == [[["global"], 1], [["local"], 1]]


def test_consistent_config_needs_no_fix() -> None:
    @dataclasses.dataclass
    class Consistent:
        rotary_dim: int = 8
        layer_types: list = dataclasses.field(default_factory=lambda: ["full_attention"] * 2)

    assert consistency_fixes(Consistent()) == {}
