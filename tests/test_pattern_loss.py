"""The fused loss pattern on hand-written heads: the plain and the shifted-label forms, scaling,
softcapping, sum/mean, frozen or tied projections, when the logits are kept, and near misses."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastft

from helpers import DEVICE

V, H = 100, 24  # a vocabulary that is not a power of two


class Head(nn.Module):
    """Embedding -> linear -> head -> cross-entropy, returning (loss, logits) like a LM."""

    def __init__(self, dtype=torch.float32, bias=False, scale=None, softcap=None, reduction="mean",
                 shift=True, upcast=True, tied=False, smoothing=0.0, divisor=None):
        super().__init__()
        self.embed = nn.Embedding(V, H, dtype=dtype)
        self.body = nn.Linear(H, H, dtype=dtype)
        self.head = nn.Linear(H, V, bias=bias, dtype=dtype)
        if tied:
            self.head.weight = self.embed.weight
        self.scale, self.softcap, self.reduction = scale, softcap, reduction
        self.shift, self.upcast, self.smoothing = shift, upcast, smoothing
        self.divisor = divisor

    def forward(self, ids, labels, num_items=None):
        logits = self.head(torch.tanh(self.body(self.embed(ids))))
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        z = logits.float() if self.upcast else logits
        if self.shift:  # as transformers does: pad the labels, shift them left
            labels = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
        loss = F.cross_entropy(z.view(-1, V), labels.view(-1), ignore_index=-100,
                               reduction=self.reduction, label_smoothing=self.smoothing)
        if num_items is not None:
            loss = loss / num_items
        return loss, logits


def _batch(seed=0, ignored=(0, 3)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, ignored[0]:ignored[1]] = -100  # a prompt that is not trained on
    return ids.to(DEVICE), labels.to(DEVICE)


def _run(model, *args, **options):
    fastft.optimize(model, **options)
    loss, logits = model(*args)
    loss.backward()
    return fastft.report(model), logits


def _check(model, args, loss_ok=True):
    result = fastft.check(model, args, loss_fn=lambda out: out[0])
    assert result.ok, result
    return result


VARIANTS = {
    "shifted_mean": dict(),
    "plain": dict(shift=False),
    "bias_scale": dict(bias=True, scale=0.5),
    "divided": dict(divisor=8.0),
    "softcap": dict(softcap=3.0),
    "sum": dict(reduction="sum"),
    "tied": dict(tied=True),
    # frozen tensors: one scale per vocabulary entry (a learned one, in a LoRA run), and one number
    "vector_scale": dict(scale=torch.linspace(0.5, 1.5, V, device=DEVICE)),
    "tensor_scale": dict(scale=torch.tensor(0.75, device=DEVICE), bias=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_variants_are_fused_and_logits_released(variant, dtype):
    torch.manual_seed(0)
    model = Head(dtype=dtype, **VARIANTS[variant]).to(DEVICE)
    args = _batch()
    report, logits = _run(model, *args)
    assert report.counts() == {"linear_cross_entropy": 1}, report
    assert report.near_misses == [], report
    assert logits.numel() == 0  # a training step: the [tokens, vocab] logits never existed
    result = _check(model, args)
    assert result.regions_checked == 1


def test_num_items_division_stays_outside_and_matches():
    torch.manual_seed(0)
    model = Head(reduction="sum").to(DEVICE)
    ids, labels = _batch()
    num_items = torch.tensor(11.0, device=DEVICE)
    report, _ = _run(model, ids, labels, num_items)
    assert report.counts() == {"linear_cross_entropy": 1}
    _check(model, (ids, labels, num_items))


def test_keep_logits_and_no_grad_keep_them():
    torch.manual_seed(0)
    model = Head().to(DEVICE)
    args = _batch()
    report, logits = _run(model, *args, keep_logits=True)
    assert report.counts() == {"linear_cross_entropy": 1}
    assert logits.shape == (2, 9, V)
    reference = Head().to(DEVICE)
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits, reference(*args)[1])

    plain = Head().to(DEVICE)
    fastft.optimize(plain)
    with torch.no_grad():  # evaluation: the caller may want the logits, so they are computed
        assert plain(*args)[1].shape == (2, 9, V)


def test_frozen_projection_gets_no_gradient():
    torch.manual_seed(0)
    model = Head().to(DEVICE)
    model.head.weight.requires_grad_(False)
    args = _batch()
    _run(model, *args)
    assert model.head.weight.grad is None and model.body.weight.grad is not None
    _check(model, args)


def test_every_label_ignored_gives_nan_like_torch():
    torch.manual_seed(0)
    model = Head(shift=False).to(DEVICE)
    ids, labels = _batch(ignored=(0, 9))
    fastft.optimize(model)
    loss, _ = model(ids, labels)
    assert torch.isnan(loss)  # mean over zero items, as F.cross_entropy gives


@pytest.mark.parametrize("options, reason", [
    (dict(smoothing=0.1), "label smoothing"),
    (dict(upcast=False, dtype=torch.bfloat16), "16-bit logits"),
    (dict(scale=nn.Parameter(torch.linspace(0.5, 1.5, V))), f"multiplied by a trainable tensor of shape ({V},)"),
    (dict(scale=torch.ones(9, 1, device=DEVICE)), "multiplied by a tensor of shape (9, 1)"),  # one per position
])
def test_near_misses_are_left_alone_with_the_reason(options, reason):
    torch.manual_seed(0)
    model = Head(**options).to(DEVICE)
    args = _batch()
    report, logits = _run(model, *args)
    assert "linear_cross_entropy" not in report.counts(), report
    (miss,) = [m for m in report.near_misses if m.pattern == "linear_cross_entropy"]
    assert reason in miss.reason, report
    assert logits.shape == (2, 9, V)
    _check(model, args)
