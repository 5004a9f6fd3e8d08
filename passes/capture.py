"""The torch.compile backend: every graph Dynamo captures goes through the pass pipeline.

    autocast made explicit -> normalise (lazily, canonical view) -> match + rewrite -> clean up
    -> lower -> CapturedGraph

Lowering hands the rewritten graph to Inductor (the fused ops are opaque custom ops to it, so it
generates code only for the glue between them) or runs it as it is ("eager", the CPU default:
Inductor's generated C++ buys nothing in tests and costs compile time). Under Inductor, patterns
may also join their op with the glue beside it once autograd has split forward from backward
(``Pattern.lowered_join``, run by ``lowered_joins_pass``).

``redundant_requires_grad_dropped()`` (passes/requires_grad.py) is the context the entry points
trace in: it keeps a forward in one graph across a ``requires_grad_()`` that changes no gradient.
"""
from __future__ import annotations

import functools
import inspect
from collections import Counter
from typing import Any, Callable

import torch
import torch.fx as fx

from .autocast import autocast_made_explicit
from .pattern import Pattern
from .requires_grad import check_dropped_marks, redundant_requires_grad_dropped
from .rewrite import RewriteResult, rewrite_graph_module

__all__ = ["CapturedGraph", "make_backend", "redundant_requires_grad_dropped"]

GraphObserver = Callable[["CapturedGraph", tuple], None]


class CapturedGraph:
    """What the backend returns to Dynamo: the lowered graph, plus what the checker needs.

    ``observer`` (set by the checker, None otherwise) sees the real inputs of every call, so that
    each rewritten region can be re-run on the activations it saw.
    """

    def __init__(self, gm: fx.GraphModule, lowered: Callable[..., Any], result: RewriteResult,
                 key: str, lowered_joins: Counter | None = None) -> None:
        self.gm = gm
        self.lowered = lowered
        self.result = result
        self.key = key
        self.module_prefix = ""  # where the captured module sits in the model, for naming regions
        self.observer: GraphObserver | None = None
        # Joins made in the lowered graphs by kind (``Pattern.lowered_join``), counted as Inductor
        # compiles them: the forward's with the capture, the backward's at the first backward.
        self.lowered_joins: Counter = lowered_joins if lowered_joins is not None else Counter()

    def __call__(self, *args: Any) -> Any:
        if self.observer is not None:
            self.observer(self, args)
        return self.lowered(*args)


def graph_key(gm: fx.GraphModule) -> str:
    """Identifies a captured graph across recompiles: its non-symbolic inputs, by source name."""
    names = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            names.append(node.target)
    return ",".join(names)


def resolve_lowering(lower: str, example_inputs: list) -> str:
    if lower != "auto":
        return lower
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    return "inductor" if on_cuda else "eager"


def lowered_joins_pass(joins: list[Callable[[fx.Graph], Counter]], counts: Counter) -> Any:
    """The pass Inductor runs on each graph it lowers, after its own (``post_grad_custom_post_pass``):
    the patterns' joins, counted into ``counts``, after the pass the user had configured there, if
    any. A graph Inductor serves from its cache was joined when it was compiled, but is not
    counted again."""
    from torch._inductor import config

    return _lowered_joins_class()(joins, counts, config.post_grad_custom_post_pass)


@functools.cache
def _lowered_joins_class() -> type:
    # Inductor's pass interface is imported here, on first use: importing it would add most of a
    # second to ``import fastft``.
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class LoweredJoins(CustomGraphPass):
        def __init__(self, joins: list[Callable[[fx.Graph], Counter]], counts: Counter,
                     previous: Callable[[fx.Graph], None] | None) -> None:
            self.joins, self.counts, self.previous = joins, counts, previous

        def __call__(self, graph: fx.Graph) -> None:
            if self.previous is not None:
                self.previous(graph)
            for join in self.joins:
                self.counts.update(join(graph))

        def uuid(self) -> Any:
            # Inductor's caches key on this: a change to the joins' code compiles afresh. A
            # configured pass without a uuid makes Inductor skip its caches, as it would alone.
            ours = get_hash_for_files(tuple(sorted({inspect.getsourcefile(j) for j in self.joins})))
            if self.previous is None:
                return ours
            theirs = self.previous.uuid() if isinstance(self.previous, CustomGraphPass) else None
            return None if theirs is None else (theirs, ours)

    return LoweredJoins


@functools.cache
def register_inductor_fallbacks(namespace: str = "fastft") -> int:
    """Register Inductor's fallback lowering for every op of ``namespace`` up front, as Inductor
    would on first meeting each one; returns how many it registered.

    Why not leave it to Inductor: torch 2.11 formats the arguments of that first meeting for a
    log line whether or not the line is shown, and an argument whose history is all opaque ops
    (a residual stream from one fused op to the next) prints that history through every path:
    exponential in the layers, the compile never ends."""
    from torch._inductor.lowering import (get_layout_constraint_tag, lowerings, make_fallback,
                                          tag_to_layout_constraint)

    registered = 0
    for name in torch._C._dispatch_get_all_op_names():
        space, _, short = name.partition("::")
        if space != namespace:
            continue
        packet = getattr(getattr(torch.ops, namespace), short)
        for overload in packet.overloads():
            op = getattr(packet, overload)
            # An op that decomposes above autograd (CompositeImplicitAutograd) never reaches Inductor.
            if op not in lowerings and not torch._C._dispatch_has_kernel_for_dispatch_key(
                    op.name(), "CompositeImplicitAutograd"):
                # The constraint Inductor picks for a custom op it meets (torch/_inductor/graph.py).
                tag = get_layout_constraint_tag(op, with_default=True)
                make_fallback(op, layout_constraint=tag_to_layout_constraint(tag))
                registered += 1
    return registered


def make_backend(patterns: list[Pattern], lower: str, on_capture: Callable[[CapturedGraph], None],
                 cuda_graphs: bool = False) -> Callable[[fx.GraphModule, list], Any]:
    """A torch.compile backend that rewrites with ``patterns`` and reports each graph to ``on_capture``.
    ``cuda_graphs``: Inductor records each lowered CUDA graph (forward and backward) once per shape
    and replays it, so the many small launches of a step cost no host time."""
    if lower not in ("auto", "eager", "inductor"):
        raise ValueError(f"lower must be 'auto', 'eager' or 'inductor', not {lower!r}")
    if cuda_graphs and lower == "eager":
        raise ValueError("cuda_graphs needs Inductor's lowering: use lower='auto' or 'inductor', not 'eager'")
    lowered_joins = [p.lowered_join for p in patterns if p.lowered_join is not None]

    def backend(gm: fx.GraphModule, example_inputs: list) -> CapturedGraph:
        key = graph_key(gm)
        check_dropped_marks(gm)
        autocast_made_explicit(gm)
        result = rewrite_graph_module(gm, patterns)
        how = resolve_lowering(lower, example_inputs)
        joins: Counter = Counter()
        if how == "inductor":
            from torch._inductor.compile_fx import compile_fx

            register_inductor_fallbacks()
            patches: dict[str, Any] = {"triton.cudagraphs": cuda_graphs}
            if lowered_joins:
                patches["post_grad_custom_post_pass"] = lowered_joins_pass(lowered_joins, joins)
            lowered = compile_fx(gm, example_inputs, config_patches=patches)
        else:
            lowered = gm.forward
        captured = CapturedGraph(gm, lowered, result, key, joins)
        on_capture(captured)
        return captured

    return backend
