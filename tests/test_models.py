"""Model level: tiny random-weight Hugging Face models, optimised in place.

Every RMSNorm module is rewritten (counted), ``fastft.check`` passes, three AdamW steps give the
same losses and parameters as the unoptimised twin."""
from __future__ import annotations

import pytest
import torch

import fastft
from fastft.tiny import random_batch

from helpers import assert_same_training, count_modules, tiny, twin

ARCHITECTURES = ["llama", "qwen3", "mistral", "gemma3"]


def _batches(model, n=3):
    return [random_batch(model, batch=2, seq=12, seed=s) for s in range(n)]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_every_rms_norm_rewritten_and_checked(model_type):
    model = tiny(model_type)
    expected = count_modules(model, "RMSNorm")
    assert expected >= 5
    fastft.optimize(model)
    batch = random_batch(model)
    model(**batch).loss.backward()
    report = fastft.report(model)
    assert report.counts() == {"rms_norm": expected}, str(report)
    assert not report.graph_breaks and not report.capture_failures, str(report)
    assert report.near_misses == []
    result = fastft.check(model, batch)
    assert result.ok, str(result)
    assert result.regions_checked == expected


@pytest.mark.parametrize("model_type", ["llama", "gemma3"])
def test_training_matches_unoptimised(model_type):
    model = tiny(model_type)
    reference = twin(model)
    fastft.optimize(model)
    assert_same_training(reference, model, _batches(model))
    assert fastft.report(model).counts()["rms_norm"] == count_modules(model, "RMSNorm")


def test_bf16_model_is_rewritten_and_checked():
    model = tiny("qwen3", dtype=torch.bfloat16)
    fastft.optimize(model)
    batch = random_batch(model)
    result = fastft.check(model, batch)
    assert result.ok, str(result)
    assert fastft.report(model).counts() == {"rms_norm": count_modules(model, "RMSNorm")}


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
    assert report.counts() == {"rms_norm": count_modules(model, "RMSNorm")}
    assert all(r.module_path.startswith("base_model.model.model.") for r in report.rewrites)
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
    assert fastft.report(model).counts() == {"rms_norm": count_modules(model, "RMSNorm")}
    assert_same_training(reference, model, _batches(model))


def test_backbone_called_directly_is_captured_too():
    model = tiny("llama")
    fastft.optimize(model)
    ids = random_batch(model)["input_ids"]
    hidden = model.model(input_ids=ids).last_hidden_state
    assert hidden.shape == (2, 16, 64)
    report = fastft.report(model)
    assert report.counts() == {"rms_norm": count_modules(model, "RMSNorm")}
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
    assert report.counts() == {"rms_norm": 5}
    assert not report.capture_failures and not report.graph_breaks
    assert report.graphs_captured <= 4  # dynamic after the first recompile, not one graph per length
    assert fastft.check(model, random_batch(model, seq=10)).ok
