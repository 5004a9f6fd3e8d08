"""The torch.compile backend: every graph Dynamo captures goes through the pass pipeline.

    normalise (lazily, canonical view) -> match + rewrite -> clean up -> lower -> CapturedGraph

Lowering hands the rewritten graph to Inductor (the fused ops are opaque custom ops to it, so it
generates code only for the glue between them) or runs it as it is ("eager", the CPU default:
Inductor's generated C++ buys nothing in tests and costs compile time).

``redundant_requires_grad_dropped()`` (passes/requires_grad.py) is the context the entry points
trace in: it keeps a forward in one graph across a ``requires_grad_()`` that changes no gradient.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

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
                 key: str) -> None:
        self.gm = gm
        self.lowered = lowered
        self.result = result
        self.key = key
        self.module_prefix = ""  # where the captured module sits in the model, for naming regions
        self.observer: GraphObserver | None = None

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


def make_backend(patterns: list[Pattern], lower: str, on_capture: Callable[[CapturedGraph], None],
                 cuda_graphs: bool = False) -> Callable[[fx.GraphModule, list], Any]:
    """A torch.compile backend that rewrites with ``patterns`` and reports each graph to ``on_capture``.
    ``cuda_graphs``: Inductor records each lowered CUDA graph (forward and backward) once per shape
    and replays it, so the many small launches of a step cost no host time."""
    if lower not in ("auto", "eager", "inductor"):
        raise ValueError(f"lower must be 'auto', 'eager' or 'inductor', not {lower!r}")
    if cuda_graphs and lower == "eager":
        raise ValueError("cuda_graphs needs Inductor's lowering: use lower='auto' or 'inductor', not 'eager'")

    def backend(gm: fx.GraphModule, example_inputs: list) -> CapturedGraph:
        key = graph_key(gm)
        check_dropped_marks(gm)
        result = rewrite_graph_module(gm, patterns)
        how = resolve_lowering(lower, example_inputs)
        if how == "inductor":
            from torch._inductor.compile_fx import compile_fx

            lowered = compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": cuda_graphs})
        else:
            lowered = gm.forward
        captured = CapturedGraph(gm, lowered, result, key)
        on_capture(captured)
        return captured

    return backend
