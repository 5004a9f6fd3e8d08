"""peft adapters on parameters (``LoraConfig(target_parameters=...)``, and what ``all-linear``
gives a mixture of experts' stacked expert weights), made capturable.

peft applies such an adapter by registering a parametrization on the wrapped parameter for the
duration of each call and removing it afterwards. Dynamo cannot trace that (``Tensor.set_`` on a
graph input, modules created mid-call): every adapted expert block broke the graph in two or
more places. While a graph is being captured, fastft computes the same adapted weight as a
tensor and runs the wrapped module on it through ``torch.func.functional_call``; called eagerly
(``fastft.check``'s original model, code outside any capture), the wrapper runs as peft wrote it.
Anything but the plain case (adapters disabled or merged, per-call adapter names, no active
adapter here, a weight stored in a dtype peft upcasts) goes to peft's own code, as before.
"""
from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn as nn

_PLAIN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_parameter_adapters_capturable(model: nn.Module) -> int:
    """Give every peft parameter adapter in ``model`` a forward that Dynamo can capture; returns
    how many. Does nothing where peft is absent or its wrapper is not the one this was written
    for (its methods are checked)."""
    wrapper_class = _peft_parameter_wrapper()
    if wrapper_class is None:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, wrapper_class) and "forward" not in module.__dict__:
            # A method bound to the module, not a closure: a deep copy of the model rebinds it.
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count


def _peft_parameter_wrapper() -> type | None:
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return None
    if not all(hasattr(ParamWrapper, n) for n in ("get_param", "get_base_layer", "get_delta_weight",
                                                    "get_delta_factors")):
        return None
    return ParamWrapper


def _forward(wrapper: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    adapters = _plain_adapters(wrapper, kwargs) if torch.compiler.is_compiling() else []
    if not adapters:
        return type(wrapper).forward(wrapper, x, *args, **kwargs)
    weight = _adapted(wrapper, adapters)
    return torch.func.functional_call(wrapper.base_layer, {_name_below(wrapper): weight}, (x, *args), kwargs)


def _plain_adapters(wrapper: nn.Module, kwargs: dict) -> list[str]:
    """The active adapters of ``wrapper`` when its call is the plain one this module computes;
    [] otherwise."""
    if wrapper.disable_adapters or wrapper.merged or kwargs.get("adapter_names") is not None:
        return []
    if wrapper.get_param().dtype not in _PLAIN_DTYPES:
        return []
    return [a for a in wrapper.active_adapters if a in wrapper.lora_A]


def _adapted(wrapper: nn.Module, adapters: list[str]) -> torch.Tensor:
    """The wrapped parameter with its adapters added, as peft's parametrization computes it:
    one adapter on stacked experts folds its factors into one batched GEMM; otherwise the
    adapters' delta weights are summed and added."""
    weight = wrapper.get_param()
    if len(adapters) == 1 and wrapper.num_experts > 1:
        lhs, rhs, scaling = wrapper.get_delta_factors(adapters[0])
        with torch.autocast(device_type=weight.device.type, enabled=False):
            return torch.baddbmm(weight, lhs, rhs, alpha=scaling)
    delta = wrapper.get_delta_weight(adapters[0])
    for name in adapters[1:]:
        delta = delta + wrapper.get_delta_weight(name)
    return weight + delta


def _name_below(wrapper: nn.Module) -> str:
    """The wrapped parameter's name relative to ``wrapper.base_layer`` (wrappers nest: one per
    adapted parameter of the same module)."""
    parts, module, target = [], wrapper.base_layer, wrapper.get_base_layer()
    while module is not target:
        parts.append("base_layer")
        module = module.base_layer
    return ".".join([*parts, wrapper.parameter_name])
