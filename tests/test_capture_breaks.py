"""Graph breaks the capture avoids, counted before and after, and checked equivalent.

The forward hook that fine-tuning recipes put on the input embeddings for gradient checkpointing
(``output.requires_grad_(True)``: transformers' enable_input_require_grads, which
gradient_checkpointing_enable and peft call) made Dynamo break the graph. Inside a captured graph the
mark changes no gradient when the outputs require grad through trainable parameters anyway, so the
capture drops it and keeps one graph; where the mark is what makes an output require grad, the graph
still breaks and the Report says why.

A gradient-checkpointed layer that writes into a dict from outside it (keys and values shared
across layers) made Dynamo break the graph at that layer; the capture now lets the write happen
once, in the forward, and the layer is fused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib

import peft
import pytest
import torch
import torch.nn as nn

import fastft
from fastft.tiny import random_batch

from helpers import DEVICE, assert_same_training, random_lora_b, tiny, twin

# The module, not the function fastft exports under the same name.
optimize_module = importlib.import_module("fastft.optimize")
requires_grad_module = importlib.import_module("fastft.passes.requires_grad")


# Where the mark decides requires_grad, a Dynamo with the leak check breaks the graph; an older one
# fails the capture instead (the tests of older Dynamo below).
needs_leak_check = pytest.mark.skipif(not requires_grad_module.has_leak_check(),
                                      reason="this torch's Dynamo has no leak check")


def _mark_requires_grad(module, inputs, output):
    output.requires_grad_(True)


@dataclasses.dataclass
class Out:
    loss: torch.Tensor
    embeddings: torch.Tensor | None = None


class Marked(nn.Module):
    """A frozen embedding whose output a forward hook marks as requiring grad, a trainable linear
    after it, and a loss: the shape of a model prepared for checkpointed adapter training. The
    forward runs inside a context manager, as peft's does (a break there cannot be resumed)."""

    def __init__(self, trainable: bool = True, return_embeddings: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.embed.weight.requires_grad_(False)
        self.embed.register_forward_hook(_mark_requires_grad)
        self.proj = nn.Linear(16, 16)
        self.proj.requires_grad_(trainable)
        self.return_embeddings = return_embeddings

    def forward(self, ids):
        with contextlib.nullcontext():
            e = self.embed(ids)
            loss = torch.tanh(self.proj(e)).square().mean()
        return Out(loss, e if self.return_embeddings else None)


def _breaks(model) -> int:
    return sum(b.count for b in fastft.report(model).graph_breaks)


def _without_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(optimize_module, "redundant_requires_grad_dropped", contextlib.nullcontext)


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def test_redundant_requires_grad_mark_breaks_without_the_fix(monkeypatch):
    _without_the_fix(monkeypatch)
    torch.manual_seed(0)
    model = fastft.optimize(Marked().to(DEVICE))
    model(_ids(0)).loss.backward()
    report = fastft.report(model)
    assert _breaks(model) > 0 and any("requires_grad_()" in b.reason for b in report.graph_breaks), str(report)


@pytest.mark.parametrize("dynamo", [pytest.param("with leak check", marks=needs_leak_check), "older"])
def test_redundant_requires_grad_mark_keeps_one_graph(monkeypatch, dynamo):
    if dynamo == "older":  # torch before 2.13: the call is skipped while tracing
        monkeypatch.setattr(requires_grad_module, "has_leak_check", lambda: False)
    torch.manual_seed(0)
    model = Marked().to(DEVICE)
    reference = twin(model)
    fastft.optimize(model)
    assert model(_ids(0)).loss.requires_grad
    report = fastft.report(model)
    assert _breaks(model) == 0 and report.graphs_captured == 1 and not report.capture_failures, str(report)
    (graph,) = optimize_module.state_of(model).graphs.values()
    assert not [n for n in graph.gm.graph.nodes if n.target == "requires_grad_"]
    flagged = [n for n in graph.gm.graph.nodes if n.meta.get(requires_grad_module.DROPPED_MARK)]
    assert bool(flagged) == (dynamo == "older")
    assert fastft.check(model, (_ids(1),)).ok
    assert_same_training(reference, model, [{"ids": _ids(s)} for s in range(3)])


@needs_leak_check
def test_a_mark_that_decides_requires_grad_still_breaks_and_is_reported():
    # Nothing trainable: the loss requires grad only through the mark (as in eager), so it is kept.
    torch.manual_seed(0)
    model = Marked(trainable=False).to(DEVICE)
    reference = twin(model)
    fastft.optimize(model)
    loss = model(_ids(0)).loss
    want = reference(_ids(0)).loss
    assert loss.requires_grad and want.requires_grad
    assert torch.allclose(loss, want)
    assert any("requires_grad_()" in b.reason for b in fastft.report(model).graph_breaks)


@needs_leak_check
def test_a_marked_tensor_returned_keeps_its_mark():
    # The marked embeddings themselves are an output: they must still require grad.
    torch.manual_seed(0)
    model = fastft.optimize(Marked(return_embeddings=True).to(DEVICE))
    out = model(_ids(0))
    assert out.embeddings.requires_grad and out.loss.requires_grad
    assert any("requires_grad_()" in b.reason for b in fastft.report(model).graph_breaks)


def _peft_llama(checkpointing: str | None) -> nn.Module:
    model = tiny("llama", num_hidden_layers=1)  # one layer: the interpreter's kernels dominate the time
    model.config.use_cache = False
    if checkpointing:  # in transformers 5 this also installs the embedding hook
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    model.enable_input_require_grads()  # the HF Trainer / prepare_model_for_kbit_training recipe
    assert model.get_input_embeddings()._forward_hooks
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    model = peft.get_peft_model(model, config)
    random_lora_b(model, std=0.05)
    return model.train()


# Reentrant checkpointing (prepare_model_for_kbit_training's default) is what the hook is for.
@pytest.mark.parametrize("checkpointing", [None, "non-reentrant", "reentrant"])
def test_peft_llama_with_input_require_grads_is_one_graph(checkpointing):
    model = _peft_llama(checkpointing)
    reference = twin(model)
    fastft.optimize(model)
    batch = random_batch(model, seq=8)
    result = fastft.check(model, batch)
    assert result.ok, str(result)
    report = fastft.report(model)
    assert _breaks(model) == 0 and not report.capture_failures, str(report)
    assert report.graphs_captured == 1, str(report)
    assert report.counts().get("lora", 0) > 0 and report.counts().get("rms_norm") == 3, str(report)
    assert_same_training(reference, model, [random_batch(model, seq=8, seed=s) for s in range(1, 3)])


def test_peft_llama_with_input_require_grads_breaks_without_the_fix(monkeypatch):
    _without_the_fix(monkeypatch)
    model = fastft.optimize(_peft_llama(checkpointing="non-reentrant"))
    model(**random_batch(model, seq=8))
    report = fastft.report(model)
    assert _breaks(model) > 0 and report.graphs_captured > 1, str(report)
    assert all("requires_grad_()" in b.reason for b in report.graph_breaks), str(report)


# --- a Dynamo without the leak check (torch before 2.13): the call is skipped while tracing ---------


@pytest.fixture
def older_dynamo(monkeypatch):
    monkeypatch.setattr(requires_grad_module, "has_leak_check", lambda: False)


@pytest.mark.parametrize("trainable,return_embeddings", [(False, False), (True, True)])
def test_older_dynamo_fails_the_capture_where_the_mark_decides(older_dynamo, trainable, return_embeddings):
    # An output that requires grad only through the mark: the capture fails, the model runs
    # unoptimised (its outputs still require grad, as in eager) and the Report says why.
    torch.manual_seed(0)
    model = Marked(trainable=trainable, return_embeddings=return_embeddings).to(DEVICE)
    reference = twin(model)
    fastft.optimize(model)
    out, want = model(_ids(0)), reference(_ids(0))
    assert out.loss.requires_grad and torch.allclose(out.loss, want.loss)
    if return_embeddings:
        assert out.embeddings.requires_grad
    (failure,) = fastft.report(model).capture_failures
    assert "RequiresGradMarkNeeded" in failure.error and "requires_grad_()" in failure.error, failure


@pytest.mark.parametrize("checkpointing", ["non-reentrant", "reentrant"])
def test_older_dynamo_keeps_a_checkpointed_peft_llama_in_one_graph(older_dynamo, checkpointing):
    model = _peft_llama(checkpointing)
    reference = twin(model)
    fastft.optimize(model)
    result = fastft.check(model, random_batch(model, seq=8))
    assert result.ok, str(result)
    report = fastft.report(model)
    assert _breaks(model) == 0 and not report.capture_failures and report.graphs_captured == 1, str(report)
    assert_same_training(reference, model, [random_batch(model, seq=8, seed=s) for s in range(1, 3)])


# --- a checkpointed layer with a Python side effect ---------------------------------------------


class SharedKeys(nn.Module):
    """Checkpointed layers that share one projection through a dict, as decoders that share keys
    and values across layers do: the first layer stores it, the later ones read it. The store is
    a side effect of a checkpointed region on a dict from outside it."""

    def __init__(self, dim: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.projs = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))
        self.shared_proj = nn.Linear(dim, dim, bias=False)

    def _layer(self, i: int, x: torch.Tensor, shared: dict) -> torch.Tensor:
        if i == 0:
            shared["keys"] = self.shared_proj(x)
        return x + torch.tanh(self.projs[i](x)) * shared["keys"]

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        shared: dict = {}
        for i in range(len(self.projs)):
            x = checkpoint(self._layer, i, x, shared, use_reentrant=False)
        return Out(x.square().mean())


def _shared_keys_adapted() -> nn.Module:
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1", "2", "shared_proj"])
    model = peft.get_peft_model(SharedKeys().to(DEVICE), config)
    random_lora_b(model)
    return model


def _x(seed: int) -> dict:
    return {"x": torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed)).to(DEVICE)}


def test_a_checkpointed_layer_storing_into_a_shared_dict_is_captured_and_fused():
    if "skip_fwd_side_effects_in_bwd_under_checkpoint" not in optimize_module._CAPTURE_CONFIG:
        pytest.skip("this torch's Dynamo does not trace side effects under checkpointing")
    model = _shared_keys_adapted()
    reference = twin(model)
    fastft.optimize(model)
    result = fastft.check(model, _x(0))
    assert result.ok, str(result)
    report = fastft.report(model)
    assert _breaks(model) == 0 and report.graphs_captured == 1 and not report.capture_failures, str(report)
    assert report.counts().get("lora") == 4, str(report)  # every adapted linear, each in its layer
    assert_same_training(reference, model, [_x(s) for s in range(1, 4)])


def test_a_checkpointed_layer_storing_into_a_shared_dict_breaks_without_the_setting(monkeypatch):
    config = {k: v for k, v in optimize_module._CAPTURE_CONFIG.items()
              if k != "skip_fwd_side_effects_in_bwd_under_checkpoint"}
    monkeypatch.setattr(optimize_module, "_CAPTURE_CONFIG", config)
    model = fastft.optimize(_shared_keys_adapted())
    model(**_x(0)).loss.backward()
    report = fastft.report(model)
    assert _breaks(model) > 0 and "lora" not in report.counts(), str(report)
    assert any("side effect" in b.reason for b in report.graph_breaks), str(report)
