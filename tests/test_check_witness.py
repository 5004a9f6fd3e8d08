"""fastft.check where rounding, not a fault, separates the optimised model from the original: a
16-bit model's whole-model results outside the tolerance are judged against a float32 run of the
original, which vouches only where the original itself is close to it; a region's outputs against
the region run in float64, its own casts between floating dtypes skipped."""
from __future__ import annotations

import types

import peft
import pytest
import torch
import torch.fx as fx

import fastft
import fastft.kernels.lora as lora_kernels
from fastft.check import (CheckResult, Comparison, _compare, _compare_to_witness, _float64_outputs,
                          _judge_by_float32_run)
from fastft.tiny import random_batch
from fastft.tolerances import WITNESS_FACTOR, tolerance_for

from helpers import tiny

BF16 = tolerance_for(torch.bfloat16)


def _adapted(model_type: str) -> torch.nn.Module:
    """A tiny bf16 model with LoRA on every linear; random A and B, so that the adapters matter."""
    model = tiny(model_type, dtype=torch.bfloat16)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0,
                             init_lora_weights=False)
    return peft.get_peft_model(model, config)


def _offsets(n: int = 4096, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float32 "truth" and two random directions as long as it is: truth + f * e is f away (rel_l2)."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(n, generator=g)
    e1, e2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return truth, e1 / e1.norm() * truth.norm(), e2 / e2.norm() * truth.norm()


def _judge(new: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor) -> Comparison:
    first = _compare("grad w", new, ref, elementwise=False, floor=torch.bfloat16)
    assert not first.ok  # each case below starts from a failed comparison
    return _compare_to_witness(first, new, ref, truth, torch.bfloat16)


@pytest.mark.parametrize("fused_off, original_off, passes", [
    (0.03, 0.08, True),    # the optimised result is the nearer to float32
    (0.09, 0.08, True),    # a little further, within the tolerance's own slack
    (0.25, 0.08, False),   # much further than the original: a real error
    (0.03, 0.5, False),    # the original is far from the float32 run: no witness
])
def test_the_float32_run_decides_only_as_a_witness(fused_off, original_off, passes):
    truth, e1, e2 = _offsets()
    judged = _judge(truth + fused_off * e2, truth + original_off * e1, truth)
    assert judged.ok is passes, judged
    expected = "from a float32 run" if original_off <= WITNESS_FACTOR * BF16.rel_l2 else "no witness"
    assert expected in judged.bound


def test_a_non_finite_result_never_passes_by_witness():
    truth, e1, e2 = _offsets()
    new = truth + 0.03 * e2
    new[7] = float("nan")
    assert not _judge(new, truth + 0.08 * e1, truth).ok


def test_a_float32_run_that_fails_is_reported_and_changes_nothing():
    truth, e1, e2 = _offsets()
    pairs = {"grad w": (truth + 0.03 * e2, truth + 0.08 * e1)}
    result = CheckResult(model=[_compare("grad w", *pairs["grad w"], elementwise=False, floor=torch.bfloat16)])

    def no_memory():
        raise torch.OutOfMemoryError("no room for a float32 copy")

    _judge_by_float32_run(result, pairs, torch.bfloat16, no_memory)
    assert not result.ok and not result.model[0].ok
    assert "OutOfMemoryError" in result.problems[0] and "float32 run" in result.problems[0]


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_bf16_gradients_no_further_from_float32_than_the_original_pass(checkpointed):
    # BitNet's tiny bf16 model: the original's own adapter gradients in layer 0 sit 8-13% (rel_l2)
    # from a float32 run, the fused ones 3-4% (torch 2.13, CPU): the two differ by more than bf16's 2%.
    # Checkpointed layers run their forward again in the backward: the float32 run's backward too
    # must see the float32 weights.
    model = _adapted("bitnet")
    if checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = random_batch(model)
    fastft.optimize(model)
    result = fastft.check(model, batch)
    assert result.ok, str(result)
    outside = [c for c in result.model if c.rel_l2_error > BF16.rel_l2 and c.max_abs_error > BF16.atol]
    assert outside, "no gradient outside the tolerance: this model no longer exercises the float32 run"
    assert all("from a float32 run" in c.bound for c in outside), [str(c) for c in outside]


def test_a_wrong_adapter_gradient_still_fails(monkeypatch):
    real = lora_kernels._group_backward

    def skewed(*args, **kwargs):  # every adapter's dA 30% too large
        dx, grads = real(*args, **kwargs)
        return dx, [(dw, dbias, da * 1.3 if da is not None else None, db) for dw, dbias, da, db in grads]

    monkeypatch.setattr(lora_kernels, "_group_backward", skewed)
    model = _adapted("llama")
    batch = random_batch(model)
    fastft.optimize(model)
    result = fastft.check(model, batch)
    wrong = [c for c in result.model if "lora_A" in c.name and not c.ok]
    assert not result.ok and wrong, str(result)
    assert all("from a float32 run" in c.bound for c in wrong), [str(c) for c in wrong]


def test_a_region_with_casts_runs_in_float64():
    # As peft writes an adapter over a bf16 base: x cast to the float32 adapter's dtype, the sum
    # cast back. Run in float64 with its casts kept, the float32 x met a float64 adapter: an error.
    def region(x, w, a, b):
        base = torch.nn.functional.linear(x, w)
        adapter = torch.nn.functional.linear(torch.nn.functional.linear(x.to(torch.float32), a), b)
        return (base + adapter * 2.0).to(torch.bfloat16)

    gm = fx.symbolic_trace(region)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 8, generator=g).bfloat16(), torch.randn(6, 8, generator=g).bfloat16()
    a, b = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    (out,) = _float64_outputs(types.SimpleNamespace(region=gm), [x, w, a, b])
    xd, wd, ad, bd = (t.double() for t in (x, w, a, b))
    assert out.dtype == torch.float64
    assert torch.allclose(out, xd @ wd.T + 2.0 * (xd @ ad.T) @ bd.T, rtol=1e-12, atol=1e-12)


@torch.library.custom_op("fastft_test::float32_only", mutates_args=())
def _float32_only(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """As bitsandbytes' CUDA 4-bit GEMM takes its absmax: float32 or an error."""
    if scale.dtype != torch.float32:
        raise RuntimeError(f"scale must be float32, got {scale.dtype}")
    return x * scale.to(x.dtype)


def test_a_library_op_in_a_region_keeps_its_traced_dtypes_in_the_float64_run():
    # Before: every floating input was widened, and the op raised on a float64 scale (the 4-bit
    # regions of peft's QLoRA recipe on the H200, 2026-12-01).
    def region(x, scale):
        return torch.ops.fastft_test.float32_only.default(x, scale) + x

    gm = fx.symbolic_trace(region)
    g = torch.Generator().manual_seed(0)
    x, scale = torch.randn(5, 8, generator=g), torch.rand(8, generator=g)
    for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], (x, scale)):
        node.meta["val"] = value
    (out,) = _float64_outputs(types.SimpleNamespace(region=gm), [x, scale])
    assert out.dtype == torch.float64  # the op's float32 result meets the float64 x
    assert torch.allclose(out, x.double() * scale.double() + x.double(), rtol=1e-6, atol=1e-6)
