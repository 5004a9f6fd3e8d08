"""fastft::lora_linear and fastft::lora_glu_mlp against peft's math (kernels/lora.py references)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastft  # noqa: F401  (registers the ops)
from fastft.kernels.concat import cast_parts
from fastft.kernels.lora import (lora_glu_mlp, lora_glu_mlp_reference, lora_linear,
                                 lora_linear_reference, lora_linear_x3)

from helpers import DEVICE

# Output: elementwise (atol, rtol); gradients: relative L2. bf16/fp16 runs every GEMM in 16 bits
# on both sides, but the adapter's product is rounded where peft's float32 adapter is not.
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# The MLP rounds three projections and the gated product to 16 bits: an ulp of difference in an
# intermediate reaches the output scaled by the next projection, so allow about two output ulps.
MLP_OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (6e-2, 4e-2), torch.float16: (8e-3, 8e-3)}


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _linear_inputs(shape, out_features, rank, dtype, adapter_dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    in_features = shape[-1]

    def rand(*s, dt, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(DEVICE, dt)

    x = rand(*shape, dt=dtype).requires_grad_()
    weight = rand(out_features, in_features, dt=dtype, scale=in_features ** -0.5)
    b = rand(out_features, dt=dtype).requires_grad_() if bias else None
    lora_a = rand(rank, in_features, dt=adapter_dtype, scale=in_features ** -0.5).requires_grad_()
    lora_b = rand(out_features, rank, dt=adapter_dtype, scale=rank ** -0.5).requires_grad_()
    return x, weight, b, lora_a, lora_b


def _assert_matches(out, ref, inputs, dtype, out_tol=OUT_TOL):
    atol, rtol = out_tol[dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(ref)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    have = torch.autograd.grad(out, wanted, grad_out)
    want = torch.autograd.grad(ref, wanted, grad_out)
    for i, (a, b) in enumerate(zip(have, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"grad {i}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert _rel_l2(a, b) <= GRAD_TOL[dtype], f"grad {i}: rel_l2 {_rel_l2(a, b):.3g}"


@pytest.mark.parametrize("dtype,adapter_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_matches_peft_math(dtype, adapter_dtype, bias):
    x, weight, b, lora_a, lora_b = _linear_inputs((3, 7, 40), 24, 4, dtype, adapter_dtype, bias)
    out = lora_linear(x, weight, b, lora_a, lora_b, 1.75, dtype)
    ref = lora_linear_reference(x, weight, b, lora_a, lora_b, 1.75, dtype)
    _assert_matches(out, ref, (x, b, lora_a, lora_b), dtype)


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 9), in_features=st.integers(1, 33), out_features=st.integers(1, 33),
       rank=st.integers(1, 8), scale=st.floats(-4, 4, allow_nan=False), seed=st.integers(0, 2 ** 16))
def test_lora_linear_odd_shapes_float32(rows, in_features, out_features, rank, scale, seed):
    x, weight, b, lora_a, lora_b = _linear_inputs((rows, in_features), out_features, rank, torch.float32,
                                                  torch.float32, bias=True, seed=seed)
    out = lora_linear(x, weight, b, lora_a, lora_b, scale, torch.float32)
    ref = lora_linear_reference(x, weight, b, lora_a, lora_b, scale, torch.float32)
    _assert_matches(out, ref, (x, b, lora_a, lora_b), torch.float32)


def test_lora_linear_frozen_input_and_trainable_base():
    """Only the gradients asked for are computed: no dx for a frozen input; dW when the base trains."""
    x, weight, _, lora_a, lora_b = _linear_inputs((5, 16), 12, 2, torch.float32, torch.float32, bias=False)
    x = x.detach()
    weight.requires_grad_()
    out = lora_linear(x, weight, None, lora_a, lora_b, 0.5, torch.float32)
    ref = lora_linear_reference(x, weight, None, lora_a, lora_b, 0.5, torch.float32)
    _assert_matches(out, ref, (weight, lora_a, lora_b), torch.float32)


def test_lora_linear_out_dtype_upcasts():
    x, weight, _, lora_a, lora_b = _linear_inputs((4, 16), 8, 2, torch.bfloat16, torch.float32, bias=False)
    out = lora_linear(x, weight, None, lora_a, lora_b, 2.0, torch.float32)
    ref = lora_linear_reference(x, weight, None, lora_a, lora_b, 2.0, torch.float32)
    assert out.dtype == torch.float32
    _assert_matches(out, ref, (x, lora_a, lora_b), torch.bfloat16)


@pytest.mark.parametrize("dtype,adapter_dtype,scale,cast", [(torch.float32, torch.float32, 1.0, 0),
                                                             (torch.bfloat16, torch.float32, 0.5, 16 * 4 + 32 * 4)])
def test_lora_linear_backward_keeps_its_inputs_and_x_a(dtype, adapter_dtype, scale, cast):
    """The saved tensors are the op's inputs, x A^T ([rows, r]) and the adapters as cast for the
    GEMMs (A and s B; empty where they are used as they are): no [rows, out] intermediate."""
    x, weight, _, lora_a, lora_b = _linear_inputs((6, 16), 32, 4, dtype, adapter_dtype, bias=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x, weight, None, lora_a, lora_b, scale, dtype)
    shapes = sorted(tuple(t.shape) for t in saved)
    want = [tuple(x.shape), tuple(weight.shape), tuple(lora_a.shape), tuple(lora_b.shape), (6, 4), (cast,)]
    assert shapes == sorted(want)


@pytest.mark.parametrize("bad,message", [
    (dict(x_dtype=torch.float16), "x is torch.float16 but the base weight is torch.float32"),
    (dict(rank_b=3), "adapter shapes"),
    (dict(in_features=15), "does not fit a weight"),
    (dict(adapter_dtype=torch.float64), "lora_a has unsupported dtype torch.float64"),
])
def test_lora_linear_rejects_bad_inputs(bad, message):
    x = torch.randn(4, bad.get("in_features", 16), dtype=bad.get("x_dtype", torch.float32), device=DEVICE)
    weight = torch.randn(8, 16, device=DEVICE)
    adapter_dtype = bad.get("adapter_dtype", torch.float32)
    lora_a = torch.randn(2, 16, dtype=adapter_dtype, device=DEVICE)
    lora_b = torch.randn(8, bad.get("rank_b", 2), dtype=adapter_dtype, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        lora_linear(x, weight, None, lora_a, lora_b, 1.0, torch.float32)


def _mlp_inputs(shape, width, rank, dtype, adapter_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = shape[-1]

    def projection(out_features, in_features):
        w = (torch.randn(out_features, in_features, generator=g) * in_features ** -0.5).to(DEVICE, dtype)
        a = (torch.randn(rank, in_features, generator=g) * in_features ** -0.5).to(DEVICE, adapter_dtype)
        b = (torch.randn(out_features, rank, generator=g) * rank ** -0.5).to(DEVICE, adapter_dtype)
        return w, a.requires_grad_(), b.requires_grad_(), float(torch.rand((), generator=g)) + 0.5

    x = torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
    return x, projection(width, hidden), projection(width, hidden), projection(hidden, width)


@pytest.mark.parametrize("activation", ["silu", "gelu_erf", "gelu_tanh"])
@pytest.mark.parametrize("dtype,adapter_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)])
def test_lora_glu_mlp_matches_peft_math(activation, dtype, adapter_dtype):
    x, gate, up, down = _mlp_inputs((2, 5, 24), 40, 4, dtype, adapter_dtype)
    round_dtype = None if dtype == torch.float32 else dtype
    out = lora_glu_mlp(x, *gate, *up, *down, activation, round_dtype)
    ref = lora_glu_mlp_reference(x, gate, up, down, activation, round_dtype)
    inputs = (x, gate[1], gate[2], up[1], up[2], down[1], down[2])
    _assert_matches(out, ref, inputs, dtype, MLP_OUT_TOL)


def test_lora_glu_mlp_saves_no_gated_product():
    """act(gate) * up is recomputed in the backward: it is not among the saved tensors, while
    the gate and up pre-activations (which the GLU backward reads) are, once each."""
    x, gate, up, down = _mlp_inputs((3, 16), 48, 2, torch.float32, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_glu_mlp(x, *gate, *up, *down, "silu", None)
    activations = [t for t in saved if t.shape == (3, 48)]
    assert len(activations) == 2, [tuple(t.shape) for t in saved]
    assert sum(t.shape == x.shape for t in saved) == 1


def test_lora_glu_mlp_frozen_input_gives_adapter_grads_only():
    x, gate, up, down = _mlp_inputs((4, 16), 24, 2, torch.float32, torch.float32)
    x = x.detach()
    out = lora_glu_mlp(x, *gate, *up, *down, "gelu_tanh", None)
    ref = lora_glu_mlp_reference(x, gate, up, down, "gelu_tanh", None)
    _assert_matches(out, ref, (gate[1], gate[2], up[1], up[2], down[1], down[2]), torch.float32)


def test_lora_glu_mlp_with_only_the_down_adapter_training():
    """No gradient flows into gate and up: h is recomputed whole for the down adapter's dA."""
    x, gate, up, down = _mlp_inputs((4, 16), 24, 2, torch.float32, torch.float32)
    x = x.detach()
    gate = (gate[0], gate[1].detach(), gate[2].detach(), gate[3])
    up = (up[0], up[1].detach(), up[2].detach(), up[3])
    out = lora_glu_mlp(x, *gate, *up, *down, "silu", None)
    ref = lora_glu_mlp_reference(x, gate, up, down, "silu", None)
    _assert_matches(out, ref, (down[1], down[2]), torch.float32)


def test_the_backward_reuses_the_adapters_the_forward_cast(monkeypatch):
    """fp32 adapters under bf16 bases are cast (and scaled) once a step, in the forward: one
    cast_parts launch per op, whose result the backward takes; the gradients are unchanged."""
    import fastft.kernels.lora as lora

    calls = []
    monkeypatch.setattr(lora, "cast_parts", lambda *a, **k: calls.append(len(a[0])) or cast_parts(*a, **k))
    x, gate, up, down = _mlp_inputs((2, 5, 16), 24, 2, torch.bfloat16, torch.float32)
    params = (x, gate[1], gate[2], up[1], up[2], down[1], down[2])
    out = lora_glu_mlp(x, *gate, *up, *down, "silu", torch.bfloat16)
    _assert_matches(out, lora_glu_mlp_reference(x, gate, up, down, "silu", torch.bfloat16), params, torch.bfloat16)
    assert calls == [6]  # gate, up and down's A and B: one launch, forward and backward
    calls.clear()
    out = lora_linear_x3(x, *gate[:3], 1.0, *up[:3], 0.5, *gate[:3], 2.0, torch.bfloat16)
    torch.autograd.grad(out, (x, gate[1], up[2]), [torch.ones_like(o) for o in out])
    assert calls == [6]
    calls.clear()
    y = lora_linear(x, gate[0], None, gate[1], gate[2], 0.5, torch.bfloat16)
    torch.autograd.grad(y, (gate[1], gate[2]), torch.ones_like(y))
    assert calls == [2]


def test_lora_ops_pass_opcheck():
    x, weight, b, lora_a, lora_b = _linear_inputs((3, 16), 8, 2, torch.float32, torch.float32, bias=True)
    torch.library.opcheck(torch.ops.fastft.lora_linear_forward.default,
                          (x, weight, b, lora_a, lora_b, 0.5, torch.float32),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    x, gate, up, down = _mlp_inputs((3, 16), 24, 2, torch.float32, torch.float32)
    torch.library.opcheck(torch.ops.fastft.lora_glu_mlp_forward.default, (x, *gate, *up, *down, "silu", None),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    # The backward of lora_linear / x3, with one output that got no gradient and a trainable bias.
    x = torch.randn(3, 16, device=DEVICE)
    ws = [torch.randn(n, 16, device=DEVICE) for n in (8, 4, 4)]
    As = [torch.randn(2, 16, device=DEVICE) for _ in ws]
    Bs = [torch.randn(w.shape[0], 2, device=DEVICE) for w in ws]
    dys = [torch.randn(3, 8, device=DEVICE), None, torch.randn(3, 4, device=DEVICE)]
    xa = x @ torch.cat(As).t()
    needs = [False, True, True, True] * 3
    # The adapters as the forward cast them, and not given (empty): the op casts them itself.
    for adapters in (cast_parts(As + Bs, torch.float32, [1.0] * 3 + [0.5, 1.0, 2.0]), x.new_empty(0)):
        torch.library.opcheck(torch.ops.fastft.lora_group_backward.default,
                              (dys, x, xa, ws, As, Bs, [0.5, 1.0, 2.0], adapters, True, needs),
                              test_utils=("test_schema", "test_faketensor"))


def _quantised_linear(out_features=16, in_features=64, quant_type="nf4", nested=True):
    """A bitsandbytes 4-bit weight (CPU quantisation) as fastft::qlora_linear takes it."""
    from bitsandbytes.functional import quantize_4bit

    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(3)) * 0.1
    packed, qs = quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    nested_args = ((qs.state2.absmax.to(DEVICE), qs.state2.code.to(DEVICE), qs.offset.to(DEVICE)) if nested
                   else (None, None, None))
    from bitsandbytes.functional import dequantize_4bit as bnb_dequantize

    qs_dense = bnb_dequantize(packed, qs).reshape(out_features, in_features)
    args = (packed.to(DEVICE), qs.absmax.to(DEVICE), *nested_args, [float(v) for v in qs.code], 64,
            out_features, in_features)
    return args, qs_dense.to(DEVICE)


@pytest.mark.parametrize("quant_type,nested", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("bias", [False, True])
def test_qlora_linear_matches_lora_over_the_dequantised_weight(quant_type, nested, bias):
    """The 4-bit op equals the dense LoRA op over the weight bitsandbytes dequantises; a bias
    (trainable here, so that its gradient is checked too) is added as a linear's is."""
    quant, dense = _quantised_linear(quant_type=quant_type, nested=nested)
    x, _, b, lora_a, lora_b = _linear_inputs((2, 5, 64), 16, 4, torch.bfloat16, torch.float32, bias=bias)
    out = torch.ops.fastft.qlora_linear(x, *quant, torch.bfloat16, b, lora_a, lora_b, 1.5, torch.bfloat16)
    ref = lora_linear_reference(x, dense.to(torch.bfloat16), b, lora_a, lora_b, 1.5, torch.bfloat16)
    _assert_matches(out, ref, (x, b, lora_a, lora_b), torch.bfloat16)


@pytest.mark.parametrize("bias", [False, True])
def test_qlora_linear_with_fp32_activations_computes_as_peft_does(bias):
    """With float32 x and adapters over a bf16 4-bit GEMM (peft's prepare_model_for_kbit_training),
    peft computes only the base in bf16: the adapter, the sum and their gradients stay float32,
    and so must the op's (to float32's tolerance, not bf16's)."""
    quant, dense = _quantised_linear()
    x, _, _, lora_a, lora_b = _linear_inputs((2, 5, 64), 16, 4, torch.float32, torch.float32, bias=False)
    b = torch.randn(16, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.bfloat16).requires_grad_() \
        if bias else None
    out = torch.ops.fastft.qlora_linear(x, *quant, torch.bfloat16, b, lora_a, lora_b, 0.75, torch.float32)
    base = torch.nn.functional.linear(x.to(torch.bfloat16), dense.to(torch.bfloat16), b).float()
    ref = base + torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), lora_b) * 0.75
    _assert_matches(out, ref, (x, b, lora_a, lora_b), torch.float32)


def test_qlora_linear_fp32_bias_gets_an_fp32_gradient():
    """A bias kept in fp32 gets its gradient summed in fp32, not rounded to the compute dtype first."""
    quant, dense = _quantised_linear()
    x, _, _, lora_a, lora_b = _linear_inputs((4, 9, 64), 16, 4, torch.bfloat16, torch.float32, bias=False)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(5)).to(DEVICE).requires_grad_()
    out = torch.ops.fastft.qlora_linear(x, *quant, torch.bfloat16, bias, lora_a, lora_b, 0.5, torch.bfloat16)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(out)
    (dbias,) = torch.autograd.grad(out, [bias], grad_out)
    assert dbias.dtype == torch.float32
    want = grad_out.float().reshape(-1, 16).sum(0)
    torch.testing.assert_close(dbias, want, atol=1e-5, rtol=1e-6)


def test_lora_ops_trace_through_aot_autograd():
    """Under torch.compile the backwards are traced with fake tensors: every op's backward must
    go through ops with fake implementations (a raw kernel launch there fails)."""
    utils = ("test_schema", "test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    quant, _ = _quantised_linear()
    x, _, _, lora_a, lora_b = _linear_inputs((3, 64), 16, 2, torch.bfloat16, torch.float32, bias=False)
    torch.library.opcheck(torch.ops.fastft.qlora_linear.default,
                          (x, *quant, torch.bfloat16, None, lora_a, lora_b, 0.5, torch.bfloat16), test_utils=utils)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(4)).to(DEVICE, torch.bfloat16).requires_grad_()
    torch.library.opcheck(torch.ops.fastft.qlora_linear.default,
                          (x, *quant, torch.bfloat16, bias, lora_a, lora_b, 0.5, torch.bfloat16), test_utils=utils)
    wide_x = x.detach().float().requires_grad_()  # float32 activations over the bf16 GEMM
    torch.library.opcheck(torch.ops.fastft.qlora_linear.default,
                          (wide_x, *quant, torch.bfloat16, bias, lora_a, lora_b, 0.5, torch.float32), test_utils=utils)
    x, weight, b, lora_a, lora_b = _linear_inputs((3, 16), 8, 2, torch.float32, torch.float32, bias=True)
    torch.library.opcheck(torch.ops.fastft.lora_linear_forward.default,
                          (x, weight, b, lora_a, lora_b, 0.5, torch.float32),
                          test_utils=utils)
    x, gate, up, down = _mlp_inputs((3, 16), 24, 2, torch.float32, torch.float32)
    torch.library.opcheck(torch.ops.fastft.lora_glu_mlp_forward.default, (x, *gate, *up, *down, "silu", None),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.fastft.lora_linear_x3_forward.default, (x, *gate, *up, *gate, torch.float32),
                          test_utils=utils)
    biases = [torch.randn(24, generator=torch.Generator().manual_seed(i)).to(DEVICE).requires_grad_(i != 1)
              for i in range(3)]
    torch.library.opcheck(torch.ops.fastft.lora_linear_x3_forward.default,
                          (x, *gate, *up, *gate, torch.float32, *biases), test_utils=utils)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("biases", ["none", "trained", "k_only_frozen"])
def test_lora_linear_x3_matches_three_lora_linears(dtype, adapter_dtype, biases):
    x, *_ = _linear_inputs((2, 5, 24), 8, 2, dtype, adapter_dtype, bias=False)
    projections, bias_list = [], []
    # q wider than k and v (grouped-query attention); ranks differ, so the stacked x A^T is uneven
    for i, (seed, out_features, rank) in enumerate(((1, 16, 4), (2, 8, 2), (3, 8, 3))):
        _, w, bias, a, b = _linear_inputs((1, 24), out_features, rank, dtype, adapter_dtype, bias=True, seed=seed)
        projections.append((w, a, b, 0.5 + seed))
        if biases == "none" or (biases == "k_only_frozen" and i != 1):
            bias = None
        elif biases == "k_only_frozen":
            bias = bias.detach()
        bias_list.append(bias)
    outs = lora_linear_x3(x, *[t for p in projections for t in p], dtype, *bias_list)
    refs = [lora_linear_reference(x, w, bias, a, b, s, dtype) for (w, a, b, s), bias in zip(projections, bias_list)]
    inputs = [x] + [t for _, a, b, _ in projections for t in (a, b)]
    inputs += [bias for bias in bias_list if bias is not None and bias.requires_grad]
    grad_outs = [torch.randn(r.shape, generator=torch.Generator().manual_seed(7 + i)).to(r) for i, r in enumerate(refs)]
    have = torch.autograd.grad(outs, inputs, grad_outs)
    want = torch.autograd.grad(refs, inputs, grad_outs)
    atol, rtol = OUT_TOL[dtype]
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    for i, (a, b) in enumerate(zip(have, want)):
        assert a.dtype == b.dtype and _rel_l2(a, b) <= GRAD_TOL[dtype], f"grad {i}: {_rel_l2(a, b):.3g}"


def test_lora_linear_x3_with_one_output_unused_and_frozen_input():
    x, *_ = _linear_inputs((4, 16), 8, 2, torch.float32, torch.float32, bias=False)
    x = x.detach()
    projections = [_linear_inputs((1, 16), 8, 2, torch.float32, torch.float32, bias=False, seed=s)[1:]
                   for s in (1, 2, 3)]
    projections = [(w, a, b, 1.0) for w, _, a, b in projections]
    q, k, v = lora_linear_x3(x, *[t for p in projections for t in p], torch.float32)
    (q.sum() + v.sum()).backward()  # k gets no gradient: its adapters get none either
    assert projections[1][1].grad is None and projections[1][2].grad is None
    ref = lora_linear_reference(x, *projections[0][:1], None, *projections[0][1:], torch.float32)
    want = torch.autograd.grad(ref.sum(), projections[0][1])[0]
    torch.testing.assert_close(projections[0][1].grad, want)


def _float64(projection):
    return tuple(t.detach().double() if torch.is_tensor(t) else t for t in projection)


@pytest.mark.parametrize("rows,through_depth", [(4, False), (256, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapters_through_the_gemm_depth_match_peft_math(rows, through_depth, dtype):
    """Many rows through narrow weights: the corrections go through the GEMMs' depth ([x | x A^T]
    times [W | s B]^T, and [dY | s dY B] times [W; A] for dX); few rows: as passes. Both are
    exercised here, for the MLP and for one linear. float32 matches peft's math elementwise; in
    bf16 the MLP output is compared with the exact (float64) result, no further from it than
    peft's own bf16 computation is, give or take a quarter (at 256 rows one element in 2,048
    differs by a rounding that cancellation makes look large)."""
    from fastft.kernels.lora import depth_concat_pays

    hidden, width = 8, 32
    assert depth_concat_pays(rows, hidden, width, weights=2) == through_depth  # gate and up forward
    assert depth_concat_pays(rows, hidden, width) == through_depth  # dh in the MLP backward; one linear
    round_dtype = None if dtype == torch.float32 else dtype
    x, gate, up, down = _mlp_inputs((rows, hidden), width, 3, dtype, torch.float32, seed=rows)
    out = lora_glu_mlp(x, *gate, *up, *down, "silu", round_dtype)
    ref = lora_glu_mlp_reference(x, gate, up, down, "silu", round_dtype)
    inputs = (x, gate[1], gate[2], up[1], up[2], down[1], down[2])
    if dtype == torch.float32:
        _assert_matches(out, ref, inputs, dtype, MLP_OUT_TOL)
    else:
        exact = lora_glu_mlp_reference(x.detach().double(), _float64(gate), _float64(up), _float64(down),
                                       "silu", None)
        assert _rel_l2(out, exact) <= 1.25 * _rel_l2(ref, exact), (_rel_l2(out, exact), _rel_l2(ref, exact))
        grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(ref)
        for a, b in zip(torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(ref, inputs, grad_out)):
            assert a.dtype == b.dtype and _rel_l2(a, b) <= GRAD_TOL[dtype]
    x, weight, b, lora_a, lora_b = _linear_inputs((rows, hidden), width, 3, dtype, torch.float32, bias=True)
    out = lora_linear(x, weight, b, lora_a, lora_b, 0.75, dtype)
    ref = lora_linear_reference(x, weight, b, lora_a, lora_b, 0.75, dtype)
    _assert_matches(out, ref, (x, b, lora_a, lora_b), dtype)
