"""The training loss of a language model head, from its math:

    z = linear(h, W, b?)                      the output projection (tied or not: W is an input)
    z = z * scale   or   z = z / divisor      optional logit scaling (scale: a constant, or a
                                              frozen per-vocabulary [V] tensor)
    z = tanh(z / c) * c                       optional logit softcapping
    z = z.float()                             optional upcast (before or after the two above)
    loss = cross_entropy(z.view(-1, V), y, ignore_index, reduction mean|sum)

``fastft::linear_cross_entropy`` computes it chunk by chunk, so the [tokens, vocabulary] logits
never exist. The label shift stays outside (it only moves labels); so does a division by the
number of items in the batch (after a sum reduction it is the same division either way).

The logits often also leave the graph as an output. In a training step (the loss needs a
gradient) that output is replaced by an empty tensor, so the logits need not be computed at all:
that is the memory this rewrite exists for. ``optimize(model, keep_logits=True)`` keeps them.
A graph captured without gradients (evaluation, generation) keeps its logits in any case.
"""
from __future__ import annotations

import math

import torch

from fastft.kernels.linear_cross_entropy import column_scale_fits, linear_cross_entropy_reference
from fastft.passes.canonical import canonical, dtype_of, same_size, tensor_meta
from fastft.passes.matcher import Cast, Lit, Match, Op, Var
from fastft.passes.pattern import Pattern, Replacement

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _scaled_and_capped(z):
    # A scale held in a tensor: one per vocabulary entry (a learned one), or a single number.
    scaled = (z | Op("mul", z, Lit("logit_scale"), commutative=True, name="scaled")
              | Op("div", z, Lit("logit_divisor"), name="divided")
              | Op("mul", z, Var("scale_tensor"), commutative=True, name="scaled"))
    capped = Op("mul", Op("tanh", Op("div", scaled, Lit("softcap"))), Lit("softcap_again"),
                commutative=True, name="capped")
    return scaled | capped


def _flattened(z):
    rows = Op("flatten", z, start=0, end=lambda end, c: end == c.attrs["ndim"] - 2, name="flat")
    return rows | z


def _loss_expr():
    logits = Op("linear", Var("hidden"), Var("weight"), Var("bias") | None, name="logits")
    z = Cast(_scaled_and_capped(Cast(logits, "inner_cast")), "upcast")
    return Op("cross_entropy", _flattened(z), Var("labels"), name="loss")


def _check_loss(m: Match) -> str | None:
    b = m.bindings
    hidden, weight, labels = tensor_meta(b["hidden"]), tensor_meta(b["weight"]), tensor_meta(b["labels"])
    attrs = canonical(b["loss"]).attrs
    if attrs["reduction"] not in ("mean", "sum"):
        return f"reduction {attrs['reduction']!r}: the fused loss returns a mean or a sum"
    if attrs["class_weight"] is not None or attrs["label_smoothing"] != 0.0:
        return "class weights or label smoothing are not supported by the fused loss"
    if not isinstance(attrs["ignore_index"], int):
        return f"ignore_index {attrs['ignore_index']!r} is not an integer"
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} has no fused kernel (supported: float32, bfloat16, float16)"
    if "bias" in b and tensor_meta(b["bias"]).dtype != weight.dtype or hidden.dtype != weight.dtype:
        return "hidden states, weight and bias differ in dtype (mixed precision): the fused loss needs one"
    if weight.dim() != 2 or not same_size(weight.shape[1], hidden.shape[-1]):
        return f"weight of shape {tuple(weight.shape)} does not project hidden states of width {hidden.shape[-1]}"
    if labels.dtype != torch.int64 or labels.dim() != 1:
        return f"labels must be a 1-D int64 tensor of class indices, found {labels.dtype} {tuple(labels.shape)}"
    rows = math.prod(hidden.shape[:-1])  # symbolic sizes multiply without a guard; numel() would add one
    if not same_size(labels.shape[0], rows):
        return f"{labels.shape[0]} labels for {rows} rows of hidden states (shifted logits?)"
    if dtype_of(b["flat"] if "flat" in b else b["loss"].args[0]) != torch.float32:
        return "the cross-entropy runs on 16-bit logits; the fused kernel computes it in float32"
    if b.get("softcap") is not None and b["softcap"] != b.get("softcap_again"):
        return f"the softcap divides by {b['softcap']} but multiplies by {b.get('softcap_again')}"
    if "scale_tensor" in b:
        reason = _scale_tensor_problem(tensor_meta(b["scale_tensor"]), weight.shape[0])
        if reason is not None:
            return reason
    for name in ("softcap", "logit_scale", "logit_divisor"):
        if name in b and not isinstance(b[name], (int, float)):
            return f"{name} {b[name]!r} is not a number"
    if b.get("logit_divisor") == 0:
        return "the logits are divided by 0"
    return None


def _scale_tensor_problem(scale: torch.Tensor, vocabulary: int) -> str | None:
    shape = tuple(scale.shape)
    if scale.requires_grad:
        return (f"the logits are multiplied by a trainable tensor of shape {shape}; the fused loss "
                f"gives a logit scale no gradient")
    if not column_scale_fits(scale, vocabulary):
        return (f"the logits are multiplied by a tensor of shape {shape}; the fused loss takes one scale "
                f"per vocabulary entry ({vocabulary}) or a single one")
    return None


def _logit_scale(b: dict) -> float:
    """The factor the kernel multiplies the logits by: a division is a multiplication by the
    reciprocal (in fp32, within an ulp of the division)."""
    if "logit_divisor" in b:
        return 1.0 / float(b["logit_divisor"])
    return float(b.get("logit_scale", 1.0))


def _replace_loss(m: Match) -> Replacement:
    b = m.bindings
    attrs = canonical(b["loss"]).attrs
    softcap = float(b["softcap"]) if "softcap" in b else None
    return Replacement(torch.ops.fastft.linear_cross_entropy.default, (
        b["hidden"], b["weight"], b.get("bias"), b["labels"], attrs["ignore_index"], softcap,
        _logit_scale(b), attrs["reduction"], None, b.get("scale_tensor")))


def _logits_to_release(m: Match) -> list:
    """In a training step, the logits the graph also returns (raw, scaled or capped) need not be
    computed."""
    if not tensor_meta(m.root).requires_grad:
        return []
    return [n for n in m.nodes if n is not m.root and n is not m.bindings.get("flat")]


LINEAR_CROSS_ENTROPY = Pattern(
    name="linear_cross_entropy",
    family="linear_cross_entropy",
    expr=_loss_expr(),
    check=_check_loss,
    replace=_replace_loss,
    anchors=frozenset({"cross_entropy"}),
    reference=linear_cross_entropy_reference,
    kernel="fastft::linear_cross_entropy",
    release=_logits_to_release,
)
