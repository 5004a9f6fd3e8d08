"""``optimize(model)``: install the capture backend on the model, in place."""
from __future__ import annotations

import contextlib
import dataclasses
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

from fastft.passes.capture import CapturedGraph, make_backend, redundant_requires_grad_dropped
from fastft.passes.pattern import Pattern
from fastft.patterns import DEFAULT_PATTERNS

from .errors import CaptureError
from .logging_methods import logging_methods
from .parameter_adapters import make_parameter_adapters_capturable
from .report import CaptureFailure, NearMiss, Report, RewriteRecord

_STATE_ATTR = "_fastft_state"


@dataclass
class Options:
    lower: str = "auto"  # "auto" (Inductor on CUDA, eager on CPU), "eager" or "inductor"
    fullgraph: bool = False  # raise CaptureError on a graph break instead of reporting it
    dynamic: bool | None = None  # torch.compile's: None = dynamic shapes after the first recompile
    patterns: list[Pattern] = field(default_factory=lambda: list(DEFAULT_PATTERNS))
    keep_logits: bool = False  # a fused loss still lets the graph return its logits in training
    cuda_graphs: bool = False  # replay Inductor's lowered graphs as CUDA graphs (one recording per shape)

    def active_patterns(self) -> list[Pattern]:
        if not self.keep_logits:
            return list(self.patterns)
        return [dataclasses.replace(p, release=None) if p.release else p for p in self.patterns]


class EntryPoint:
    """One module whose calls are captured: the model itself, and its backbone (which TRL calls
    directly). A call that arrives while an outer entry point is being traced is inlined into
    the outer graph instead of breaking it."""

    def __init__(self, module: nn.Module, path: str, state: "FastftState") -> None:
        self.module, self.path, self.state = module, path, state
        self.name = path or "<model>"
        self.failed: str | None = None
        self.captures = 0
        backend = make_backend(state.options.active_patterns(), state.options.lower, self._on_capture,
                               state.options.cuda_graphs)
        self.compiled = torch.compile(_entry_function(module), backend=backend,
                                      fullgraph=state.options.fullgraph, dynamic=state.options.dynamic)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() or self.state.bypass or self.failed is not None:
            return self.module._call_impl(*args, **kwargs)
        from torch._dynamo.utils import counters

        before = dict(counters["graph_break"])
        try:
            with torch._dynamo.config.patch(ignore_logging_functions=logging_methods(),
                                            **_CAPTURE_CONFIG), redundant_requires_grad_dropped():
                out = self.compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as error:
            if self.state.options.fullgraph:
                raise CaptureError(f"fastft could not capture {type(self.module).__name__} "
                                   f"(entry '{self.name}') in one graph: {_first_line(error)}") from error
            # Run unoptimised (a user error shows up again here, and propagates); report why.
            out = self.module._call_impl(*args, **kwargs)
            cause = getattr(error, "inner_exception", None) or error  # the backend's own error
            self._fail(f"{type(cause).__name__}: {_first_line(cause)}")
            return out
        if self.captures == 0:
            self._fail("Dynamo ran the call without capturing a graph (its recompile limit was reached, "
                       "or it skipped the frame)")
        for reason, count in counters["graph_break"].items():
            if count > before.get(reason, 0):
                self.state.report.record_graph_break(self.name, _break_reason(reason), count - before.get(reason, 0))
        return out

    def _fail(self, reason: str) -> None:
        self.failed = reason
        self.state.report.capture_failures.append(CaptureFailure(self.name, reason))
        warnings.warn(f"fastft: capture of '{self.name}' failed, it runs unoptimised: {reason}")

    def _on_capture(self, captured: CapturedGraph) -> None:
        self.captures += 1
        prefix = f"{self.path}." if self.path else ""
        key = f"{self.name}#{captured.key}"
        records = [RewriteRecord(a.pattern.name, a.pattern.family,
                                 prefix + a.module_path if a.module_path else self.path,
                                 a.kernel, self.name)
                   for a in captured.result.applied]
        misses = [NearMiss(f"{prefix}{m.module_path}:{m.node}".lstrip(":"), m.pattern, m.reason)
                  for m in captured.result.near_misses]
        self.state.report.record_graph(key, records, misses, captured.lowered_joins)
        self.state.graphs[key] = captured
        captured.module_prefix = prefix
        captured.observer = self.state.observer


class FastftState:
    """Everything fastft keeps on an optimised model (as the attribute ``_fastft_state``)."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.report = Report()
        self.entry_points: list[EntryPoint] = []
        self.graphs: dict[str, CapturedGraph] = {}
        self.bypass = False  # True: every entry point runs the original, unrewritten code
        self.observer = None

    @contextlib.contextmanager
    def original(self) -> Iterator[None]:
        """Run the model as it was before ``optimize``."""
        previous, self.bypass = self.bypass, True
        try:
            yield
        finally:
            self.bypass = previous

    @contextlib.contextmanager
    def observing(self, observer) -> Iterator[None]:
        """Let ``observer(captured_graph, inputs)`` see every captured graph's calls."""
        self.observer = observer
        for g in self.graphs.values():
            g.observer = observer
        try:
            yield
        finally:
            self.observer = None
            for g in self.graphs.values():
                g.observer = None


def optimize(model: nn.Module, **options: Any) -> nn.Module:
    """Make ``model`` train faster, in place; returns the same object.

    Options: ``lower`` ("auto" | "eager" | "inductor"), ``fullgraph`` (bool), ``dynamic``
    (bool | None), ``patterns`` (list of patterns; default: every registered family),
    ``keep_logits`` (bool, default False: in a training step whose loss is fused, the logits
    output is an empty tensor instead of [batch, seq, vocab] values; True computes them too),
    ``cuda_graphs`` (bool, default False: on a GPU, replay each lowered graph as a CUDA graph,
    which removes the host time of its launches; one recording per input shape, so it suits
    fixed-length batches; a tensor a step returns is only valid until the next step runs).
    Calling it again on an optimised model changes nothing and returns it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastft.optimize expects a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _STATE_ATTR, None) is not None:
        return model
    unknown = set(options) - set(Options.__dataclass_fields__)
    if unknown:
        raise TypeError(f"fastft.optimize got unknown option(s) {sorted(unknown)}; "
                        f"known: {sorted(Options.__dataclass_fields__)}")
    _check_parameter_dtypes(model)
    state = FastftState(Options(**options))
    make_parameter_adapters_capturable(model)
    for path, module in _entry_modules(model):
        entry = EntryPoint(module, path, state)
        module._compiled_call_impl = entry
        state.entry_points.append(entry)
    object.__setattr__(model, _STATE_ATTR, state)
    return model


def state_of(model: nn.Module) -> FastftState | None:
    return getattr(model, _STATE_ATTR, None)


def report(model: nn.Module) -> Report:
    """The Report of an optimised model: filled as its graphs are captured (on the first calls)."""
    state = state_of(model)
    if state is None:
        raise ValueError(f"{type(model).__name__} was not optimised: call fastft.optimize(model) first")
    return state.report


_SUPPORTED_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_parameter_dtypes(model: nn.Module) -> None:
    """Trainable parameters in a dtype no kernel supports are an error, not a silent slow path."""
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype not in _SUPPORTED_FLOAT_DTYPES:
            raise TypeError(f"fastft.optimize: trainable parameter '{name}' is {p.dtype}; fastft trains "
                            f"float32, bfloat16 and float16 parameters (cast the model first)")


def _entry_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model and, when it has one, the backbone that trainers may call directly."""
    entries = [("", model)]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrappers
    backbone = getattr(inner, "base_model", None)
    if isinstance(backbone, nn.Module) and backbone is not inner and backbone is not model:
        paths = {id(m): n for n, m in model.named_modules()}
        entries.append((paths.get(id(backbone), "base_model"), backbone))
    return entries


# Dynamo's settings while fastft captures. Ops whose output shape or value depends on the data (a
# mixture of experts' routing: nonzero, index_select by a routing mask, .item()) are captured with
# unbacked sizes instead of breaking the graph around every expert. A gradient-checkpointed layer
# may have Python side effects (a dict of keys and values that later layers share, an attribute it
# sets): they are kept, and happen once, in the forward, where eager checkpointing repeats them while
# the backward recomputes the layer. Without that Dynamo does not trace such a layer ("HOP: Unsafe
# side effect") and it runs unoptimised.
_CAPTURE_CONFIG: dict[str, bool] = dict(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)
if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):  # not in every torch
    _CAPTURE_CONFIG["skip_fwd_side_effects_in_bwd_under_checkpoint"] = True


def _entry_function(module: nn.Module):
    """A function calling ``module`` with a code object of its own.

    Dynamo caches compiled frames per code object, and every module's ``_call_impl`` shares one:
    compiling it directly would let a few optimised models exhaust the recompile limit of all.
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        return module._call_impl(*args, **kwargs)

    fn = types.FunctionType(call.__code__.replace(co_name=f"fastft_entry_{id(module):x}"), call.__globals__,
                            call.__name__, call.__defaults__, call.__closure__)
    return fn


# What fastft adds to Dynamo's own words for breaks it cannot remove (keyed by their first line).
_BREAK_NOTES = {
    "requires_grad_() intermediate leaked as output":
        "a requires_grad_() inside the forward (e.g. an input-embedding hook for gradient "
        "checkpointing) is what makes an output require grad: nothing trainable reaches that output, "
        "or the marked tensor is returned; fastft drops such a mark only where it changes no gradient",
    "Unsupported Tensor.requires_grad_() call":
        "requires_grad_() on a tensor the graph received as an input (often the resumption of the "
        "break above): a graph cannot change an input's requires_grad",
}


def _break_reason(reason: str) -> str:
    first = _first_line(reason)
    note = _BREAK_NOTES.get(first)
    return f"{first} ({note})" if note else first


def _first_line(error: Any) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
