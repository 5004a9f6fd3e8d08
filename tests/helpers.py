"""Shared test helpers: tiny models and a training loop to compare optimised and original runs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fastft
from fastft.tiny import build_tiny_model, tiny_config
from fastft.tolerances import tolerance_for

# Where a GPU is present the kernels run compiled on it; otherwise through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny(model_type: str, **kwargs) -> nn.Module:
    """A tiny model without dropout: the compiled and the eager run draw different random masks,
    so with dropout no two runs could be compared."""
    no_dropout = {k: 0.0 for k, v in tiny_config(model_type).to_dict().items()
                  if ("dropout" in k or "pdrop" in k) and isinstance(v, float)}
    return build_tiny_model(model_type, **{**no_dropout, **kwargs}).to(DEVICE)


def train_steps(model: nn.Module, batches: list[dict], lr: float = 0.1) -> list[float]:
    # SGD with momentum rather than Adam: Adam divides by the gradient's own magnitude, so a
    # gradient that is zero in exact arithmetic (a key bias: softmax ignores it) turns its 1e-9
    # rounding noise into full-size, random-sign steps that no two implementations share.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    losses = []
    for batch in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_same_training(reference: nn.Module, optimised: nn.Module, batches: list[dict],
                         param_rel_l2: float | None = None) -> None:
    """Same losses step by step and same trainable parameters at the end, within tolerance
    (``param_rel_l2``, where given, replaces the dtype's rel_l2 for the parameters)."""
    want = train_steps(reference, batches)
    have = train_steps(optimised, batches)
    dtype = next(reference.parameters()).dtype
    tol = tolerance_for(dtype)
    for step, (a, b) in enumerate(zip(have, want)):
        assert abs(a - b) <= tol.rel_l2 * abs(b) + tol.atol, f"step {step}: loss {a} vs {b}"
    ref_params = dict(reference.named_parameters())
    for name, p in optimised.named_parameters():
        if p.requires_grad:
            q = ref_params[name]
            rel = ((p.double() - q.double()).norm() / q.double().norm().clamp_min(1e-12)).item()
            bound = tol.rel_l2 if param_rel_l2 is None else param_rel_l2
            assert rel <= bound, f"parameter {name} differs after training: rel_l2={rel:.3g}"


def random_lora_b(model: nn.Module, std: float = 0.2) -> nn.Module:
    """peft starts every lora_B at zero, so the adapters add nothing: draw them at random (from
    torch's global generator) so that the adapters change the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return model


def twin(model: nn.Module) -> nn.Module:
    """An unoptimised copy with the same weights."""
    return copy.deepcopy(model)


def count_modules(model: nn.Module, class_suffix: str) -> int:
    return sum(type(m).__name__.endswith(class_suffix) for m in model.modules())


def assert_norm_before_a_foreign_cast(model: nn.Module, x: torch.Tensor, pattern: str) -> None:
    """``model``'s norm result is cast to a dtype no kernel writes (uint8): optimised, it computes
    what it did, with the norm fused once and the cast left to the model, and checks equivalent."""
    want = model(x).item()
    fastft.optimize(model)
    model(x).backward()
    assert model(x).item() == pytest.approx(want, rel=1e-5)
    assert fastft.report(model).counts() == {pattern: 1}, fastft.report(model)
    assert fastft.check(model, (x,)).ok
