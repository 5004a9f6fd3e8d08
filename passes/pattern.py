"""What a pattern is: its math as an expression, a constraint check, and the op that replaces it."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from .matcher import Expr, Match


@dataclass(frozen=True)
class Replacement:
    """A call to ``target(*args)`` that computes what the matched region computed."""

    target: Callable[..., Any]
    args: tuple[Any, ...]
    # For a grouped replacement: ``target`` returns a tuple whose output i replaces the i-th match.
    outputs: int | None = None


@dataclass(frozen=True)
class Pattern:
    """A declarative rewrite rule.

    ``expr`` is matched at every node; ``check`` returns None to accept a match or the reason it
    is rejected (which the Report shows as a near miss); ``replace`` builds the fused call.
    ``anchors`` are canonical ops whose presence means "this family is probably here": an
    anchor left outside every rewrite becomes a near miss. ``reference`` is the PyTorch math the
    pattern stands for, the oracle shared by kernel tests and the checker.
    """

    name: str
    family: str
    expr: Expr
    check: Callable[[Match], "str | None"]
    replace: Callable[[Match], Replacement]
    anchors: frozenset[str]
    reference: Callable[..., Any]
    kernel: str
    # Grouping: matches with equal ``group_key`` (e.g. q and k rotated by the same cos/sin) are
    # replaced ``group_size`` at a time by one call built by ``replace_group``; a match left
    # without a partner gets ``replace``'s call (for a grouped pattern, a group of one).
    group_key: Callable[[Match], Hashable] | None = None
    group_size: int = 1
    replace_group: Callable[[list[Match]], Replacement] | None = None
    # Nodes of a match that the fused op makes unnecessary although the graph also returns them
    # (the logits beside a fused loss): those outputs become empty tensors, and the nodes go.
    release: Callable[[Match], list] | None = None
    # Narrows ``anchors``: an anchor op this rejects is not a sign of the family (a plain
    # activation with no gate is not a gated unit that almost matched).
    anchor_filter: Callable[[Any], bool] | None = None
    # Nodes outside ``expr`` that the replacement makes unnecessary (a mask the new call no
    # longer reads), returned after ``check`` accepted the match: they join the region, so the
    # checker recomputes them, and go from the graph when nothing else reads them.
    absorb: Callable[[Match], list] | None = None
    # The fused op is cheap next to keeping its output for the backward (a norm, whose input is
    # kept anyway): AOT autograd's partitioner is asked to recompute it in the backward instead.
    recompute: bool = False
    # Joins with the glue beside the fused op, made in the graphs Inductor lowers (after autograd,
    # forward and backward): edits the graph in place and counts its joins by kind.
    lowered_join: Callable[[Any], "Counter[str]"] | None = None

    def is_anchor(self, node: Any) -> bool:
        return self.anchor_filter is None or self.anchor_filter(node)
