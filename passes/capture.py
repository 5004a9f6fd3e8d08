"""The torch.compile backend: every graph Dynamo captures goes through the pass pipeline.

    normalise (lazily, canonical view) -> match + rewrite -> clean up -> lower -> CapturedGraph

Lowering hands the rewritten graph to Inductor (the fused ops are opaque custom ops to it, so it
generates code only for the glue between them) or runs it as it is ("eager", the CPU default:
Inductor's generated C++ buys nothing in tests and costs compile time).

``redundant_requires_grad_dropped()`` is the context the entry points trace in: it keeps a forward
in one graph across a ``requires_grad_()`` that changes no gradient (see there).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx

from .pattern import Pattern
from .rewrite import RewriteResult, rewrite_graph_module

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


# --- requires_grad_() on an intermediate --------------------------------------------------------
#
# Fine-tuning recipes for gradient checkpointing register a forward hook on the input embeddings
# that calls ``output.requires_grad_(True)``: with reentrant checkpointing, a checkpointed block
# whose inputs need no grad would pass no gradient to the adapters inside it. Dynamo traces the call,
# but when the marked tensor (or anything computed from it: the loss) is a graph output, it throws the
# graph away and breaks there ("requires_grad_() intermediate leaked as output"), because
# AOTAutograd would drop the mark from the outputs. The break lands inside the forward's context
# managers, where Dynamo cannot resume, so whole frames fall back to eager and the model splits into
# several graphs.
#
# Inside a captured graph the mark is redundant when every graph output it reaches requires grad
# anyway, through some other tensor (a trainable parameter, an input that requires grad): the marked
# tensor is a leaf (it had no grad before, so nothing flows through it into earlier tensors), so
# dropping the mark leaves every output's value, every output's requires_grad and the gradient of
# every other leaf as they were; Dynamo captures checkpointed blocks as differentiable regions
# whatever their inputs need. What it loses is the ``.grad`` of a tensor that no caller can reach
# (it is not an output) and the backward work to compute it. Then the mark is dropped from the graph
# and Dynamo keeps the one graph. In every other case (an output that requires grad only through the
# mark, such as the marked embeddings returned among the hidden states) Dynamo's own check runs and
# breaks the graph as it would without fastft.

class _Scope(threading.local):
    active = False


_scope = _Scope()


@contextlib.contextmanager
def redundant_requires_grad_dropped() -> Iterator[None]:
    """Graphs Dynamo captures in this thread, inside this context, drop redundant ``requires_grad_()``
    marks of intermediates (see above) instead of breaking there. Torch versions without Dynamo's
    leak check are left as they are."""
    _install_leak_check()
    previous, _scope.active = _scope.active, True
    try:
        yield
    finally:
        _scope.active = previous


def _install_leak_check() -> None:
    from torch._dynamo import output_graph

    cls = output_graph.OutputGraph
    original = getattr(cls, "_check_requires_grad_intermediate_outputs", None)
    if original is None or getattr(original, "_fastft_wrapped", False):
        return

    def check(self, rv, tx):
        # The attribute it reads is Dynamo's too: where a torch lacks it, Dynamo's check runs alone.
        if _scope.active and hasattr(self, "leaf_var_creation_order"):
            drop_redundant_requires_grad(self, rv)
        return original(self, rv, tx)

    check._fastft_wrapped = True  # type: ignore[attr-defined]
    check.__wrapped__ = original  # type: ignore[attr-defined]
    cls._check_requires_grad_intermediate_outputs = check


def drop_redundant_requires_grad(output_graph: Any, rv: list) -> int:
    """Remove the ``requires_grad_()`` calls on intermediates from the graph Dynamo is about to
    compile when all of them are redundant for the outputs ``rv``; returns how many were removed
    (all or none). Removed marks no longer count for Dynamo's leak check, which then runs as usual
    for anything else."""
    from torch._dynamo.variables.tensor import TensorVariable

    calls: dict[fx.Node, list[fx.Node]] = {}
    for node in output_graph.graph.nodes:
        if node.op == "call_method" and node.target == "requires_grad_" and node.args:
            calls.setdefault(node.args[0], []).append(node)
    marked = [v for v in output_graph.leaf_var_creation_order
              if isinstance(v, TensorVariable) and not v.source and v.as_proxy().node in calls]
    if not marked:
        return 0
    marks = {id(v.as_proxy().node.meta.get("example_value")) for v in marked}
    for var in rv:
        if not isinstance(var, TensorVariable):
            continue
        value = var.as_proxy().node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and value.requires_grad and not _needs_grad_without(value, marks):
            return 0
    removed = 0
    for var in marked:
        for call in calls.pop(var.as_proxy().node, []):
            _erase_with_toggles(output_graph.graph, call)
            removed += 1
        output_graph.leaf_var_creation_order.remove(var)
    return removed


def _needs_grad_without(value: torch.Tensor, marks: set[int]) -> bool:
    """Whether ``value`` would require grad if the tensors ``marks`` (ids) did not: its autograd
    graph (Dynamo's fake tensors carry one) reaches a leaf that is not one of them. A node without
    edges that is not a leaf's accumulator counts for nothing, so an unknown case answers False."""
    if value.grad_fn is None:
        return id(value) not in marks
    seen: set = set()
    stack = [value.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        leaf = getattr(fn, "variable", None)
        if isinstance(leaf, torch.Tensor):
            if id(leaf) not in marks:
                return True
            continue
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return False


def _erase_with_toggles(graph: fx.Graph, call: fx.Node) -> None:
    """Erase a ``requires_grad_`` call and the functorch permission toggles Dynamo puts around it."""
    toggle = getattr(torch._C._functorch, "set_inplace_requires_grad_allowed", None)
    around = [n for n in (call.prev, call.next)
              if n.op == "call_function" and n.target is toggle and not n.users]
    for node in [call, *around]:
        if not node.users:
            graph.erase_node(node)
