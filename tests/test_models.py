"""Model level: tiny random-weight Hugging Face models, optimised in place.

Every norm, rotary embedding, MLP activation (gated or not) and the loss is rewritten (counted from
the model's own modules and layers), ``fastft.check`` passes, three optimiser steps give the same
losses and parameters as the unoptimised twin."""
from __future__ import annotations

import pytest
import torch

import fastft
from fastft.tiny import random_batch

from helpers import assert_same_training, count_modules, tiny, twin

# Which families each architecture has, besides its norms (counted from the module classes):
# rotary attention in every layer, and a gated MLP in every layer (else an ungated one, whose
# activation is the mlp_act family's).
ARCHITECTURES = {
    "llama": dict(rope=True, glu=True),
    "qwen3": dict(rope=True, glu=True),
    "mistral": dict(rope=True, glu=True),
    "gemma3": dict(rope=True, glu=True),
    "phi3": dict(rope=True, glu=True),  # packed gate_up, partial-rotary code path
    "gpt_neox": dict(rope=True, glu=False),  # partial rotary, LayerNorm, plain GELU MLP
    "olmo": dict(rope=True, glu=True),  # LayerNorm without weights, computed in fp32
    "gpt2": dict(rope=False, glu=False),  # LayerNorm, written-out tanh GELU; a logger call before the loss
}


def expected_counts(model, model_type: str) -> dict[str, int]:
    layers = model.config.num_hidden_layers
    has = ARCHITECTURES[model_type]
    counts = {"rms_norm": count_modules(model, "RMSNorm"), "layer_norm": count_modules(model, "LayerNorm"),
              "rope": layers if has["rope"] else 0, "glu_mlp": layers if has["glu"] else 0,
              "mlp_act": 0 if has["glu"] else layers, "linear_cross_entropy": 1}
    return {k: v for k, v in counts.items() if v}


def _batches(model, n=3):
    return [random_batch(model, batch=2, seq=12, seed=s) for s in range(n)]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_every_region_rewritten_and_checked(model_type):
    model = tiny(model_type)
    expected = expected_counts(model, model_type)
    assert sum(expected.values()) >= 5
    fastft.optimize(model)
    batch = random_batch(model)
    model(**batch).loss.backward()
    report = fastft.report(model)
    assert report.counts() == expected, str(report)
    assert not report.capture_failures and not report.graph_breaks, str(report)
    assert report.near_misses == [], str(report)
    result = fastft.check(model, batch)
    assert result.ok, str(result)
    assert result.regions_checked == sum(expected.values())


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_training_matches_unoptimised(model_type):
    model = tiny(model_type)
    reference = twin(model)
    fastft.optimize(model)
    assert_same_training(reference, model, _batches(model))
    assert fastft.report(model).counts() == expected_counts(model, model_type)


@pytest.mark.parametrize("model_type", ["qwen3", "phi3", "olmo", "gpt_neox"])
def test_bf16_model_is_rewritten_and_checked(model_type):
    # bf16 is where the kernels must reproduce eager's roundings (rope, glu) and upcasts (norms).
    model = tiny(model_type, dtype=torch.bfloat16)
    fastft.optimize(model)
    batch = random_batch(model)
    result = fastft.check(model, batch)
    assert result.ok, str(result)
    report = fastft.report(model)
    assert report.counts() == expected_counts(model, model_type), str(report)
    assert report.near_misses == [], str(report)


def test_peft_lora_llama():
    peft = pytest.importorskip("peft")
    model = tiny("llama")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                             lora_dropout=0.0)
    model = peft.get_peft_model(model, config)
    reference = twin(model)
    fastft.optimize(model)
    batches = _batches(model)
    result = fastft.check(model, batches[0])
    assert result.ok, str(result)
    report = fastft.report(model)
    # q, v and gate carry adapters: three LoRA linears per layer; the MLP is not adapted
    # throughout, so its activation is the plain GLU rewrite.
    layers = model.get_base_model().config.num_hidden_layers
    assert report.counts() == {**expected_counts(model, "llama"), "lora": 3 * layers}
    assert all(r.module_path.startswith("base_model.model") for r in report.rewrites)
    # frozen norm weights: no gradient computed for them
    assert all(p.grad is None for n, p in model.named_parameters() if "norm" in n)
    assert_same_training(reference, model, batches)


def test_gradient_checkpointing_nested_graphs():
    model = tiny("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    reference = twin(model)
    fastft.optimize(model)
    batch = random_batch(model)
    result = fastft.check(model, batch)
    assert result.ok, str(result)
    # Checkpointing turns the KV cache off, so the model builds its causal mask: proved, removed.
    layers = model.config.num_hidden_layers
    assert fastft.report(model).counts() == {**expected_counts(model, "llama"), "attention": layers}
    assert_same_training(reference, model, _batches(model))


def test_backbone_called_directly_is_captured_too():
    model = tiny("llama")
    fastft.optimize(model)
    ids = random_batch(model)["input_ids"]
    hidden = model.model(input_ids=ids).last_hidden_state
    assert hidden.shape == (2, 16, 64)
    report = fastft.report(model)
    no_loss = {k: v for k, v in expected_counts(model, "llama").items() if k != "linear_cross_entropy"}
    assert report.counts() == no_loss  # the backbone has no head and no loss
    assert {r.graph for r in report.rewrites} == {"model"}


def test_dynamic_lengths_train_eval_and_double_optimize():
    model = tiny("llama")
    assert fastft.optimize(model) is model
    state = model._fastft_state
    assert fastft.optimize(model) is model and model._fastft_state is state  # no second wrapping
    for seq in (8, 11, 13, 17):
        batch = random_batch(model, seq=seq)
        model(**batch).loss.backward()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=random_batch(model, seq=9)["input_ids"]).logits
    assert logits.shape == (2, 9, 128)
    model.train()
    report = fastft.report(model)
    assert report.counts() == expected_counts(model, "llama")
    assert not report.capture_failures and not report.graph_breaks
    assert report.graphs_captured <= 4  # dynamic after the first recompile, not one graph per length
    assert fastft.check(model, random_batch(model, seq=10)).ok
