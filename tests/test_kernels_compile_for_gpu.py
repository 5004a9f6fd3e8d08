"""Every Triton kernel of fastft.kernels, compiled for a Hopper GPU (sm_90) on this GPU-less
machine, with the arguments its launchers pass.

The interpreter that runs the other tests takes each argument as it comes; the GPU compiler
specialises them first (an integer equal to 1 becomes a constant, integers and addresses that are
multiples of 16 are marked so). A kernel can therefore pass every test here and fail to compile on
the GPU: the adapter gradients' partial sums did, for a dY of one row (found on the H200). Pointers
are compiled here as 16-byte aligned, as fresh allocations are.

Here tiny workloads run through the interpreter while a hook records each launch (the kernel, the
type of each argument, which integers are 1 or multiples of 16, the constexpr values, warps and
stages); a second process, without the interpreter, compiles each distinct launch for sm_90 as the
GPU's JIT would specialise it.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import peft
import pytest
import torch

import fastft
from fastft import kernels as fastft_kernels
from fastft.kernels import activation, adapter_grads, concat, glu, nf4, rms_norm

from helpers import tiny

try:
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a Triton build without its CUDA backend cannot compile for the GPU
    InterpretedFunction = None

TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
               torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
               torch.bool: "i1"}


def _is_constexpr(parameter: inspect.Parameter) -> bool:
    return "constexpr" in str(parameter.annotation)


def _describe(fn, args: tuple, kwargs: dict) -> dict:
    """One launch as the GPU's JIT sees it: per argument a type, or a constant where it would
    specialise one."""
    params = inspect.signature(fn).parameters
    values = dict(zip(params, args))
    values.update({k: v for k, v in kwargs.items() if k in params})
    arguments = {}
    for name, parameter in params.items():
        value = values.get(name, parameter.default)
        if _is_constexpr(parameter):
            arguments[name] = ["constexpr", str(value) if hasattr(value, "primitive_bitwidth") else value,
                               hasattr(value, "primitive_bitwidth")]
        elif isinstance(value, torch.Tensor):
            arguments[name] = ["*" + TRITON_TYPE[value.dtype]]
        elif value is None:
            arguments[name] = ["constexpr", None, False]
        elif isinstance(value, bool):
            arguments[name] = ["i1"]
        elif isinstance(value, int):
            arguments[name] = (["constexpr", 1, False] if value == 1
                               else ["i32" if -2**31 <= value < 2**31 else "i64", value % 16 == 0])
        elif isinstance(value, float):
            arguments[name] = ["fp32"]
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    return {"module": fn.__module__, "kernel": fn.__name__, "arguments": arguments,
            "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}


def _launched_kernels() -> set[tuple[str, str]]:
    """Every kernel (a jitted ``*_kernel``) that the modules of fastft.kernels define."""
    found = set()
    for name in dir(fastft_kernels):
        module = getattr(fastft_kernels, name)
        if inspect.ismodule(module) and module.__name__.startswith("fastft.kernels."):
            for attr, value in vars(module).items():
                if attr.endswith("_kernel") and isinstance(value, InterpretedFunction):
                    found.add((module.__name__, attr))
    return found


def _lora_models() -> None:
    """A gated MLP with RMSNorm and RoPE (llama), a LayerNorm one with Conv1D (gpt2) and a
    partial-rotary one (phi), LoRA on every linear, in bf16; one token, then a short batch."""
    for model_type in ("llama", "gpt2", "phi"):
        torch.manual_seed(0)
        model = peft.get_peft_model(tiny(model_type).to(torch.bfloat16),
                                    peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        fastft.optimize(model)
        for batch, seq in ((1, 1), (2, 5)):
            ids = torch.randint(0, 128, (batch, seq))
            model(input_ids=ids, labels=ids).loss.backward()


def _ops_the_models_leave_out() -> None:
    """Kernels those models do not reach: a plain activation and GLU, the joined add and norm,
    the depth concatenation and 4-bit weights (plain and with nested scales)."""
    for rows in (1, 5):
        x = torch.randn(rows, 24, dtype=torch.bfloat16, requires_grad=True)
        up = torch.randn(rows, 24, dtype=torch.bfloat16, requires_grad=True)
        activation.activation(x, "gelu_tanh", torch.bfloat16, torch.bfloat16).sum().backward()
        glu.glu(x, up, "silu", torch.bfloat16, torch.bfloat16).sum().backward()
        residual = torch.randn(rows, 24, dtype=torch.bfloat16)
        rms_norm.add_rms_norm_forward(x.detach(), residual, torch.ones(24, dtype=torch.bfloat16), 1e-6, 0.0,
                                      torch.float32, torch.bfloat16)
        concat.concat_columns(x.detach(), up.detach()[:, :5])
        for n in (64, 64 * 256):
            packed = torch.randint(0, 255, (n // 2,), dtype=torch.uint8)
            code = torch.linspace(-1, 1, 16)
            nf4.dequantize_4bit_forward(packed, torch.rand(n // 64), code, 64, [n // 64, 64], torch.bfloat16)
            nf4.dequantize_4bit_forward(packed, torch.randint(0, 255, (n // 64,), dtype=torch.uint8), code, 64,
                                        [n // 64, 64], torch.bfloat16, absmax2=torch.rand(max(1, n // (64 * 256))),
                                        code2=torch.linspace(-1, 1, 256), nested_blocksize=256, offset=0.5)


_COMPILE = r'''
import json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fastft  # noqa: F401  (TRITON_INTERPRET=0: the kernels are jitted, not interpreted)
import importlib

failures = []
for launch in json.load(sys.stdin):
    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    signature, constants, attrs = {}, {}, {}
    for i, (name, spec) in enumerate(launch["arguments"].items()):
        if spec[0] == "constexpr":
            signature[name] = "constexpr"
            constants[name] = tl.dtype(spec[1]) if spec[2] else spec[1]
        else:
            signature[name] = spec[0]
            if spec[0].startswith("*") or (len(spec) > 1 and spec[1]):
                attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": launch["num_warps"], "num_stages": launch["num_stages"]})
    except Exception as e:
        failures.append(f"{launch['module']}.{launch['kernel']} {launch['arguments']}: {type(e).__name__}: "
                        f"{str(e)[-1500:]}")
print(json.dumps(failures))
'''


@pytest.mark.skipif(InterpretedFunction is None or torch.cuda.is_available(),
                    reason="records launches through Triton's interpreter, compiles with its CUDA backend")
def test_every_kernel_compiles_for_sm90_as_its_launchers_call_it(monkeypatch):
    monkeypatch.setattr(adapter_grads, "FUSED_MIN_ELEMENTS", 0)  # the one-pass adapter gradients at any size
    launches: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        launch = _describe(self.fn, args, kwargs)
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    _lora_models()
    _ops_the_models_leave_out()

    reached = {(launch["module"], launch["kernel"]) for launch in launches.values()}
    missing = _launched_kernels() - reached
    assert not missing, f"no workload here launches {sorted(missing)}: add a call that does"
    proc = subprocess.run([sys.executable, "-c", _COMPILE], input=json.dumps(list(launches.values())),
                          capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, f"{len(failures)} of {len(launches)} launches do not compile for sm_90:\n" + "\n".join(failures)
