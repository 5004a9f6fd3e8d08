"""The RMSNorm pattern on hand-written modules: every spelling of the math, the variants that
change the numbers, and the near misses that must be left alone (with the reason reported)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastft

from helpers import DEVICE, assert_norm_before_a_foreign_cast


class Net(nn.Module):
    """Linear -> norm -> linear, so the norm sits between trainable ops like in a real layer."""

    def __init__(self, norm: nn.Module, width: int = 24, dtype=torch.float32) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width, dtype=dtype)
        self.norm = norm
        self.out = nn.Linear(width, 4, dtype=dtype)

    def forward(self, x):
        return self.out(self.norm(self.inp(x))).float().pow(2).mean()


class CastBeforeWeight(nn.Module):  # the most common layout: round to input dtype, then weight
    def __init__(self, width, eps=1e-6, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, dtype=dtype))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class OnePlusWeight(nn.Module):  # weight stored as an offset from 1, product in float32
    def __init__(self, width, eps=1e-6, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, dtype=dtype) * 0.1)
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


class OtherSpelling(nn.Module):  # x*x, 1/sqrt, torch.mean with dim=, eps first
    def __init__(self, width, eps=1e-5, dtype=torch.float32):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(width, dtype=dtype))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        ms = torch.mean(h * h, dim=-1, keepdim=True)
        return (h / torch.sqrt(self.eps + ms)).to(x.dtype) * self.scale


class NoWeight(nn.Module):
    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


class NoUpcast(nn.Module):  # squares and means in bf16: the kernel (fp32) would not match it
    def __init__(self, width, dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width, dtype=dtype))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class WrongDim(nn.Module):  # mean over the first dim: not an RMSNorm
    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6))


def _optimise_and_run(model, x):
    fastft.optimize(model)
    model(x).backward()
    return fastft.report(model)


@pytest.mark.parametrize("norm_cls", [CastBeforeWeight, OnePlusWeight, OtherSpelling])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variants_are_rewritten_and_equivalent(norm_cls, dtype):
    torch.manual_seed(0)
    model = Net(norm_cls(24, dtype=dtype), dtype=dtype).to(DEVICE)
    x = torch.randn(3, 5, 8, dtype=dtype, device=DEVICE)
    report = _optimise_and_run(model, x)
    assert report.counts() == {"rms_norm": 1}, report
    assert report.rewrites[0].module_path == "norm"
    result = fastft.check(model, (x,))
    assert result.ok, result
    assert result.regions_checked == 1


def test_no_weight_variant():
    torch.manual_seed(0)
    model = Net(NoWeight()).to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE)
    assert _optimise_and_run(model, x).counts() == {"rms_norm": 1}
    assert fastft.check(model, (x,)).ok


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.25])
def test_eps_is_read_from_the_graph(eps):
    torch.manual_seed(0)
    model = Net(CastBeforeWeight(24, eps=eps)).to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE)
    _optimise_and_run(model, x)
    fused = [n for g in fastft.optimize(model)._fastft_state.graphs.values()
             for n in g.gm.graph.nodes if n.target is torch.ops.fastft.rms_norm.default]
    assert len(fused) == 1 and fused[0].args[2] == pytest.approx(eps)
    assert fastft.check(model, (x,)).ok


def test_no_upcast_is_a_near_miss_with_reason():
    torch.manual_seed(0)
    model = Net(NoUpcast(24, torch.bfloat16), dtype=torch.bfloat16).to(DEVICE)
    report = _optimise_and_run(model, torch.randn(4, 8, dtype=torch.bfloat16, device=DEVICE))
    assert report.counts() == {}
    assert len(report.near_misses) == 1
    miss = report.near_misses[0]
    assert miss.pattern == "rms_norm" and "norm" in miss.region
    assert "bfloat16" in miss.reason and "float32" in miss.reason


class CastToBytes(nn.Module):
    """A norm whose result the model also casts to uint8 (a model casting its input to a 4-bit
    weight's storage dtype does): the kernel writes no uint8, so that cast stays the model's."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 24)
        self.norm = CastBeforeWeight(24)
        self.out = nn.Linear(24, 4)

    def forward(self, x):
        h = self.norm(self.inp(x))
        return self.out(h).pow(2).mean() + h.to(torch.uint8).float().mean()


def test_a_cast_to_a_dtype_the_kernel_does_not_write_stays_the_models():
    torch.manual_seed(0)
    assert_norm_before_a_foreign_cast(CastToBytes().to(DEVICE), torch.randn(4, 8, device=DEVICE) * 4, "rms_norm")


def test_reduction_over_the_wrong_dim_is_left_alone():
    torch.manual_seed(0)
    model = Net(WrongDim(24)).to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE)
    report = _optimise_and_run(model, x)
    assert report.counts() == {}
    assert report.near_misses and "dims" in report.near_misses[0].reason
    assert fastft.check(model, (x,)).ok  # unoptimised there, still trains correctly


def test_frozen_weight_gets_no_gradient_and_input_still_does():
    torch.manual_seed(0)
    model = Net(CastBeforeWeight(24)).to(DEVICE)
    model.norm.weight.requires_grad_(False)
    x = torch.randn(4, 8, device=DEVICE)
    report = _optimise_and_run(model, x)
    assert report.counts() == {"rms_norm": 1}
    assert model.norm.weight.grad is None
    assert model.inp.weight.grad is not None
    assert fastft.check(model, (x,)).ok


class Branchy(nn.Module):
    """A norm inside both branches of torch.cond: control-flow bodies are nested graphs too."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 24)
        self.norm = CastBeforeWeight(24)

    def forward(self, x):
        h = self.inp(x)
        h = torch.cond(h.sum() > 0, lambda t: self.norm(t) * 2, lambda t: self.norm(t) - 1, (h,))
        return h.pow(2).mean()


def test_norms_inside_control_flow_bodies_are_rewritten():
    torch.manual_seed(0)
    model = Branchy().to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE)
    fastft.optimize(model)
    model(x).backward()
    state = model._fastft_state
    fused = [n for g in state.graphs.values() for sub in g.gm.modules() if isinstance(sub, torch.fx.GraphModule)
             for n in sub.graph.nodes if n.target is torch.ops.fastft.rms_norm.default]
    assert len(fused) == 2  # one per branch
    assert not fastft.report(model).capture_failures
    result = fastft.check(model, (x,))
    assert result.ok, str(result)
    assert result.regions_checked == 1  # the branch the data took


# --------------------------------------------------------------------------------------------
# More spellings of the inverse square root and of the mean
# --------------------------------------------------------------------------------------------
def _ms(h):
    return h.pow(2).mean(-1, keepdim=True)


SPELLINGS = {
    "pow_minus_half": lambda h, eps: h * torch.pow(_ms(h) + eps, -0.5),
    "power_operator": lambda h, eps: h * (_ms(h) + eps) ** -0.5,
    "one_over_sqrt": lambda h, eps: h * (1 / torch.sqrt(_ms(h) + eps)),
    "reciprocal_of_sqrt": lambda h, eps: h * torch.reciprocal(torch.sqrt(eps + _ms(h))),
    "divide_by_pow_half": lambda h, eps: h / torch.pow(_ms(h) + eps, 0.5),
    "sum_over_width": lambda h, eps: h * torch.rsqrt((h * h).sum(dim=-1, keepdim=True) / h.shape[-1] + eps),
    "sum_times_inverse_width": lambda h, eps: h * torch.rsqrt(
        h.pow(2).sum(-1, keepdim=True) * (1.0 / h.shape[-1]) + eps),
    "sum_over_width_pow_minus_half": lambda h, eps: h * torch.pow(
        torch.sum(h * h, -1, keepdim=True) / h.shape[-1] + eps, -0.5),
}


class Spelled(nn.Module):
    """Normalise in fp32 with one of SPELLINGS, multiply by the fp32 weight, cast back."""

    def __init__(self, width, spelling, eps=1e-6, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(width, dtype=dtype))
        self.spelling, self.eps = spelling, eps

    def forward(self, x):
        normed = SPELLINGS[self.spelling](x.float(), self.eps)
        return (normed * self.weight.float()).type_as(x)


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_spellings_are_rewritten_and_equivalent(spelling, dtype):
    torch.manual_seed(0)
    model = Net(Spelled(24, spelling, dtype=dtype), dtype=dtype).to(DEVICE)
    x = torch.randn(3, 5, 8, dtype=dtype, device=DEVICE)
    report = _optimise_and_run(model, x)
    assert report.counts() == {"rms_norm": 1}, report
    assert report.near_misses == [], report
    (fused,) = [n for g in model._fastft_state.graphs.values() for n in g.gm.graph.nodes
                if n.target is torch.ops.fastft.rms_norm.default]
    assert fused.args[2] == pytest.approx(1e-6)  # eps as written: the mean is the mean
    result = fastft.check(model, (x,))
    assert result.ok, result
    assert result.regions_checked == 1


class L2Norm(nn.Module):  # sum of squares, not the mean (linear attention's q and k)
    def __init__(self, divide=False, upcast=True):
        super().__init__()
        self.divide, self.upcast = divide, upcast

    def forward(self, x):
        h = x.float() if self.upcast else x
        if self.divide:
            return (h / torch.sqrt((h * h).sum(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)
        return (h * torch.rsqrt((h * h).sum(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)


@pytest.mark.parametrize("norm", [L2Norm(), L2Norm(divide=True), L2Norm(upcast=False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2_normalisation_is_rewritten_with_the_sum_of_squares(norm, dtype):
    torch.manual_seed(0)
    model = Net(norm, dtype=dtype).to(DEVICE)
    x = torch.randn(4, 8, dtype=dtype, device=DEVICE)
    reference = model(x)
    report = _optimise_and_run(model, x)
    if dtype != torch.float32 and not norm.upcast:  # a 16-bit sum: not what the kernel computes
        assert report.counts() == {} and "sum of squares is computed in torch.bfloat16" in \
            report.near_misses[0].reason, report
        return
    assert report.counts() == {"rms_norm": 1}, report
    (call,) = [n for g in model._fastft_state.graphs.values() for n in g.gm.graph.nodes
               if n.target is torch.ops.fastft.rms_norm.default]
    assert call.args[6] is True  # the sum of the squares, not their mean
    torch.testing.assert_close(model(x), reference, **({} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)))
    assert fastft.check(model, (x,)).ok


class SumOverWrongWidth(nn.Module):  # divides by a number that is not the row's width
    def __init__(self, divisor, multiply=False):
        super().__init__()
        self.divisor, self.multiply = divisor, multiply

    def forward(self, x):
        h = x.float()
        total = h.pow(2).sum(-1, keepdim=True)
        mean = total * (1 / self.divisor) if self.multiply else total / self.divisor
        return h * torch.rsqrt(mean + 1e-6)


class PowWrongDim(nn.Module):  # pow(., -0.5) is an anchor too: its near miss is reported
    def forward(self, x):
        return x * torch.pow(x.pow(2).mean(0, keepdim=True) + 1e-6, -0.5)


@pytest.mark.parametrize("norm, reason", [
    (SumOverWrongWidth(7), "divided by 7, but a mean over the row divides by its width (24)"),
    (SumOverWrongWidth(7, multiply=True), "multiplied by 1/7, but a mean over the row divides by its width (24)"),
    (SumOverWrongWidth(12), "divided by 12, but a mean over the row divides by its width (24)"),
    (PowWrongDim(), "dims"),
])
def test_sums_that_are_not_means_are_near_misses_with_the_reason(norm, reason):
    torch.manual_seed(0)
    model = Net(norm).to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE)
    report = _optimise_and_run(model, x)
    assert report.counts() == {}, report
    assert len(report.near_misses) == 1, report
    miss = report.near_misses[0]
    assert miss.pattern == "rms_norm" and miss.region.startswith("norm"), miss
    assert reason in miss.reason, miss
    assert "expected mean" not in miss.reason
    assert fastft.check(model, (x,)).ok


class RotaryThenNorm(nn.Module):
    """q and k rotated (one fused call for both), then each normalised: the norms read the
    rotation's fused outputs, rewired after the norms' nodes were first looked at."""

    def __init__(self, head_dim=16, dtype=torch.float32):
        super().__init__()
        self.q = nn.Linear(32, 4 * head_dim, bias=False, dtype=dtype)
        self.k = nn.Linear(32, 2 * head_dim, bias=False, dtype=dtype)
        self.q_norm = CastBeforeWeight(head_dim, dtype=dtype)
        self.k_norm = CastBeforeWeight(head_dim, dtype=dtype)
        self.head_dim = head_dim
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))

    @staticmethod
    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)

    def forward(self, h):
        b, s, _ = h.shape
        q = self.q(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, s, -1, self.head_dim).transpose(1, 2)
        freqs = torch.arange(s, device=h.device).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(h.dtype)[None, None], emb.sin().to(h.dtype)[None, None]
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        q, k = self.q_norm(q), self.k_norm(k)
        return q.float().pow(2).mean() + k.float().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_of_a_fused_rotation_output_are_rewritten(dtype):
    torch.manual_seed(0)
    model = RotaryThenNorm(dtype=dtype).to(DEVICE)
    x = torch.randn(2, 6, 32, dtype=dtype, device=DEVICE)
    report = _optimise_and_run(model, x)
    assert report.counts() == {"rope": 1, "rms_norm": 2}, report
    assert report.near_misses == [], report
    result = fastft.check(model, (x,))
    assert result.ok, result
    assert result.regions_checked == 3


class NormBetweenLinears(nn.Module):
    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(width, width), nn.Linear(width, width)
        self.norm = CastBeforeWeight(width)

    def forward(self, x):
        return self.out(self.norm(self.inp(x))).square().mean()


def _saved_bytes(model, x) -> int:
    """Bytes the forward keeps for the backward (every tensor autograd saves, compiled or not)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x)
    loss.backward()
    return total


def test_lowered_norm_is_recomputed_in_the_backward_not_saved():
    """Under AOT autograd (Inductor lowering) the norm's output is not kept for the next linear's
    backward: the norm runs again there from its input, which its own backward keeps anyway."""
    import dataclasses

    from fastft.patterns import RMS_NORM

    torch.manual_seed(0)
    x = torch.randn(4, 8, 48, device=DEVICE)
    saved, models = {}, {}
    # The compile caches' keys do not include the partitioner's recompute hints: compile afresh.
    for recompute in (True, False):
        torch.manual_seed(1)
        model = NormBetweenLinears().to(DEVICE)
        models[recompute] = model
        fastft.optimize(model, lower="inductor", patterns=[dataclasses.replace(RMS_NORM, recompute=recompute)])
        with _compiled_afresh():
            _saved_bytes(model, x)  # the first call captures and compiles
        saved[recompute] = _saved_bytes(model, x)
        assert fastft.report(model).counts() == {"rms_norm": 1}
    assert saved[False] - saved[True] == x.numel() * x.element_size(), saved
    for a, b in zip(models[True].parameters(), models[False].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


class UpcastOnlyForTheSquares(nn.Module):
    """The squares read ``x.to(float32)``, the product reads x itself: on float32 data the cast
    changes nothing, so it is the same RMSNorm."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(width))

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(dim=-1, keepdim=True)
        return (x * torch.rsqrt(variance + 1e-6)).to(x.dtype) * self.weight


def test_a_cast_to_the_dtype_a_tensor_has_is_no_cast():
    torch.manual_seed(0)
    model = Net(UpcastOnlyForTheSquares()).to(DEVICE)
    x = torch.randn(4, 8, device=DEVICE)
    report = _optimise_and_run(model, x)
    assert report.counts() == {"rms_norm": 1} and not report.near_misses, report
    assert fastft.check(model, (x,)).ok



class CastsOfCastsAndInverseCast(nn.Module):
    """An unweighted norm of an upcast, flattened input whose squares read the upcast again
    (``.float()`` of a float32 value) and whose inverse RMS is cast to the dtype it already has:
    both are the identity, also where an op (here rsqrt) is expected."""

    def __init__(self, dtype) -> None:
        super().__init__()
        self.out = nn.Linear(24, 4, dtype=dtype)

    def forward(self, x):
        flat = x.flatten(2).float()
        y = flat * torch.rsqrt(flat.float().square().mean(-1, keepdim=True) + 1e-6).to(flat.dtype)
        return self.out(y.to(x.dtype)).float().pow(2).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identities_are_looked_through_where_an_op_is_expected(dtype):
    torch.manual_seed(0)
    model = CastsOfCastsAndInverseCast(dtype).to(DEVICE)
    x = torch.randn(3, 5, 4, 6, dtype=dtype, device=DEVICE, requires_grad=True)
    report = _optimise_and_run(model, x)
    assert report.counts() == {"rms_norm": 1} and not report.near_misses, report
    assert fastft.check(model, (x,)).ok


class LibraryNorm(nn.Module):  # PyTorch's own nn.RMSNorm after a linear
    def __init__(self, dtype, affine=True, eps=None, weight_dtype=None):
        super().__init__()
        self.lin = nn.Linear(24, 24, dtype=dtype)
        self.norm = nn.RMSNorm(24, eps=eps, elementwise_affine=affine, dtype=weight_dtype or dtype)
        if affine:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
        self.register_buffer("probe", torch.randn(24))

    def forward(self, x):
        return (self.norm(self.lin(x)).float() * self.probe).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_pytorch_rms_norm_op_is_rewritten_and_equivalent(dtype, affine, eps):
    torch.manual_seed(0)
    model = LibraryNorm(dtype, affine, eps).to(DEVICE)
    x = torch.randn(3, 5, 24, dtype=dtype, device=DEVICE)
    report = _optimise_and_run(model, x)
    assert report.counts() == {"rms_norm": 1}, report
    assert report.rewrites[0].module_path == "norm"
    fused = [n for g in model._fastft_state.graphs.values()
             for n in g.gm.graph.nodes if n.target is torch.ops.fastft.rms_norm.default]
    # eps None is PyTorch's default, float32's machine epsilon, whatever the input's dtype
    assert fused[0].args[2] == pytest.approx(eps if eps is not None else torch.finfo(torch.float32).eps)
    result = fastft.check(model, (x,))
    assert result.ok, result


def test_pytorch_rms_norm_op_with_a_weight_of_another_dtype_is_a_near_miss():
    torch.manual_seed(0)
    model = LibraryNorm(torch.bfloat16, weight_dtype=torch.float32).to(DEVICE)
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16, device=DEVICE)
    report = _optimise_and_run(model, x)
    assert report.counts() == {}
    assert any("unfused path" in m.reason for m in report.near_misses), report.near_misses


class ResidualBlocks(nn.Module):
    """Pre-norm residual blocks, x = x + linear(norm(x)), and a norm of the last sum: each norm
    but the first reads a residual add, and each sum but the last has two gradients."""

    def __init__(self, width: int = 48, blocks: int = 3, broadcast_bias: bool = False) -> None:
        super().__init__()
        self.norms = nn.ModuleList(CastBeforeWeight(width) for _ in range(blocks))
        self.linears = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.final = CastBeforeWeight(width)
        # x + bias broadcasts a [width] vector: not an add the joined kernel can read.
        self.bias = nn.Parameter(torch.randn(width)) if broadcast_bias else None

    def forward(self, x):
        for norm, linear in zip(self.norms, self.linears):
            x = x + linear(norm(x))
        if self.bias is not None:
            x = x + self.bias
        return self.final(x).float().square().mean()


def _compiled_afresh():
    """Compile without Inductor's caches (config.patch: pytest's monkeypatch, undone, deletes
    the config entry)."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch._inductor.config.patch(fx_graph_cache=False))
    stack.enter_context(torch._functorch.config.patch(enable_autograd_cache=False))
    return stack


def _train_once(dtype, join: bool, norms_trained: bool, **kwargs):
    import dataclasses

    from fastft.patterns import RMS_NORM

    torch.manual_seed(0)
    model = ResidualBlocks(**kwargs).to(device=DEVICE, dtype=dtype)
    for norm in [*model.norms, model.final]:
        norm.weight.requires_grad_(norms_trained)
    pattern = RMS_NORM if join else dataclasses.replace(RMS_NORM, lowered_join=None)
    fastft.optimize(model, lower="inductor", patterns=[pattern])
    torch.manual_seed(1)
    x = torch.randn(4, 8, 48, device=DEVICE, dtype=dtype, requires_grad=True)
    loss = model(x)
    loss.backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    return loss, grads, fastft.report(model)


@pytest.mark.parametrize("dtype,norms_trained", [(torch.bfloat16, False), (torch.float32, True)], ids=str)
def test_lowered_residual_adds_join_the_norms_bit_for_bit(dtype, norms_trained):
    """Under Inductor, each residual add a norm reads joins it (fastft::add_rms_norm), and each
    sum of a residual stream's two gradients joins the norm's backward; the loss and every
    gradient stay bit-equal to the same lowering without the joins."""
    with _compiled_afresh():
        loss, grads, report = _train_once(dtype, True, norms_trained)
        loss_apart, grads_apart, report_apart = _train_once(dtype, False, norms_trained)
    assert report.counts() == report_apart.counts() == {"rms_norm": 4}
    # 3 norms read a sum (not the first); 3 sums have two gradients (the input and the first two sums).
    assert report.lowered_joins == {"residual add + rms_norm": 3, "rms_norm backward + gradient add": 3}
    assert report_apart.lowered_joins == {}
    assert "residual add + rms_norm: 3" in str(report)
    assert torch.equal(loss, loss_apart)
    for g, g_apart in zip(grads, grads_apart):
        assert (g is None) == (g_apart is None)
        assert g is None or torch.equal(g, g_apart)


def test_a_broadcasting_add_is_not_joined():
    with _compiled_afresh():
        loss, grads, report = _train_once(torch.float32, True, True, broadcast_bias=True)
        loss_apart, grads_apart, _ = _train_once(torch.float32, False, True, broadcast_bias=True)
    # The last norm reads x + bias: no join there, and the bias add's gradient is no residual sum.
    assert report.lowered_joins == {"residual add + rms_norm": 2, "rms_norm backward + gradient add": 3}
    assert torch.equal(loss, loss_apart)
    # Not bit for bit: the bias's gradient is a sum over rows that Inductor generates next to a
    # joined add, and may order differently once the add is gone (seen on an H200, not on a CPU).
    for g, g_apart in zip(grads, grads_apart):
        torch.testing.assert_close(g, g_apart, rtol=1e-5, atol=1e-6)


def test_joins_hold_for_dynamic_shapes():
    """A second sequence length recompiles with symbolic sizes: the joins still apply there
    (sizes known equal without a guard), and the loss stays the unoptimised model's."""
    torch.manual_seed(0)
    model = ResidualBlocks().to(DEVICE)
    fastft.optimize(model, lower="inductor")
    from fastft.optimize import state_of

    state = state_of(model)
    with _compiled_afresh():
        for seq in (8, 12, 16):
            x = torch.randn(4, seq, 48, device=DEVICE, requires_grad=True)
            loss = model(x)
            loss.backward()
            with state.original():
                torch.testing.assert_close(loss, model(x), rtol=1e-5, atol=1e-6)
            assert fastft.report(model).lowered_joins == {"residual add + rms_norm": 3,
                                                          "rms_norm backward + gradient add": 3}, seq
    assert fastft.report(model).graphs_captured == 2  # 8, then one symbolic graph for 12 and 16


def test_a_configured_post_grad_pass_still_runs_before_the_joins():
    """fastft's joins take Inductor's post-grad hook; a pass the user had set there runs first."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    seen = []

    class CountAdds(CustomGraphPass):
        def __call__(self, graph):
            seen.append(sum(n.target is torch.ops.aten.add.Tensor for n in graph.nodes))

        def uuid(self):
            return "count-adds"

    torch.manual_seed(0)
    model = ResidualBlocks().to(DEVICE)
    fastft.optimize(model, lower="inductor")
    with _compiled_afresh(), torch._inductor.config.patch(post_grad_custom_post_pass=CountAdds()):
        model(torch.randn(4, 8, 48, device=DEVICE, requires_grad=True)).backward()
    assert len(seen) == 2 and all(count >= 3 for count in seen), seen  # forward and backward, adds unjoined
    assert fastft.report(model).lowered_joins == {"residual add + rms_norm": 3, "rms_norm backward + gradient add": 3}


class CheckpointedResidualBlocks(ResidualBlocks):
    """The same blocks, each under non-reentrant activation checkpointing: the backward graph
    recomputes the forward's adds and norms, and the joins apply there too."""

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for norm, linear in zip(self.norms, self.linears):
            x = checkpoint(lambda h, norm=norm, linear=linear: h + linear(norm(h)), x, use_reentrant=False)
        return self.final(x).float().square().mean()


def test_joins_inside_checkpointed_blocks():
    torch.manual_seed(0)
    models = {join: CheckpointedResidualBlocks().to(DEVICE) for join in (True, False)}
    models[False].load_state_dict(models[True].state_dict())
    import dataclasses

    from fastft.patterns import RMS_NORM

    results = {}
    with _compiled_afresh():
        for join, model in models.items():
            pattern = RMS_NORM if join else dataclasses.replace(RMS_NORM, lowered_join=None)
            fastft.optimize(model, lower="inductor", patterns=[pattern])
            x = torch.randn(4, 8, 48, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()
            loss = model(x)
            loss.backward()
            results[join] = (loss, [x.grad] + [p.grad for p in model.parameters()], fastft.report(model))
    (loss, grads, report), (loss_apart, grads_apart, _) = results[True], results[False]
    assert report.counts() == {"rms_norm": 4}
    # Counted over the forward's and the backward's compiles (the backward recomputes the blocks).
    joins = report.lowered_joins
    assert joins.get("residual add + rms_norm", 0) >= 3 and joins.get("rms_norm backward + gradient add", 0) >= 3, joins
    torch.testing.assert_close(loss, loss_apart, rtol=0, atol=0)
    for g, g_apart in zip(grads, grads_apart):
        torch.testing.assert_close(g, g_apart, rtol=1e-5, atol=1e-6)
