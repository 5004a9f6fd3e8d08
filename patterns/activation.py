"""The activation of an ungated MLP (up-linear -> activation -> down-linear), from its math:

    h = act(x)                    act: SiLU (x * sigmoid(x)), GELU erf, GELU tanh
    h = h.to(out_dtype)           optional final cast

with the same spellings and constraints as the gated unit's activation (``patterns/glu.py``):
the library function, or written out, which is accepted only in float32 (in a 16-bit dtype every
written-out step rounds, which the fp32 kernel does not reproduce).

An activation whose output is multiplied by something is a gated unit and belongs to the GLU
pattern, which runs first; here it neither matches nor counts as a near miss, so that every
activation is the concern of exactly one of the two families. The linears stay with cuBLAS.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fastft.kernels.activation import activation_reference
from fastft.passes.canonical import dtype_of
from fastft.passes.matcher import Cast, Match, Var
from fastft.passes.pattern import Pattern, Replacement

from .glu import (activation_expr, activation_kind, activation_problem, activation_rounding, gates_something,
                  operand_problem, recast_problem)


def _not_gating(node: fx.Node) -> bool:
    # Part of the match, not of the check: a gated activation is no near miss of this family.
    return not gates_something(node)


def _activation_expr():
    act = activation_expr(Cast(Var("x"), "x_cast"), where=_not_gating)
    return Cast(act, "out_cast")


def _check_activation(m: Match) -> str | None:
    b = m.bindings
    _, act_key = activation_kind(b)
    return (operand_problem("x", b["x"], b["x_cast"]) or activation_problem(b)
            or recast_problem("activation", b[act_key], b["out_cast"]))


def _replace_activation(m: Match) -> Replacement:
    b = m.bindings
    kind, round_dtype = activation_rounding(b)
    return Replacement(torch.ops.fastft.activation.default, (b["x"], kind, round_dtype, dtype_of(m.root)))


ACTIVATION = Pattern(
    name="activation",
    family="mlp_act",
    expr=_activation_expr(),
    check=_check_activation,
    replace=_replace_activation,
    # Written-out forms have no op of their own to anchor on: one that matched whole and was
    # rejected is a near miss by the matcher's own account (as in the GLU pattern).
    anchors=frozenset({"silu", "gelu"}),
    anchor_filter=_not_gating,
    reference=activation_reference,
    kernel="fastft::activation",
)
