"""``check(model, inputs)``: prove the optimised model computes what the original computes.

Two levels: the whole model (loss, outputs, every trainable gradient, original against optimised
on the same inputs and random state) and each rewritten region alone (the original subgraph
against its fused op, forward and backward, on the activations that region really saw).
A region output outside the elementwise tolerance still passes where, element by element, it is
no further from a float64 run of the original region than the original's own output is: the
fused op may not lose accuracy, but it need not reproduce the original's rounding errors.
The whole model is judged at the least precise dtype it computes in (its parameters', its
inputs', or one it computes in: under autocast, or in the GEMMs over 4-bit weights). Where that
is a 16-bit dtype, a loss, output or gradient outside the tolerance still passes where it is no
further from a float32 run of the original model (16-bit tensors widened, autocast off) than the
original's own result is (the float32 run is made only then, and trusted only where the original
is close to it: see ``WITNESS_FACTOR``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from fastft.passes.canonical import canonical, tensor_meta
from fastft.passes.rewrite import REWRITE_META, AppliedRewrite

from .errors import CheckError
from .optimize import state_of
from .tolerances import TOLERANCES, WITNESS_FACTOR, tolerance_for


_SIXTEEN_BIT = (torch.bfloat16, torch.float16)  # the dtypes whose models a float32 run can witness


@dataclass
class Comparison:
    name: str
    dtype: str
    max_abs_error: float
    rel_l2_error: float
    ok: bool
    bound: str

    def __str__(self) -> str:
        verdict = "ok  " if self.ok else "FAIL"
        return (f"{verdict} {self.name} [{self.dtype}] max|Δ|={self.max_abs_error:.3g} "
                f"rel_l2={self.rel_l2_error:.3g} ({self.bound})")


@dataclass
class CheckResult:
    model: list[Comparison] = field(default_factory=list)  # loss, outputs, gradients
    regions: list[Comparison] = field(default_factory=list)  # one per rewritten region and tensor
    problems: list[str] = field(default_factory=list)  # what could not be compared, and why

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.model + self.regions)

    @property
    def errors(self) -> list[Comparison]:
        return [c for c in self.model + self.regions if not c.ok]

    @property
    def region_errors(self) -> list[Comparison]:
        return [c for c in self.regions if not c.ok]

    @property
    def regions_checked(self) -> int:
        return len({c.name.split(" ", 1)[0] for c in self.regions})

    def __str__(self) -> str:
        head = (f"fastft.check: {'PASS' if self.ok else 'FAIL'} ({len(self.model)} model comparisons, "
                f"{self.regions_checked} regions)")
        lines = [head] + [f"  {p}" for p in self.problems]
        shown = self.errors if not self.ok else self.model[:3]
        lines += [f"  {c}" for c in shown]
        return "\n".join(lines)


def check(model: nn.Module, inputs: dict | tuple, loss_fn: Callable[[Any], torch.Tensor] | None = None,
          seed: int = 0) -> CheckResult:
    """Run the original and the optimised model on ``inputs`` and compare everything.

    ``inputs``: keyword arguments (dict) or positional ones (tuple). The loss is ``loss_fn(output)``,
    else ``output.loss`` / ``output["loss"]`` / a scalar output. Parameter gradients are restored.
    """
    state = state_of(model)
    if state is None:
        raise CheckError(f"{type(model).__name__} was not optimised: call fastft.optimize(model) first")
    if not isinstance(inputs, (dict, tuple)):
        raise CheckError(f"inputs must be a dict of keyword arguments or a tuple, not {type(inputs).__name__}")

    def run() -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
        for p in trainable.values():
            p.grad = None
        with torch.random.fork_rng(devices=_devices(model)):
            torch.manual_seed(seed)
            out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
            loss = _loss_of(out, loss_fn)
            loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in trainable.items() if p.grad is not None}
        return out, loss.detach(), grads

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {n: p.grad for n, p in trainable.items()}
    calls: list[tuple[Any, list]] = []
    computed = _ComputedDtypes()
    try:
        with state.original(), computed:
            out0, loss0, grads0 = run()
        with state.observing(lambda graph, args: calls.append((graph, _snapshot(args)))):
            out1, loss1, grads1 = run()
    finally:
        for n, p in trainable.items():
            p.grad = saved[n]

    # A float32 loss (or upcast output) of a bf16 model carries bf16 rounding: results are judged
    # at the least precise dtype among the parameters and inputs, as regions are, and among the
    # values the original computes: a float32 model may compute in bf16 (under autocast, or over
    # 4-bit weights whose GEMMs run in bf16), and its float32 results then carry bf16 rounding too.
    stored = _loosest([t.dtype for t in (*model.parameters(), *_tensors(inputs, "input").values())
                       if t.is_floating_point()])
    floor = _loosest([d for d in (stored, *computed.dtypes) if d is not None])
    result = CheckResult()
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {"loss": (loss1, loss0)}  # name: (optimised, original)
    outs0, outs1 = _tensors(out0, "output"), _tensors(out1, "output")
    released = any(a.released for g in state.graphs.values() for a in g.result.applied)
    for name, ref in outs0.items():
        if name not in outs1:
            continue
        if released and outs1[name].numel() == 0 and ref.numel() > 0:
            continue  # an output the fused loss made unnecessary (keep_logits=False): not computed
        pairs[name] = (outs1[name], ref)
    for name, ref in grads0.items():
        if name not in grads1:
            result.problems.append(f"gradient of {name} exists originally but not after optimisation")
            continue
        pairs[f"grad {name}"] = (grads1[name], ref)
    for name in grads1.keys() - grads0.keys():
        result.problems.append(f"gradient of {name} appears only after optimisation")
    result.model = [_compare(name, new, ref, elementwise=False, floor=floor) for name, (new, ref) in pairs.items()]
    if floor != stored:
        computes_in = str(floor).removeprefix("torch.")
        result.model = [c if c.dtype == computes_in else
                        dataclasses.replace(c, bound=f"{c.bound}, as the original computes in {computes_in}")
                        for c in result.model]
    # The float32 run widens the 16-bit tensors a model stores and turns autocast off: a model
    # that stores none and runs without autocast would compute the same again.
    widened = stored in _SIXTEEN_BIT or bool(_autocast_devices())
    if floor in _SIXTEEN_BIT and widened and any(not c.ok for c in result.model):
        _judge_by_float32_run(result, pairs, floor, lambda: _float32_run(model, inputs, loss_fn, seed, state))

    if not calls and state.entry_points and not any(e.failed for e in state.entry_points):
        result.problems.append("no captured graph ran: the optimised model did not go through fastft")
    generator = torch.Generator().manual_seed(seed)
    for graph, args in calls:
        with torch.no_grad(), _without_cudnn_attention():
            _RegionRunner(graph.gm, result, generator, graph.module_prefix).run(*args)
    return result


class _ComputedDtypes(TorchFunctionMode):
    """Records the floating dtypes of the values torch functions compute while it is active (at
    the torch API, not the dispatcher: a dispatch mode would also see inside control-flow
    operators, which then reject it)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in pytree.tree_leaves(out):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self.dtypes.add(value.dtype)
        return out


class _RegionRunner(fx.Interpreter):
    """Runs a rewritten graph; at each fused op, also runs the region it replaced, and compares."""

    def __init__(self, gm: fx.GraphModule, result: CheckResult, generator: torch.Generator,
                 prefix: str) -> None:
        super().__init__(gm)
        self.result, self.generator, self.prefix = result, generator, prefix

    def run_node(self, n: fx.Node) -> Any:
        # Nested graphs run through this interpreter too, so the regions inside them are checked.
        if n.op == "call_function" and n.target is torch.ops.higher_order.tag_activation_checkpoint:
            body, *operands = self.map_nodes_to_values(n.args, n)
            return self._nested(body, operands)
        if n.op == "call_function" and n.target is torch.ops.higher_order.cond:
            pred, true_body, false_body, operands = self.map_nodes_to_values(n.args, n)
            return self._nested(true_body if bool(pred) else false_body, operands)
        out = super().run_node(n)
        applied = n.meta.get(REWRITE_META)
        if isinstance(applied, AppliedRewrite):
            args = self.map_nodes_to_values(n.args, n)
            self._compare_region(applied, n, args)
        return out

    def _nested(self, body: fx.GraphModule, operands) -> Any:
        return _RegionRunner(body, self.result, self.generator, self.prefix).run(*operands)

    def _compare_region(self, applied: AppliedRewrite, n: fx.Node, args: tuple) -> None:
        where = f"{applied.pattern.name}@{(self.prefix + applied.module_path) or '<model>'}:{n.name}"
        # The region takes each distinct input node once, in order of first use in the call.
        inputs = list(dict.fromkeys(a for a in n.args if isinstance(a, fx.Node)))
        values = {a: args[i] for i, a in reversed(list(enumerate(n.args))) if isinstance(a, fx.Node)}
        with torch.enable_grad():
            leaves_ref = [_leaf(values[a], a) for a in inputs]
            leaves_new = {a: _leaf(values[a], a) for a in inputs}
            ref = _as_tuple(applied.region(*leaves_ref))
            fused_args = [leaves_new[a] if isinstance(a, fx.Node) else v for a, v in zip(n.args, args)]
            # A grouped op called for a group of one computes outputs the region does not have.
            new = _as_tuple(n.target(*fused_args, **n.kwargs))[:len(ref)]
            leaves_new = list(leaves_new.values())
            # A region fed 16-bit values may round differently inside (e.g. logits kept in fp32
            # where eager rounded them): judge it at the precision of its least precise input.
            floor = _loosest([v.dtype for v in leaves_ref if isinstance(v, torch.Tensor)])
            truth: tuple | None = None
            for k, (a, b) in enumerate(zip(new, ref)):
                label = "output" if len(ref) == 1 else f"output[{k}]"
                comparison = _compare(f"{where} {label}", a, b, elementwise=True, floor=floor)
                if not comparison.ok and b.is_floating_point():
                    if truth is None:
                        truth = _float64_outputs(applied, leaves_ref)
                    comparison = _compare_to_truth(comparison, a, b, truth[k], floor)
                self.result.regions.append(comparison)
            if len(new) != len(ref):
                self.result.problems.append(f"{where}: {len(new)} outputs, the region has {len(ref)}")
                return
            differentiable = [k for k, r in enumerate(ref) if r.requires_grad]
            if not differentiable:
                return
            grad_outs = [torch.randn(ref[k].shape, generator=self.generator, dtype=torch.float32).to(ref[k])
                         for k in differentiable]

            def input_grads(outputs, leaves):
                """Gradients of the differentiable outputs w.r.t. the leaves that require grad."""
                return torch.autograd.grad([outputs[k] for k in differentiable],
                                           [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad],
                                           [_laid_out_like(g, outputs[k]) for g, k in zip(grad_outs, differentiable)],
                                           allow_unused=True)

            g_ref = input_grads(ref, leaves_ref)
            g_new = input_grads(new, leaves_new)
        for k, (a, b) in enumerate(zip(g_new, g_ref)):
            if a is None or b is None:
                if (a is None) != (b is None):
                    self.result.problems.append(f"{where}: gradient of input {k} exists on one side only")
                continue
            # The same floor: a float32 parameter's gradient is a product of the 16-bit values
            # that flowed through the region (an adapter kept in float32 on a bfloat16 model).
            self.result.regions.append(_compare(f"{where} grad[{k}]", a, b, elementwise=False, floor=floor))


def _without_cudnn_attention() -> contextlib.AbstractContextManager:
    """Regions are re-run with attention on any backend but cuDNN's. cuDNN's attention backward
    (torch 2.11, cuDNN 9.19, H200) reuses the plan it built for the first layout it met at a
    shape: the re-run hands it q, k and v in the layout eager gives them (views of one fused qkv
    projection), where the model's compiled graph had handed them laid out otherwise, and gets
    wrong gradients (tiny Phi-3, bf16: region and fused op 1.3-1.5 apart, rel_l2; agreeing with
    cuDNN's attention off). The model-level comparison keeps every backend."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _laid_out_like(grad: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``grad``'s values in ``output``'s memory layout, as a model's backward usually hands a
    gradient over. cuDNN's attention backward (torch 2.11, cuDNN 9.19, H200) caches its plans
    without the gradient's strides: a gradient in a layout the plan was not built for gets a
    plan built for another and wrong results (rel_l2 1.1-1.5 on the H200)."""
    return torch.empty_like(output).copy_(grad)


def _float64_outputs(applied: AppliedRewrite, leaves: list) -> tuple:
    """The original region run again in float64: every floating input widened and the region's
    casts between floating dtypes skipped (a LoRA region casts x to its float32 adapters' dtype,
    a norm casts back to its input's), so that it computes the values both computations
    approximate, without their roundings."""
    with torch.no_grad():
        wide = [v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for v in leaves]
        region = applied.region
        return _as_tuple(_InFloat64(region).run(*wide) if isinstance(region, fx.GraphModule) else region(*wide))


class _InFloat64(fx.Interpreter):
    """Runs a region with its casts of float64 values to floating dtypes skipped: the casts as
    ``canonical`` sees them (``.to``, ``.type``, ``.float()``, ``type_as``...), including those
    it calls identities because the traced value already had the target dtype."""

    def run_node(self, n: fx.Node) -> Any:
        canon = canonical(n)
        if canon is not None and isinstance(canon.args[0] if canon.args else None, fx.Node) and (
                canon.op == "identity" or (canon.op == "cast" and _is_floating(canon.attrs.get("dtype")))):
            (source,) = self.map_nodes_to_values((canon.args[0],), n)
            if isinstance(source, torch.Tensor) and source.dtype == torch.float64:
                return source
        if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace not in _TORCH_NAMESPACES:
            # Another library's kernel keeps its own dtype contract (bitsandbytes' CUDA 4-bit GEMM
            # takes float32 absmax only): it gets its inputs in the dtypes they were traced with.
            def traced_dtype(a: fx.Node) -> Any:
                value, meta = self.env[a], tensor_meta(a)
                if isinstance(value, torch.Tensor) and value.dtype == torch.float64 and meta is not None:
                    return value.to(meta.dtype)
                return value

            return n.target(*fx.node.map_arg(n.args, traced_dtype), **fx.node.map_arg(n.kwargs, traced_dtype))
        return super().run_node(n)


_TORCH_NAMESPACES = ("aten", "prims")


def _is_floating(dtype: Any) -> bool:
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _compare_to_truth(first: Comparison, new: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor,
                      floor: torch.dtype | None) -> Comparison:
    """Where the two differ by more than the tolerance, the fused result still passes when it is,
    element by element, no further from the float64 result than the original is (plus the
    tolerance): the original's own rounding (say, 1 + erf(x) cancelling for very negative x) is
    not a fault of the fused op."""
    tol = _tolerance(ref, floor)
    a, b, t = new.detach().double(), ref.detach().double(), truth.detach().double().to(ref.device)
    if t.shape != b.shape:
        return first
    ok = bool(torch.isfinite(a).all()) and bool(((a - t).abs() <= (b - t).abs() + tol.atol + tol.rtol * t.abs()).all())
    verdict = "but no further from float64 than the original" if ok else \
        "and in some elements further from float64 than the original"
    bound = (f"atol={tol.atol:g} rtol={tol.rtol:g} exceeded, {verdict} "
             f"(original max|Δ| {float((b - t).abs().max()):.3g}, fused {float((a - t).abs().max()):.3g})")
    return dataclasses.replace(first, ok=ok, bound=bound)


def _float32_run(model: nn.Module, inputs: dict | tuple, loss_fn: Callable | None, seed: int,
                 state: Any) -> dict[str, torch.Tensor]:
    """The original model run once more (same inputs and random state) with every 16-bit floating
    parameter, buffer and input in float32, through ``torch.func.functional_call`` (the model's own
    tensors are not touched), and autocast off. Returns the loss, outputs and trainable gradients by the names the
    model-level comparisons use. Costs a float32 copy of the 16-bit tensors."""
    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float() if t.dtype in _SIXTEEN_BIT else t.detach()

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    by_identity: dict[int, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    leaves: dict[str, torch.Tensor] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in named:
        if id(t) not in by_identity:  # a tied tensor gets one float32 copy under all its names
            by_identity[id(t)] = wide(t).requires_grad_(name in trainable and t.is_floating_point())
        tensors[name] = by_identity[id(t)]
        if name in trainable:
            leaves[name] = tensors[name]
    if isinstance(inputs, dict):
        args, kwargs = (), {k: wide(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    else:
        args, kwargs = tuple(wide(v) if isinstance(v, torch.Tensor) else v for v in inputs), {}
    run = _ForwardAndGradients(model, loss_fn, list(leaves.values()))
    with torch.random.fork_rng(devices=_devices(model)), state.original(), contextlib.ExitStack() as stack:
        for device in _autocast_devices():
            stack.enter_context(torch.autocast(device, enabled=False))
        torch.manual_seed(seed)
        out, loss, grads = torch.func.functional_call(run, {f"model.{n}": t for n, t in tensors.items()},
                                                      (args, kwargs))
    found = {"loss": loss.detach(), **{k: v.detach() for k, v in _tensors(out, "output").items()}}
    found.update({f"grad {n}": g for n, g in zip(leaves, grads) if g is not None})
    return found


class _ForwardAndGradients(nn.Module):
    """The model's forward, its loss and the loss's gradients in one call, so that all of it runs
    inside one ``functional_call``: a checkpointed layer runs its forward again in the backward,
    and must see the substituted tensors there too."""

    def __init__(self, model: nn.Module, loss_fn: Callable | None, leaves: list[torch.Tensor]) -> None:
        super().__init__()
        self.model, self.loss_fn, self.leaves = model, loss_fn, leaves

    def forward(self, args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor, tuple]:
        out = self.model(*args, **kwargs)
        loss = _loss_of(out, self.loss_fn)
        return out, loss, torch.autograd.grad(loss, self.leaves, allow_unused=True)


def _judge_by_float32_run(result: CheckResult, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                          floor: torch.dtype, float32_run: Callable[[], dict[str, torch.Tensor]]) -> None:
    """Re-judge the failed model-level comparisons of a 16-bit model against a float32 run of the
    original (``_compare_to_witness``). A float32 run that cannot be made leaves them failed and
    says why among the problems."""
    try:
        witness = float32_run()
    except Exception as e:  # noqa: BLE001  (reported: the comparisons stay failed)
        result.problems.append(f"the failed comparisons could not be judged against a float32 run of the "
                               f"original model: {type(e).__name__}: {e}")
        return
    for i, c in enumerate(result.model):
        if not c.ok and c.name in witness:
            new, ref = pairs[c.name]
            result.model[i] = _compare_to_witness(c, new, ref, witness[c.name], floor)


def _compare_to_witness(first: Comparison, new: torch.Tensor, ref: torch.Tensor, witness: torch.Tensor,
                        floor: torch.dtype | None) -> Comparison:
    """A model-level result outside rel_l2 still passes when it is no further (in rel_l2) from the
    float32 run than the original is, plus the tolerance: a gradient summed over many 16-bit
    roundings can differ by more than the tolerance between two equally good computations. The
    float32 run counts only where the original is within ``WITNESS_FACTOR`` tolerances of it (a
    run that differs otherwise, say by its dropout masks, vouches for nothing)."""
    tol = _tolerance(ref, floor)
    a, b, t = new.detach().double(), ref.detach().double(), witness.detach().double().to(ref.device)
    if t.shape != b.shape:
        return first
    scale = t.norm().clamp_min(1e-30)
    from_original, from_fused = float((b - t).norm() / scale), float((a - t).norm() / scale)
    if from_original > WITNESS_FACTOR * tol.rel_l2:
        bound = (f"rel_l2<={tol.rel_l2:g}; a float32 run of the original is no witness: the original "
                 f"is {from_original:.3g} from it")
        return dataclasses.replace(first, bound=bound)
    ok = bool(torch.isfinite(a).all()) and from_fused <= from_original + tol.rel_l2
    bound = (f"rel_l2<={tol.rel_l2:g} exceeded; from a float32 run of the original: original "
             f"{from_original:.3g}, optimised {from_fused:.3g} (may exceed the original's by {tol.rel_l2:g})")
    return dataclasses.replace(first, ok=ok, bound=bound)


def _loosest(dtypes: list[torch.dtype]) -> torch.dtype | None:
    floats = [d for d in dtypes if d in TOLERANCES]
    return max(floats, key=lambda d: TOLERANCES[d].rel_l2, default=None)


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _leaf(value: Any, node: fx.Node) -> Any:
    """A fresh leaf holding ``value``; it asks for a gradient where the graph's input did."""
    if isinstance(value, torch.Tensor):
        meta = tensor_meta(node)
        wants_grad = meta.requires_grad if meta is not None else value.is_floating_point()
        return value.detach().clone().requires_grad_(wants_grad and value.is_floating_point())
    return value


def _snapshot(args: tuple) -> list:
    return [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]


def _tolerance(ref: torch.Tensor, floor: torch.dtype | None):
    """The tolerance of ``ref``'s dtype, or of ``floor`` where that is looser."""
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    if floor is not None and TOLERANCES[floor].rel_l2 > TOLERANCES[dtype].rel_l2:
        dtype = floor
    return tolerance_for(dtype)


def _compare(name: str, new: torch.Tensor, ref: torch.Tensor, elementwise: bool,
             floor: torch.dtype | None = None) -> Comparison:
    tol = _tolerance(ref, floor)
    if new.shape != ref.shape:
        return Comparison(name, str(ref.dtype), float("inf"), float("inf"), False,
                          f"shape {tuple(new.shape)} vs {tuple(ref.shape)}")
    a, b = new.detach().double(), ref.detach().double()
    finite = bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
    diff = (a - b).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    rel = float((a - b).norm() / b.norm().clamp_min(1e-30)) if diff.numel() else 0.0
    if elementwise:
        ok = finite and bool(torch.allclose(a, b, atol=tol.atol, rtol=tol.rtol))
        bound = f"atol={tol.atol:g} rtol={tol.rtol:g}"
    else:
        ok = finite and (rel <= tol.rel_l2 or max_abs <= tol.atol)
        bound = f"rel_l2<={tol.rel_l2:g}"
    return Comparison(name, str(ref.dtype).replace("torch.", ""), max_abs, rel, ok, bound)


def _loss_of(out: Any, loss_fn: Callable | None) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(out)
    elif isinstance(out, torch.Tensor):
        loss = out
    elif getattr(out, "loss", None) is not None:
        loss = out.loss
    elif isinstance(out, dict) and out.get("loss") is not None:
        loss = out["loss"]
    else:
        raise CheckError(f"cannot find a loss in the model's output ({type(out).__name__}): "
                         f"pass labels, or loss_fn=lambda out: ...")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise CheckError(f"the loss must be a scalar tensor, got {type(loss).__name__} "
                         f"of shape {tuple(getattr(loss, 'shape', ()))}")
    return loss


def _tensors(out: Any, prefix: str) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    if isinstance(out, torch.Tensor):
        found[prefix] = out
    elif isinstance(out, dict):
        for k, v in out.items():
            found.update(_tensors(v, f"{prefix}.{k}"))
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        for f in dataclasses.fields(out):
            found.update(_tensors(getattr(out, f.name), f"{prefix}.{f.name}"))
    elif isinstance(out, (tuple, list)):
        for i, v in enumerate(out):
            found.update(_tensors(v, f"{prefix}[{i}]"))
    return found


def _autocast_devices() -> list[str]:
    """The device types autocast is on for here."""
    return [d for d in ("cpu", "cuda", "xpu", "mps") if torch.is_autocast_enabled(d)]


def _devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
