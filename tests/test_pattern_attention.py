"""The causal-mask rewrite: masks built in the graph that are proved causal (or all true) become
SDPA's is_causal (or no mask); any other mask is left alone with the reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastft
from fastft.optimize import state_of
from fastft.tiny import random_batch

from helpers import DEVICE, tiny


class MaskedAttention(nn.Module):
    """q, k, v projections and SDPA with a mask that ``make_mask(tokens, x)`` builds."""

    def __init__(self, make_mask, dim=16, heads=2):
        super().__init__()
        self.make_mask, self.heads = make_mask, heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x, pad=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        mask = self.make_mask(t, x) if pad is None else self.make_mask(t, x, pad)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum()


def _positions_causal(t, x):
    pos = torch.arange(t, device=x.device)
    return (pos[None, :] <= pos[:, None])[None, None]


def _positions_causal_ge(t, x):
    q = torch.arange(t, device=x.device)[:, None]
    kv = torch.arange(t, device=x.device)[None, :]
    return torch.ge(q, kv).expand(x.shape[0], 1, t, t)


def _tril(t, x):
    return torch.ones(t, t, dtype=torch.bool, device=x.device).tril()


def _all_true(t, x):
    return torch.ones(t, t, dtype=torch.bool, device=x.device)


def _sliding_window(t, x):
    pos = torch.arange(t, device=x.device)
    return ((pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - 3))[None, None]


def _shifted(t, x):  # queries after a cache of 2 tokens: not SDPA's top-left causal
    q = torch.arange(t, device=x.device) + 2
    kv = torch.arange(t, device=x.device)
    return (kv[None, :] <= q[:, None])[None, None]


def _padded(t, x, pad):
    pos = torch.arange(t, device=x.device)
    return (pos[None, :] <= pos[:, None])[None, None] & pad[:, None, None, :]


def _attention_calls(module):
    (graph,) = state_of(module).graphs.values()
    return graph, [n for n in graph.gm.graph.nodes if n.op == "call_function" and "attention" in n.target.__name__]


def _run(module, x, **kw):
    reference = module(x, **kw)
    fastft.optimize(module)
    out = module(x, **kw)
    return reference, out, fastft.report(module)


@pytest.mark.parametrize("make_mask,kind", [
    (_positions_causal, "causal"), (_positions_causal_ge, "causal"), (_tril, "causal"), (_all_true, "none")])
def test_provable_masks_are_rewritten(make_mask, kind):
    torch.manual_seed(0)
    module = MaskedAttention(make_mask).to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    reference, out, report = _run(module, x)
    assert report.counts() == {"attention": 1}, str(report)
    (record,) = report.rewrites
    assert record.kernel == "sdpa(is_causal)"
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    graph, (call,) = _attention_calls(module)
    assert call.target.__name__ == ("causal_attention" if kind == "causal" else "unmasked_attention")
    # The mask itself is no longer computed: no boolean tensor is left in the graph.
    assert not [n for n in graph.gm.graph.nodes
                if getattr(n.meta.get("example_value"), "dtype", None) == torch.bool], graph.gm.graph
    result = fastft.check(module, (x,), loss_fn=lambda y: y)
    assert result.ok and result.regions_checked == 1, str(result)


@pytest.mark.parametrize("make_mask,reason", [
    (_sliding_window, "sliding window"), (_shifted, "different offsets")])
def test_other_masks_are_left_alone_with_the_reason(make_mask, reason):
    module = MaskedAttention(make_mask).to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    reference, out, report = _run(module, x)
    assert report.counts() == {}
    (miss,) = report.near_misses
    assert miss.pattern == "causal_mask" and reason in miss.reason, miss
    torch.testing.assert_close(out, reference)


def test_a_padding_mask_from_the_input_is_left_alone():
    module = MaskedAttention(_padded).to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    pad = torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
    pad[1, 5:] = False
    reference, out, report = _run(module, x, pad=pad)
    assert report.counts() == {}
    (miss,) = report.near_misses
    assert "reads a graph input" in miss.reason, miss
    torch.testing.assert_close(out, reference)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_model_mask_rewritten_at_two_lengths(model_type):
    """Without a KV cache (use_cache=False, as under gradient checkpointing) a captured model
    builds its mask from positions; after a second length (a dynamic-shape recompile, sizes now
    symbolic) it is still proved causal, and the model checks equal."""
    model = tiny(model_type)
    layers = model.config.num_hidden_layers
    fastft.optimize(model)
    for seq in (9, 13):
        batch = {**random_batch(model, batch=2, seq=seq), "use_cache": False}
        result = fastft.check(model, batch)
        assert result.ok, str(result)
        assert fastft.report(model).counts().get("attention") == layers, str(fastft.report(model))


def test_padding_attention_mask_passed_to_a_model_is_reported():
    model = tiny("llama")
    fastft.optimize(model)
    batch = {**random_batch(model, batch=2, seq=9), "use_cache": False}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][0, :3] = 0
    _assert_every_mask_left_with(model, batch, "graph input")


def test_sliding_window_model_reports_its_masks():
    model = tiny("mistral", sliding_window=4)
    fastft.optimize(model)
    _assert_every_mask_left_with(model, {**random_batch(model, batch=2, seq=9), "use_cache": False}, "sliding window")


def _assert_every_mask_left_with(model, batch, reason: str) -> None:
    """The model checks equal, no attention is rewritten, and every layer's mask is a near miss
    whose reason says ``reason``."""
    result = fastft.check(model, batch)
    assert result.ok, str(result)
    report = fastft.report(model)
    assert "attention" not in report.counts()
    misses = [m for m in report.near_misses if m.pattern == "causal_mask"]
    assert len(misses) == model.config.num_hidden_layers and all(reason in m.reason for m in misses), misses


def test_mask_passed_into_checkpointed_layers_is_followed_outside():
    """Under gradient checkpointing the mask is built once and passed into each checkpointed
    layer; the analysis follows it into the enclosing graph."""
    model = tiny("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    fastft.optimize(model)
    result = fastft.check(model, {**random_batch(model, batch=2, seq=9), "use_cache": False})
    assert result.ok, str(result)
    report = fastft.report(model)
    assert report.counts().get("attention") == model.config.num_hidden_layers, str(report)
    assert not report.graph_breaks and not report.near_misses, str(report)


def _packed_positions(t, x):
    """transformers' packed-sequence test: positions that restart mark a new sequence."""
    pos = torch.arange(t, device=x.device)[None, :]
    segment = torch.cumsum(torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1, -1)
    same = segment[:, None, :] == segment[:, :, None]
    return ((pos[:, None, :] <= pos[:, :, None]) & same)[:, None]


def _wrong_prepend(t, x):
    """The same, but with the whole position row prepended: the first real difference is not 1,
    so the segments are not provably one."""
    pos = torch.arange(t, device=x.device)[None, :]
    segment = torch.cumsum(torch.diff(pos, prepend=pos - 1, dim=-1) != 1, -1)[:, t - 1:]
    same = segment[:, None, :] == segment[:, :, None]
    return ((pos[:, None, :] <= pos[:, :, None]) & same)[:, None]


def test_packed_sequence_test_of_plain_positions_is_proved_true():
    module = MaskedAttention(_packed_positions).to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    reference, out, report = _run(module, x)
    assert report.counts() == {"attention": 1}, str(report)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_a_prepend_of_several_values_is_not_proved():
    module = MaskedAttention(_wrong_prepend).to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    reference, out, report = _run(module, x)
    assert report.counts() == {}, str(report)
    (miss,) = report.near_misses
    assert miss.pattern == "causal_mask", miss
    torch.testing.assert_close(out, reference)


def _dunder_packed_positions(t, x):  # the packed-sequence test spelt with dunder methods
    pos = torch.arange(t, device=x.device)[None].expand(x.shape[0], t)
    segment = torch.cumsum(torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1).__ne__(1), -1)
    same = segment[:, None, :].__eq__(segment[:, :, None])
    return pos[:, None, :].__le__(pos[:, :, None]).__and__(same)[:, None]


def test_masks_spelt_with_dunder_methods_are_proved():
    module = MaskedAttention(_dunder_packed_positions).to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    reference, out, report = _run(module, x)
    assert report.counts() == {"attention": 1}, str(report)
    (graph,) = state_of(module).graphs.values()
    assert not [n for n in graph.gm.graph.nodes if n.op == "call_method" and n.target.startswith("__")]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


class GroupedAttention(nn.Module):
    """4 query heads over 2 key/value heads, causal mask built in the graph; ``spelling`` says
    how k and v get one head per query head."""

    def __init__(self, spelling, dim=16, heads=4, kv_heads=2):
        super().__init__()
        self.spelling, self.heads, self.kv_heads, self.head_dim = spelling, heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        # An output projection as models have: Inductor (torch 2.11) cannot lower the GPU's
        # attention backward when SDPA's output is summed directly (its gradient, an expanded
        # scalar, trips the layout constraint), with or without fastft.
        self.o = nn.Linear(dim, dim)

    def _repeat(self, x):
        b, h, t, d = x.shape
        n = self.heads // h
        if self.spelling == "index":  # each head n times in a row: what SDPA's enable_gqa means
            return x[:, :, None, :, :].expand(b, h, n, t, d).reshape(b, h * n, t, d)
        if self.spelling == "unsqueeze":
            return x.unsqueeze(2).expand(b, h, n, t, d).reshape(b, h * n, t, d)
        if self.spelling == "tile_expand":  # the heads tiled (head i reads i % h): not grouped-query
            return x[:, None].expand(b, n, h, t, d).reshape(b, n * h, t, d)
        return x.repeat(1, n, 1, 1)  # tiled too

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, self._repeat(k), self._repeat(v), attn_mask=_tril(t, x))
        return self.o(out.transpose(1, 2).reshape(b, t, -1)).sum()


@pytest.mark.parametrize("spelling,grouped", [
    ("index", True), ("unsqueeze", True), ("tile_expand", False), ("repeat", False)])
def test_repeated_key_value_heads_become_enable_gqa(spelling, grouped):
    torch.manual_seed(0)
    module = GroupedAttention(spelling).to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    reference, out, report = _run(module, x)
    assert report.counts() == {"attention": 1}, str(report)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    graph, (call,) = _attention_calls(module)
    q, k, v, _scale, enable_gqa = call.args[:5]
    heads = lambda node: node.meta["example_value"].shape[1]  # noqa: E731
    assert (heads(k), heads(v), enable_gqa) == ((2, 2, True) if grouped else (4, 4, False))
    expands = [n for n in graph.gm.graph.nodes if n.op == "call_method" and n.target == "expand"]
    assert not expands if grouped else expands or spelling == "repeat"
    result = fastft.check(module, (x,), loss_fn=lambda y: y)
    assert result.ok and result.regions_checked == 1, str(result)


def test_grouped_query_model_takes_unrepeated_keys_and_values():
    """Also at a second length, where the recompiled graph's sizes are symbolic."""
    model = tiny("llama")  # 4 query heads, 2 key/value heads
    fastft.optimize(model)
    kv_heads = model.config.num_key_value_heads
    for seq in (9, 13):
        batch = {**random_batch(model, batch=2, seq=seq), "use_cache": False}
        result = fastft.check(model, batch)
        assert result.ok, str(result)
        _graph, calls = _attention_calls(model)
        assert len(calls) == model.config.num_hidden_layers
        assert all(c.args[1].meta["example_value"].shape[1] == kv_heads and c.args[4] is True for c in calls)
    assert not isinstance(calls[0].args[1].meta["example_value"].shape[2], int)  # the symbolic graph


def test_the_check_hands_each_region_its_gradient_in_the_outputs_layout(monkeypatch):
    """SDPA's output takes the query's layout, here [B, S, H, D] transposed; a model's backward
    hands the gradient over in that layout too. On a GPU (torch 2.11, cuDNN 9.19, H200) cuDNN's
    attention backward caches plans without the gradient's strides: the first layout used at a
    shape is replayed for any other and gives wrong gradients (rel_l2 1.1-1.5, measured). A check
    that sent contiguous gradients failed the regions of models that train correctly, and could
    spoil the process's later backward passes at those shapes."""
    torch.manual_seed(0)
    module = GroupedAttention("index").to(DEVICE)
    x = torch.randn(2, 7, 16, device=DEVICE)
    fastft.optimize(module)
    module(x)
    seen = []
    grad = torch.autograd.grad

    def spy(outputs, inputs, grad_outputs=None, **kwargs):
        if grad_outputs is not None:
            seen.extend((o.stride(), g.stride()) for o, g in zip(outputs, grad_outputs))
        return grad(outputs, inputs, grad_outputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    result = fastft.check(module, (x,), loss_fn=lambda y: y)
    assert result.ok and result.regions_checked == 1, str(result)
    assert seen and all(o == g for o, g in seen), seen
    if DEVICE == "cpu":  # the CPU's kernels give both the original's and the fused op's output q's layout
        transposed = (7 * 16, 4, 16, 1)  # [2, 7, 4, 4] seen as [2, 4, 7, 4]
        assert [o for o, _ in seen].count(transposed) == 2, seen
