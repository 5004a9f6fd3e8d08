"""The ungated MLP's activation pattern (family ``mlp_act``) on hand-written MLPs: every activation
spelling, the gated units it must leave to the GLU pattern, the near misses that must be left
alone, and a tiny GPT-2."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastft
from fastft.tiny import random_batch
from fastft.tolerances import tolerance_for

from helpers import DEVICE, tiny


def _new_gelu(x):  # GPT-2 / Phi style "gelu_new", written out
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_erf_written(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


# spelling -> (activation, the kernel's activation name)
ACTIVATIONS = {
    "silu": (F.silu, "silu"),
    "silu_module": (nn.SiLU(), "silu"),
    "silu_written": (lambda x: x * torch.sigmoid(x), "silu"),
    "gelu": (F.gelu, "gelu_erf"),
    "gelu_module": (nn.GELU(), "gelu_erf"),
    "gelu_erf_written": (_gelu_erf_written, "gelu_erf"),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh"),
    "gelu_tanh_module": (nn.GELU(approximate="tanh"), "gelu_tanh"),
    "gelu_tanh_written": (_new_gelu, "gelu_tanh"),
}


class MLP(nn.Module):
    """up-linear -> activation -> down-linear, with biases (as BERT, GPT-2, OPT, ...)."""

    def __init__(self, act, hidden=16, width=24, dtype=torch.float32):
        super().__init__()
        self.act = act
        self.fc = nn.Linear(hidden, width, dtype=dtype)
        self.proj = nn.Linear(width, hidden, dtype=dtype)

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class GatedMLP(nn.Module):
    def __init__(self, act, hidden=16, width=24):
        super().__init__()
        self.act = act
        self.gate = nn.Linear(hidden, width, bias=False)
        self.up = nn.Linear(hidden, width, bias=False)
        self.down = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


def _loss(out):
    return out.float().pow(2).mean()


def _run(model, x):
    fastft.optimize(model)
    _loss(model(x)).backward()
    return fastft.report(model)


def _fused(model):
    """The fastft::activation calls in the rewritten graphs."""
    return [n for g in model._fastft_state.graphs.values() for n in g.gm.graph.nodes
            if getattr(n.target, "_schema", None) is not None and n.target._schema.name == "fastft::activation"]


def _assert_same_as_unoptimised(model, reference, x, compute_dtype=None) -> None:
    """Output, input gradient and every parameter gradient as the unoptimised twin's, within the
    tolerance of the coarsest dtype computed in."""
    tol = tolerance_for(compute_dtype or x.dtype)
    runs = []
    for m in (model, reference):
        m.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        out = m(xi)
        _loss(out).backward()
        runs.append((out, xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (out, dx, grads), (out_ref, dx_ref, grads_ref) = runs
    assert out.dtype == out_ref.dtype
    torch.testing.assert_close(out.float(), out_ref.float(), atol=tol.atol, rtol=tol.rtol)
    for name, have, want in [("x", dx, dx_ref)] + [(n, grads[n], grads_ref[n]) for n in grads_ref]:
        rel = ((have.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12)).item()
        assert rel <= tol.rel_l2, f"gradient of {name} differs: rel_l2={rel:.3g}"


@pytest.mark.parametrize("spelling", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_activations_are_rewritten_and_equivalent(spelling, dtype):
    act, kind = ACTIVATIONS[spelling]
    torch.manual_seed(0)
    model = MLP(act, dtype=dtype).to(DEVICE)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 5, 16, dtype=dtype, device=DEVICE)
    report = _run(model, x)
    if spelling.endswith("_written") and dtype != torch.float32:
        # Written out in a 16-bit dtype, every step rounds: the fp32 kernel would not reproduce it.
        assert report.counts() == {}, report
        (miss,) = report.near_misses
        assert miss.pattern == "activation" and f"written out in {dtype}: rounded at every step" in miss.reason
        assert _fused(model) == []
    else:
        assert report.counts() == {"mlp_act": 1}, report
        assert [r.kernel for r in report.rewrites] == ["fastft::activation"]
        assert report.near_misses == [], report
        (fused,) = _fused(model)
        # (x, activation, round_dtype, out_dtype): a 16-bit activation rounds once, to its dtype.
        assert fused.args[1:] == (kind, None if dtype == torch.float32 else dtype, dtype)
    result = fastft.check(model, (x,), loss_fn=_loss)
    assert result.ok, result
    assert result.regions_checked == len(report.rewrites)
    _assert_same_as_unoptimised(model, reference, x)


class UpcastMLP(MLP):  # a 16-bit model computing the activation in float32, then casting back
    def forward(self, x):
        h = self.fc(x)
        return self.proj(F.gelu(h.float(), approximate="tanh").to(h.dtype))


def test_upcast_activation_is_one_fp32_computation():
    torch.manual_seed(0)
    model = UpcastMLP(None, dtype=torch.bfloat16).to(DEVICE)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 7, 16, dtype=torch.bfloat16, device=DEVICE)
    report = _run(model, x)
    assert report.counts() == {"mlp_act": 1} and report.near_misses == [], report
    (fused,) = _fused(model)
    # No 16-bit rounding inside, one at the end: the kernel reads the bf16 input itself.
    assert fused.args[1:] == ("gelu_tanh", None, torch.bfloat16)
    assert fused.args[0].meta["example_value"].dtype == torch.bfloat16
    assert fastft.check(model, (x,), loss_fn=_loss).ok
    _assert_same_as_unoptimised(model, reference, x)


@pytest.mark.parametrize("spelling", ["silu", "gelu_module", "gelu_tanh_written"])
def test_gated_mlp_is_the_glu_rewrite_only(spelling):
    torch.manual_seed(0)
    model = GatedMLP(ACTIVATIONS[spelling][0]).to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    report = _run(model, x)
    assert report.counts() == {"glu_mlp": 1}, report
    assert [r.kernel for r in report.rewrites] == ["fastft::glu"]
    assert report.near_misses == [], report
    assert _fused(model) == []
    assert fastft.check(model, (x,), loss_fn=_loss).ok


class Broadcast(nn.Module):  # act(gate) * a per-channel scale: a gated unit that is no GLU
    def __init__(self, written=False):
        super().__init__()
        self.written = written
        self.gate = nn.Linear(16, 24)
        self.scale = nn.Parameter(torch.randn(24))

    def forward(self, x):
        g = self.gate(x)
        return (g * torch.sigmoid(g) if self.written else F.silu(g)) * self.scale


@pytest.mark.parametrize("written", [False, True], ids=["library", "written"])
def test_multiplied_activation_is_left_to_the_glu_pattern(written):
    """The GLU pattern rejects it (a broadcast); the activation is still the gated unit's: no
    mlp_act rewrite of it, and no second near miss."""
    model = Broadcast(written).to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    report = _run(model, x)
    assert report.counts() == {}, report
    (miss,) = report.near_misses
    assert miss.pattern == "glu" and "broadcast" in miss.reason


def test_gpt2_style_written_gelu_in_bf16_is_a_near_miss():
    model = MLP(_new_gelu, dtype=torch.bfloat16).to(DEVICE)
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16, device=DEVICE)
    report = _run(model, x)
    assert report.counts() == {}
    (miss,) = report.near_misses
    assert miss.pattern == "activation"
    assert miss.reason == "the gelu_tanh activation is written out in torch.bfloat16: rounded at every step"


def _wrong_constant_gelu(x):  # 0.8 for sqrt(2/pi): another function, not the tanh GELU
    return 0.5 * x * (1.0 + torch.tanh(0.8 * (x + 0.044715 * torch.pow(x, 3.0))))


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda: MLP(_wrong_constant_gelu), "the written-out gelu_tanh uses 0.8 where 0.7978846 was expected"),
        (lambda: MLP(F.gelu, dtype=torch.float64).requires_grad_(False), "x dtype torch.float64 has no fused kernel"),
    ],
    ids=["wrong_constant", "float64"],
)
def test_near_misses_with_reason(make, reason):
    model = make().to(DEVICE)
    # float64 parameters may only be frozen: the input carries the gradient.
    x = torch.randn(2, 3, 16, dtype=next(model.parameters()).dtype, device=DEVICE, requires_grad=True)
    report = _run(model, x)
    assert report.counts() == {}, report
    (miss,) = report.near_misses
    assert miss.pattern == "activation" and reason in miss.reason, miss


class DowncastMLP(MLP):  # a float32 model computing the activation of a bf16 copy
    def forward(self, x):
        return self.proj(F.silu(self.fc(x).to(torch.bfloat16)).float())


def test_casts_the_kernel_does_not_fold_stay_outside():
    """The kernel does not round its input down or cast a rounded result up (the checks reject
    the match that includes them): the bf16 activation alone is rewritten, the casts stay."""
    torch.manual_seed(0)
    model = DowncastMLP(None).to(DEVICE)
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, device=DEVICE)
    report = _run(model, x)
    assert report.counts() == {"mlp_act": 1} and report.near_misses == [], report
    (fused,) = _fused(model)
    assert fused.args[1:] == ("silu", torch.bfloat16, torch.bfloat16)
    assert [u.target for u in fused.users] == ["float"]
    assert fastft.check(model, (x,), loss_fn=_loss).ok
    _assert_same_as_unoptimised(model, reference, x, compute_dtype=torch.bfloat16)


def test_other_activations_are_not_reported():
    # relu (OPT) is not one of the kernel's activations: neither a rewrite nor a near miss.
    report = _run(MLP(F.relu).to(DEVICE), torch.randn(2, 3, 16, device=DEVICE))
    assert report.counts() == {} and report.near_misses == []


def test_tiny_gpt2_every_mlp_activation():
    model = tiny("gpt2")  # "gelu_new": the written-out tanh GELU
    reference = copy.deepcopy(model)
    layers = model.config.num_hidden_layers
    fastft.optimize(model)
    batch = random_batch(model)
    loss = model(**batch).loss
    loss.backward()
    report = fastft.report(model)
    assert report.counts().get("mlp_act") == layers, str(report)
    assert not [r for r in report.near_misses if r.pattern == "activation"], str(report)
    assert {r.kernel for r in report.rewrites if r.family == "mlp_act"} == {"fastft::activation"}
    result = fastft.check(model, batch)
    assert result.ok, str(result)
    want = reference(**batch).loss
    assert abs(loss.item() - want.item()) <= 1e-4 * abs(want.item())


def test_tiny_gpt2_in_bf16_is_a_near_miss_per_layer():
    model = tiny("gpt2", dtype=torch.bfloat16)
    fastft.optimize(model)
    model(**random_batch(model)).loss.backward()
    report = fastft.report(model)
    assert "mlp_act" not in report.counts(), str(report)
    misses = [r for r in report.near_misses if r.pattern == "activation"]
    assert len(misses) == model.config.num_hidden_layers, str(report)
    assert all("written out in torch.bfloat16" in m.reason for m in misses)
