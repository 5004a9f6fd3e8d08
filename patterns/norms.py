"""Normalisation patterns: RMSNorm and LayerNorm, from their math.

RMSNorm:

    y = x_f * rsqrt(mean(x_f ** 2, -1, keepdim) + eps)     x_f = x, upcast or not
    y = y.to(norm_dtype)                                     optional: round before the weight
    y = y * (w + offset)                                     optional weight, offset 0 or 1
    y = y.to(out_dtype)                                      optional final cast

or PyTorch's op, ``F.rms_norm`` / ``nn.RMSNorm`` (fp32 inside, the weight applied in fp32, one
rounding; eps by default the float32 epsilon).

Spellings the canonical view folds together (pow vs x*x, .float() vs .to()) need no variant
here; the inverse square root is any of rsqrt(d), pow(d, -0.5), 1/sqrt(d), x/sqrt(d) (sqrt also
as pow(d, 0.5)), and the mean may be written as sum(x_f ** 2, -1, keepdim) / N (or * 1/N). The
variants that change the numbers (where the casts are, ``1 + w``) are bindings of the one
expression, and the kernel takes them as arguments.

An L2 normalisation, x_f * rsqrt(sum(x_f ** 2) + eps) (the q and k of linear-attention layers),
is the same expression with the sum of the squares in place of their mean: the op takes that as
its ``sum_of_squares`` argument.

LayerNorm, either the library op or written out:

    y = layer_norm(x_f, weight?, bias?, eps)                        fp32 inside, one rounding
    y = (x_f - mean(x_f)) * rsqrt(var(x_f) + eps)                   var biased: mean of squares
    y = y.to(norm_dtype) * w + b                                    optional cast, weight, bias
    y = y.to(out_dtype)                                              optional final cast
"""
from __future__ import annotations

import math

import torch

from fastft.kernels.layer_norm import layer_norm_reference
from fastft.kernels.rms_norm import SUPPORTED_DTYPES, rms_norm_reference
from fastft.passes.canonical import canonical, dtype_of, same_size, tensor_meta
from fastft.passes.matcher import Cast, Lit, Match, Op, Var
from fastft.passes.pattern import Pattern, Replacement
from fastft.patterns.norm_add import join_norm_adds


def _last_dim_only(dims, canon) -> bool:
    return dims == (canon.attrs["ndim"] - 1,)


def _one_dim(shape, canon) -> bool:
    return len(shape) == 1


def _rms_norm_expr():
    x = Var("x")
    xf = Cast(x, "upcast")
    squares = Op("pow", xf, 2) | Op("mul", xf, xf)
    # The mean may be written as the sum over the row divided by its width (or times 1/width);
    # the bare sum is an L2 normalisation.
    total = Op("sum", squares, dims=_last_dim_only, keepdim=True, name="sum_sq")
    mean_sq = (Op("mean", squares, dims=_last_dim_only, keepdim=True, name="mean_sq")
               | Op("div", total, Lit("width"), name="mean_sq")
               | Op("mul", total, Lit("inv_width"), commutative=True, name="mean_sq")
               | total)
    denom = Op("add", mean_sq, Lit("eps"), commutative=True)
    sqrt = Op("sqrt", denom) | Op("pow", denom, 0.5)
    inv_rms = (Op("rsqrt", denom) | Op("pow", denom, -0.5) | Op("reciprocal", sqrt)
               | Op("div", 1, sqrt))
    normed = Op("mul", xf, inv_rms, commutative=True, name="normed") | Op(
        "div", xf, sqrt, name="normed")
    weight = Cast(Var("weight"), "weight_cast")
    scale = weight | Op("add", weight, Lit("offset"), commutative=True)
    weighted = Op("mul", Cast(normed, "norm_cast"), scale, commutative=True, name="weighted")
    # PyTorch's own op (nn.RMSNorm): fp32 inside, the weight applied before the one rounding.
    library = Op("rms_norm", xf, weight | None, Lit("eps"), shape=_one_dim, name="library")
    return Cast(weighted, "out_cast") | Cast(normed, "out_cast") | Cast(library, "out_cast")


# A model may cast a norm's result to any dtype (one casts it to a 4-bit weight's uint8): the
# kernels write float32, bfloat16 and float16 only, and any other cast stays as the model has it.
_OUT_CAST_UNSUPPORTED = "the result is cast to {}, which the fused kernel does not write"


def _check_rms_norm(m: Match) -> str | None:
    b = m.bindings
    x = tensor_meta(b["x"])
    if "width" in b or "inv_width" in b:
        reason = _check_width(b, x.shape[-1])
        if reason is not None:
            return reason
    if x.dtype not in SUPPORTED_DTYPES:
        return f"input dtype {x.dtype} has no fused kernel (supported: float32, bfloat16, float16)"
    if b["out_cast"] not in (None, *SUPPORTED_DTYPES):
        return _OUT_CAST_UNSUPPORTED.format(b["out_cast"])
    for name in ("sum_sq", "mean_sq"):
        if name in b and dtype_of(b[name]) != torch.float32:
            what = "sum" if name == "sum_sq" else "mean"
            return (f"the {what} of squares is computed in {dtype_of(b[name])}; the fused kernel "
                    f"accumulates in float32 and would not reproduce it")
    eps = b["eps"]
    if not isinstance(eps, (int, float)) or eps < 0:
        return f"eps {eps!r} is not a non-negative number"
    if "weight" in b:
        w = tensor_meta(b["weight"])
        if w.dim() != 1 or w.shape[0] != x.shape[-1]:
            return f"weight of shape {tuple(w.shape)} is not a vector over the last dim ({x.shape[-1]})"
        if w.dtype not in SUPPORTED_DTYPES:
            return f"weight dtype {w.dtype} has no fused kernel"
        if b["weight_cast"] not in (None, torch.float32):
            return f"the weight is rounded to {b['weight_cast']} before the multiply"
        if not isinstance(b.get("offset", 0), (int, float)):
            return f"weight offset {b['offset']!r} is not a number"
        if b["out_cast"] is not None and "weighted" in b and dtype_of(b["weighted"]) != torch.float32:
            return "the product is rounded twice (to its own dtype, then cast)"
    if "library" in b:
        reason = _check_library_rms_norm(b)
        if reason is not None:
            return reason
    if tensor_meta(m.root).shape != x.shape:
        return f"output shape {tuple(tensor_meta(m.root).shape)} differs from the input's {tuple(x.shape)}"
    return None


def _check_library_rms_norm(b: dict) -> str | None:
    """PyTorch's ``rms_norm`` applies the weight in float32 and rounds once only when the weight's
    dtype is the input's; otherwise it takes another path, which the kernel does not reproduce."""
    library = b["library"]
    input_dtype = dtype_of(canonical(library).args[0])
    if "weight" in b and dtype_of(b["weight"]) != input_dtype:
        return (f"torch.rms_norm's weight is {dtype_of(b['weight'])} and its input {input_dtype}: "
                f"PyTorch then takes its unfused path")
    if b["out_cast"] is not None and dtype_of(library) != torch.float32:
        return "the result is rounded twice (to its own dtype, then cast)"
    return None


def _check_width(b, n) -> str | None:
    """A sum of squares divided by ``width`` (or times ``inv_width``) is the mean only when the
    divisor is the row's width."""
    if "width" in b:
        width = b["width"]
        how = f"divided by {width!r}"
    else:
        inv = b["inv_width"]
        width = round(1 / inv) if isinstance(inv, (int, float)) and inv > 0 else None
        if width and math.isclose(inv * width, 1.0, rel_tol=1e-6):
            how = f"multiplied by 1/{width}"
        else:
            width, how = None, f"multiplied by {inv!r}"
    if not (isinstance(width, (int, float)) and same_size(width, n)):
        return (f"the sum of squares is {how}, but a mean over the row divides by its width ({n}): "
                f"not a mean")
    return None


def _is_rms_anchor(node) -> bool:
    """``pow(., -0.5)`` spells an inverse square root; any other power (the square) is no sign."""
    canon = canonical(node)
    if canon is None or canon.op != "pow":
        return True
    exponent = canon.args[1] if len(canon.args) == 2 else None
    return isinstance(exponent, (int, float)) and exponent == -0.5


def _replace_rms_norm(m: Match) -> Replacement:
    b = m.bindings
    norm_dtype = b.get("norm_cast")
    if norm_dtype == torch.float32:
        norm_dtype = None  # rounding an fp32 value to fp32 is the identity
    return Replacement(
        torch.ops.fastft.rms_norm.default,
        (b["x"], b.get("weight"), float(b["eps"]), float(b.get("offset", 0.0)), norm_dtype,
         dtype_of(m.root), "sum_sq" in b and "mean_sq" not in b),  # no mean: the sum of the squares (L2)
    )


RMS_NORM = Pattern(
    name="rms_norm",
    family="rms_norm",
    expr=_rms_norm_expr(),
    check=_check_rms_norm,
    replace=_replace_rms_norm,
    anchors=frozenset({"rsqrt", "pow", "rms_norm"}),
    reference=rms_norm_reference,
    kernel="fastft::rms_norm",
    anchor_filter=_is_rms_anchor,
    # The normed output feeds linears that keep it for their backward, beside the norm's own
    # input: recomputing it there (one cheap kernel) keeps one tensor per norm instead of two.
    recompute=True,
    lowered_join=join_norm_adds,
)


def _layer_norm_expr():
    x = Var("x")
    xf = Cast(x, "upcast")
    weight = Cast(Var("weight"), "weight_cast")
    bias = Cast(Var("bias"), "bias_cast")
    library = Op("layer_norm", xf, weight | None, bias | None, Lit("eps"), shape=_one_dim, name="library")

    mean = Op("mean", xf, dims=_last_dim_only, keepdim=True, name="mean")
    centered = Op("sub", xf, mean, name="centered")
    # The variance may centre x again (a second subtraction) or reuse the first.
    again = Op("sub", xf, mean, name="centered_again")
    variance = Op("mean", Op("pow", again, 2) | Op("mul", again, again), dims=_last_dim_only,
                  keepdim=True) | Op("var", xf, dims=_last_dim_only, keepdim=True, correction=0)
    denom = Op("add", variance, Lit("eps"), commutative=True)
    normed = Op("mul", centered, Op("rsqrt", denom), commutative=True, name="normed") | Op(
        "div", centered, Op("sqrt", denom), name="normed")
    weighted = Op("mul", Cast(normed, "norm_cast"), weight, commutative=True, name="weighted")
    shifted = Op("add", weighted | Cast(normed, "norm_cast"), bias, commutative=True, name="shifted")
    return Cast(library | shifted | weighted | normed, "out_cast")


def _check_layer_norm(m: Match) -> str | None:
    b = m.bindings
    x = tensor_meta(b["x"])
    if x.dtype not in SUPPORTED_DTYPES:
        return f"input dtype {x.dtype} has no fused kernel (supported: float32, bfloat16, float16)"
    if b["out_cast"] not in (None, *SUPPORTED_DTYPES):
        return _OUT_CAST_UNSUPPORTED.format(b["out_cast"])
    if b["upcast"] not in (None, torch.float32):
        return f"the input is cast to {b['upcast']} first; the fused kernel reads it as it is"
    if "mean" in b and dtype_of(b["mean"]) != torch.float32:
        return (f"the mean is computed in {dtype_of(b['mean'])}; the fused kernel accumulates in "
                f"float32 and would not reproduce it")
    eps = b["eps"]
    if not isinstance(eps, (int, float)) or eps < 0:
        return f"eps {eps!r} is not a non-negative number"
    for name in ("weight", "bias"):
        if name in b:
            t = tensor_meta(b[name])
            if t.dim() != 1 or t.shape[0] != x.shape[-1]:
                return f"{name} of shape {tuple(t.shape)} is not a vector over the last dim ({x.shape[-1]})"
            if t.dtype not in SUPPORTED_DTYPES:
                return f"{name} dtype {t.dtype} has no fused kernel"
            if b[f"{name}_cast"] not in (None, torch.float32):
                return f"the {name} is rounded to {b[f'{name}_cast']} before it is applied"
    # The kernel rounds once at the end (and optionally at norm_dtype): any other rounding on the
    # way would be lost.
    last = next(b[n] for n in ("library", "shifted", "weighted", "normed") if n in b)
    if "shifted" in b and "weighted" in b and dtype_of(b["weighted"]) != torch.float32:
        return f"the product is rounded to {dtype_of(b['weighted'])} before the bias is added"
    if dtype_of(last) != torch.float32 and b["out_cast"] not in (None, dtype_of(last)):
        return f"the result is rounded to {dtype_of(last)}, then cast to {b['out_cast']}"
    if tensor_meta(m.root).shape != x.shape:
        return f"output shape {tuple(tensor_meta(m.root).shape)} differs from the input's {tuple(x.shape)}"
    return None


def _replace_layer_norm(m: Match) -> Replacement:
    b = m.bindings
    norm_dtype = b.get("norm_cast")
    if norm_dtype == torch.float32:
        norm_dtype = None
    return Replacement(
        torch.ops.fastft.layer_norm.default,
        (b["x"], b.get("weight"), b.get("bias"), float(b["eps"]), norm_dtype, dtype_of(m.root)),
    )


LAYER_NORM = Pattern(
    name="layer_norm",
    family="layer_norm",
    expr=_layer_norm_expr(),
    check=_check_layer_norm,
    replace=_replace_layer_norm,
    anchors=frozenset({"layer_norm", "var"}),
    reference=layer_norm_reference,
    kernel="fastft::layer_norm",
    recompute=True,  # as for RMSNorm
)
