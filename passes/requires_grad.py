"""``requires_grad_()`` on an intermediate, inside a captured forward.

Fine-tuning recipes for gradient checkpointing register a forward hook on the input embeddings
that calls ``output.requires_grad_(True)``: with reentrant checkpointing, a checkpointed block
whose inputs need no grad would pass no gradient to the adapters inside it. Dynamo cannot keep such
a mark in a graph: AOTAutograd would drop it from the outputs. Torch 2.13's Dynamo traces the call
and, when the marked tensor (or anything computed from it: the loss) is a graph output, throws the
graph away and breaks there ("requires_grad_() intermediate leaked as output"); older Dynamos
break at the call itself. The break lands inside the forward's context managers, where Dynamo
cannot resume, so whole frames fall back to eager and the model splits into several graphs.

Inside a captured graph the mark is redundant when every graph output it reaches requires grad
anyway, through some other tensor (a trainable parameter, an input that requires grad): the marked
tensor is a leaf (it had no grad before, so nothing flows through it into earlier tensors), so
dropping the mark leaves every output's value, every output's requires_grad and the gradient of
every other leaf as they were; Dynamo captures checkpointed blocks as differentiable regions
whatever their inputs need. What it loses is the ``.grad`` of a tensor that no caller can reach
(it is not an output) and the backward work to compute it.

- With Dynamo's leak check (torch 2.13): the marks are dropped from the graph just before the
  check when all of them are redundant; otherwise the check breaks the graph, as without fastft.
- Without it (older torch): the call is skipped while tracing and its tensor's node is flagged;
  the backend then verifies that no graph output that does not require grad depends on a flagged
  node (such an output would have required grad through the mark). If one does, the capture
  fails with that reason, and the model runs unoptimised, as for any failed capture.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
import torch.fx as fx

# node.meta key of a tensor whose requires_grad_(True) was skipped while tracing (older Dynamo).
DROPPED_MARK = "fastft_dropped_requires_grad"


class RequiresGradMarkNeeded(RuntimeError):
    """A graph output would require grad only through a skipped ``requires_grad_()`` mark."""


class _Scope(threading.local):
    active = False
    skip_marks = False  # skip the calls while tracing (a Dynamo without the leak check)


_scope = _Scope()


@contextlib.contextmanager
def redundant_requires_grad_dropped() -> Iterator[None]:
    """Graphs Dynamo captures in this thread, inside this context, drop redundant ``requires_grad_()``
    marks of intermediates (see above) instead of breaking there."""
    skip = not has_leak_check()
    if skip:
        _install_skip_while_tracing()
    else:
        _install_leak_check()
    previous = _scope.active, _scope.skip_marks
    _scope.active, _scope.skip_marks = True, skip
    try:
        yield
    finally:
        _scope.active, _scope.skip_marks = previous


def has_leak_check() -> bool:
    """Whether this torch's Dynamo traces ``requires_grad_()`` and checks for leaks (torch 2.13)."""
    from torch._dynamo import output_graph

    return hasattr(output_graph.OutputGraph, "_check_requires_grad_intermediate_outputs")


def _install_skip_while_tracing() -> None:
    from torch._dynamo.variables.tensor import TensorVariable

    original = TensorVariable.method_requires_grad_
    if getattr(original, "_fastft_wrapped", False):
        return

    def method_requires_grad_(self, tx, requires_grad=True):
        if _scope.active and _scope.skip_marks and not self.source:  # an intermediate, not a graph input
            want = requires_grad if isinstance(requires_grad, bool) else requires_grad.as_python_constant()
            node = self.as_proxy().node
            value = node.meta.get("example_value")
            if want is True and isinstance(value, torch.Tensor) and not value.requires_grad:
                node.meta[DROPPED_MARK] = True  # verified against the outputs by check_dropped_marks
                return self
        return original(self, tx, requires_grad)

    method_requires_grad_._fastft_wrapped = True  # type: ignore[attr-defined]
    method_requires_grad_.__wrapped__ = original  # type: ignore[attr-defined]
    TensorVariable.method_requires_grad_ = method_requires_grad_


def check_dropped_marks(gm: fx.GraphModule) -> None:
    """Raise RequiresGradMarkNeeded when an output of ``gm`` that does not require grad depends on
    a tensor whose ``requires_grad_(True)`` was skipped while tracing: with the mark it would have
    required grad. Every other output is unchanged by the skip (see the module docstring)."""
    marked = [n for n in gm.graph.nodes if n.meta.get(DROPPED_MARK)]
    if not marked:
        return
    reached: set[fx.Node] = set()
    stack = list(marked)
    while stack:
        node = stack.pop()
        if node not in reached:
            reached.add(node)
            stack.extend(node.users)
    for out in gm.graph.output_node().all_input_nodes:
        value = out.meta.get("example_value")
        if out in reached and isinstance(value, torch.Tensor) and not value.requires_grad:
            raise RequiresGradMarkNeeded(
                f"graph output '{out.name}' requires grad only through requires_grad_() on "
                f"'{marked[0].name}', which this torch's Dynamo cannot keep in a graph")


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
