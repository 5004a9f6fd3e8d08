"""peft adapters on parameters (a mixture of experts' stacked expert weights under "all-linear",
or ``target_parameters``): captured in one graph, equal to peft's own computation."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fastft
from fastft.parameter_adapters import make_parameter_adapters_capturable
from fastft.tiny import random_batch
from peft.tuners.lora.layer import ParamWrapper

from helpers import assert_same_training, tiny, twin


def _adapted(model_type: str, **lora) -> torch.nn.Module:
    model = tiny(model_type)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **lora)
    return peft.get_peft_model(model, config)


def _wrappers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, ParamWrapper) for m in model.modules())


def _one_graph_checked_and_trained_the_same(model: torch.nn.Module) -> fastft.Report:
    """Optimise ``model``; assert one graph, a passing check and three SGD steps equal to an
    unoptimised twin's; return the report."""
    reference = twin(model)
    batch = random_batch(model)
    fastft.optimize(model)
    result = fastft.check(model, batch)
    report = fastft.report(model)
    assert report.graphs_captured == 1 and not report.graph_breaks, str(report)
    assert result.ok, str(result)
    assert_same_training(reference, model, [random_batch(model, seed=s) for s in range(3)])
    return report


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_adapted_experts_are_one_graph_checked_and_train_the_same(model_type):
    model = _adapted(model_type, target_modules="all-linear")
    assert _wrappers(model) >= 4  # two expert weights a layer, each its own wrapper (nested)
    report = _one_graph_checked_and_trained_the_same(model)
    assert report.counts()["lora"] == 4  # q, k, v, o of both layers: the experts stay peft's math


def test_a_targeted_dense_parameter_is_captured_too():
    model = _adapted("llama", target_parameters=["mlp.down_proj.weight"])
    assert _wrappers(model) == 2
    _one_graph_checked_and_trained_the_same(model)


def test_disabled_adapters_still_go_through_peft():
    model = _adapted("qwen3_moe", target_modules="all-linear")
    reference = twin(model)
    batch = random_batch(model)
    fastft.optimize(model)
    with torch.no_grad(), model.disable_adapter(), reference.disable_adapter():
        got, want = model(**batch).loss, reference(**batch).loss
    with torch.no_grad():
        adapted = reference(**batch).loss
    assert torch.allclose(got, want, rtol=1e-5) and not torch.allclose(got, adapted, rtol=1e-5)


def test_a_deep_copy_computes_with_its_own_weights():
    model = _adapted("qwen3_moe", target_modules="all-linear")
    assert make_parameter_adapters_capturable(model) == _wrappers(model)
    assert make_parameter_adapters_capturable(model) == 0  # once per wrapper
    copied = copy.deepcopy(model)
    wrapped = [m for m in copied.modules() if isinstance(m, ParamWrapper)]
    assert wrapped and all(m.forward.__self__ is m for m in wrapped)
