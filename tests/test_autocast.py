"""Models traced under ``torch.autocast`` (HF Trainer's ``bf16=True``): the casts autocast makes are
written into the graph (passes/autocast.py), so the fused ops get the dtypes the original ops
computed in, and the checker judges a float32 model at the precision it computes in."""
from __future__ import annotations

import contextlib

import peft
import pytest
import torch
import torch.fx as fx

import fastft
import fastft.kernels.lora as lora_kernels
from fastft.passes.autocast import autocast_made_explicit
from fastft.passes.canonical import canonical
from fastft.tiny import random_batch
from fastft.tolerances import tolerance_for

from helpers import DEVICE, random_lora_b, tiny, train_steps, twin

BF16 = torch.bfloat16
BF16_TOL = tolerance_for(BF16)


def _autocast():
    return torch.autocast(DEVICE, dtype=BF16)


def _float32_lora(model_type: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny(model_type, dtype=torch.float32),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    return random_lora_b(model)


def test_a_float32_lora_model_under_autocast_is_fused_as_without_it_and_checks():
    # Before: the LoRA op got float32 x and W beside an out_dtype of bf16 and failed ("self and
    # mat2 must have the same dtype"); with the casts explicit, it takes the bf16 casts autocast makes.
    plain = fastft.optimize(_float32_lora())
    plain(**random_batch(plain)).loss.backward()
    model = fastft.optimize(_float32_lora())
    batch = random_batch(model)
    with _autocast():
        result = fastft.check(model, batch)
    report = fastft.report(model)
    counts, without = report.counts(), fastft.report(plain).counts()
    # q's and k's rotations run as two rope ops: q's ends in autocast's cast to bf16 for the
    # attention and k's does not, so they write different dtypes.
    assert counts.pop("rope") == 2 * without.pop("rope")
    assert counts == without and not report.near_misses, str(report)
    assert "fastft::lora_glu_mlp" in {r.kernel for r in report.rewrites}, str(report)
    assert result.ok, str(result)
    loss = next(c for c in result.model if c.name == "loss")
    assert "computes in bfloat16" in loss.bound, str(result)


def _trained(model: torch.nn.Module, batches: list[dict], autocast: bool) -> tuple[list[float], dict]:
    with _autocast() if autocast else contextlib.nullcontext():
        losses = train_steps(model, batches)
    return losses, {n: p.detach().double() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("seed", [0, 10])
def test_a_float32_lora_model_under_autocast_trains_like_the_original(seed):
    # Three steps under autocast move an adapter by up to 16% (rel L2) away from the same steps
    # in float32 (layer 0's o_proj lora_A, batch seed 10: bf16 rounding, not a fault), so the
    # optimised model's adapters are judged as fastft.check judges gradients: within bf16's
    # tolerance of the original's, or no further than they are from the float32 training.
    model = _float32_lora()
    batches = [random_batch(model, seed=seed + s) for s in range(3)]
    exact_losses, exact = _trained(twin(model), batches, autocast=False)
    want_losses, want = _trained(twin(model), batches, autocast=True)
    have_losses, have = _trained(fastft.optimize(model), batches, autocast=True)
    assert fastft.report(model).rewrites
    for step, (a, b) in enumerate(zip(have_losses, want_losses)):
        assert abs(a - b) <= BF16_TOL.rel_l2 * abs(b) + BF16_TOL.atol, f"step {step}: loss {a} vs {b}"

    def rel(x: torch.Tensor, y: torch.Tensor) -> float:
        return float((x - y).norm() / y.norm())

    for name in want:
        close = rel(have[name], want[name]) <= BF16_TOL.rel_l2
        nearer = rel(have[name], exact[name]) <= rel(want[name], exact[name]) + BF16_TOL.rel_l2
        assert close or nearer, (f"{name}: {rel(have[name], want[name]):.3g} from the original, "
                                 f"{rel(have[name], exact[name]):.3g} from float32 (original "
                                 f"{rel(want[name], exact[name]):.3g})")


def test_a_wrong_adapter_gradient_under_autocast_still_fails(monkeypatch):
    real = lora_kernels._group_backward

    def skewed(*args, **kwargs):  # every adapter's dA 30% too large
        dx, grads = real(*args, **kwargs)
        return dx, [(dw, dbias, da * 1.3 if da is not None else None, db) for dw, dbias, da, db in grads]

    monkeypatch.setattr(lora_kernels, "_group_backward", skewed)
    model = fastft.optimize(_float32_lora())
    with _autocast():
        result = fastft.check(model, random_batch(model))
    assert not result.ok and [c for c in result.model if "lora_A" in c.name and not c.ok], str(result)


class _Blocks(torch.nn.Module):
    """A linear under the caller's autocast, one in a block of its own that turns autocast off,
    and an add of bf16 and float32 (type promotion, not autocast)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.first(x)  # bf16 under autocast
        with torch.autocast(x.device.type, enabled=False):
            z = self.second(x)  # float32: autocast is off here
        return y + z


def _captured(model, x) -> tuple[fx.GraphModule, int, list]:
    """The graph Dynamo captures of ``model(x)`` with the pass applied, how many casts it
    inserted, and the inputs the graph was called with."""
    graphs, calls = [], []

    def backend(gm, example_inputs):
        graphs.append((gm, autocast_made_explicit(gm)))
        return lambda *args: calls.append(args) or gm.forward(*args)

    torch.compile(model, backend=backend, fullgraph=True)(x)
    (gm, inserted), = graphs
    return gm, inserted, list(calls[0])


def test_the_casts_autocast_makes_are_written_into_the_graph():
    torch.manual_seed(0)
    model, x = _Blocks().to(DEVICE), torch.randn(3, 8, device=DEVICE)
    with _autocast():
        want = model(x)
        gm, inserted, inputs = _captured(model, x)
    assert inserted == 3  # x, W and b of the first linear; nothing in the block without autocast
    casts = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "to"]
    assert {canonical(n).attrs["dtype"] for n in casts} == {BF16}
    first, second = [n for n in gm.graph.nodes if n.target is torch._C._nn.linear]
    assert all(a in casts for a in first.args if isinstance(a, fx.Node))
    assert not any(a in casts for a in second.args if isinstance(a, fx.Node))
    # The graph now computes what autocast computed, without autocast.
    (got,) = gm(*inputs)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)


def test_a_graph_without_autocast_is_left_alone():
    model, x = _Blocks().to(DEVICE), torch.randn(3, 8, device=DEVICE)
    gm, inserted, _ = _captured(model, x)
    assert inserted == 0 and not [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "to"]


class _Recorded(fx.Interpreter):
    """Runs a graph and keeps each node's value as its example value, as Dynamo would."""

    def run_node(self, n: fx.Node):
        n.meta["val"] = super().run_node(n)
        return n.meta["val"]


@pytest.mark.parametrize("middle, collapses", [(torch.float32, True), (torch.float16, False)])
def test_a_cast_through_an_exact_widening_is_one_cast(middle, collapses):
    # bf16 -> float32 -> bf16 returns every value unchanged (peft casting x to its float32
    # adapters, autocast casting it back); bf16 -> float16 -> bf16 does not (float16 lacks range).
    gm = fx.symbolic_trace(lambda x: x.to(middle).to(BF16))
    _Recorded(gm).run(torch.randn(4, dtype=BF16))
    x, widened, back = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_method")]
    canon = canonical(back)
    if collapses:
        assert canon.op == "identity" and canon.args == (x,) and canon.via == (widened,)
    else:
        assert canon.op == "cast" and canon.args == (widened,)
