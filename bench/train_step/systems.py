"""The systems compared: each turns the saved model directory into a model ready to train.

Every system gets the same weights (one saved directory), bf16, SDPA attention, the same LoRA
(r 16, alpha 16, dropout 0, every linear of the decoder layers) or full fine-tuning, and the same
gradient checkpointing setting. Each runs in its own process (worker.py); ``early_import`` runs
first there, because Unsloth patches transformers when it is imported and fastft must be imported
before triton (on CPU it selects Triton's interpreter).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .shapes import LORA_ALPHA, LORA_RANK, LORA_TARGETS

SYSTEMS = ("hf", "compile", "liger", "unsloth", "fastft")
# Unsloth with its own offloaded checkpointing ("unsloth"); fastft with cuda_graphs=True.
EXTRA_SYSTEMS = ("unsloth-offload", "fastft-cg")
# The distribution whose version is reported beside each system's result.
PACKAGES = {"hf": ["transformers"], "compile": ["torch"], "liger": ["liger-kernel"],
            "unsloth": ["unsloth", "unsloth_zoo"], "unsloth-offload": ["unsloth", "unsloth_zoo"],
            "fastft": ["fastft"], "fastft-cg": ["fastft"]}
_EARLY = {"fastft": "fastft", "fastft-cg": "fastft", "liger": "liger_kernel.transformers", "unsloth": "unsloth",
          "unsloth-offload": "unsloth"}
# liger-kernel's patch function per transformers model_type (class-level: called before loading).
_LIGER_PATCH = {"llama": "apply_liger_kernel_to_llama", "qwen3": "apply_liger_kernel_to_qwen3",
                "gemma3_text": "apply_liger_kernel_to_gemma3_text"}


class Unavailable(Exception):
    """The system's package is missing or refuses this machine (its import raised)."""


@dataclass
class Prepared:
    model: Any  # the model whose parameters the optimizer trains
    step_model: Callable[..., Any]  # what a training step calls (the model, or its compiled wrapper)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Setting:
    system: str
    mode: str  # lora | qlora | full
    checkpointing: str  # none | layer
    device: str
    seq: int
    seed: int


def early_import(system: str) -> None:
    name = _EARLY.get(system)
    if name is None:
        return
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001  (Unsloth raises NotImplementedError without a GPU)
        raise Unavailable(f"{type(e).__name__}: {e}") from e


def prepare_system(model_dir: Path, s: Setting) -> Prepared:
    if s.system.startswith("unsloth"):
        return _unsloth(model_dir, s)
    if s.system == "liger":
        _apply_liger(model_dir)
    model = _load_hf(model_dir, s)
    if s.checkpointing == "layer":
        # Non-reentrant: the frozen embedding output needs no requires_grad hook, for any system.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if s.mode in ("lora", "qlora"):
        model = _add_lora(model, s.seed)
    model.train()
    info: dict[str, Any] = {}
    step_model: Callable[..., Any] = model
    if s.system == "compile":
        import torch

        step_model = torch.compile(model)
    elif s.system.startswith("fastft"):
        import fastft

        fastft.optimize(model, cuda_graphs=s.system == "fastft-cg")
    return Prepared(model, step_model, info)


def _load_hf(model_dir: Path, s: Setting):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": s.device})
    if s.mode == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    model.config.use_cache = False
    return model


def _add_lora(model, seed: int):
    """peft's defaults otherwise (adapters in float32 on a bf16 base, as peft makes them). No
    prepare_model_for_kbit_training for QLoRA: it would upcast norms, embeddings and the LM head
    to float32, which Unsloth does not do, so the systems would no longer train the same model."""
    import peft
    import torch

    torch.manual_seed(seed)  # the same adapter init (A) for every peft-based system
    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                             target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def _apply_liger(model_dir: Path) -> None:
    import liger_kernel.transformers as liger
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(str(model_dir)).model_type
    patch = getattr(liger, _LIGER_PATCH.get(model_type, ""), None)
    if patch is None:
        raise Unavailable(f"liger-kernel {_version('liger-kernel')} has no patch for model_type {model_type!r}")
    patch()  # its defaults: RoPE, RMSNorm, SwiGLU/GeGLU and the fused linear + cross-entropy loss


def _unsloth(model_dir: Path, s: Setting) -> Prepared:
    import torch
    from unsloth import FastLanguageModel

    if s.system == "unsloth-offload":
        checkpointing: Any = "unsloth"  # its offloaded checkpointing (plain checkpointing below 512 tokens)
    else:
        checkpointing = {"none": False, "layer": True}[s.checkpointing]
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=s.seq, dtype=torch.bfloat16,
        load_in_4bit=s.mode == "qlora", load_in_16bit=s.mode != "qlora", full_finetuning=s.mode == "full",
        use_gradient_checkpointing=checkpointing, use_exact_model_name=True, random_state=s.seed)
    if s.mode in ("lora", "qlora"):
        model = FastLanguageModel.get_peft_model(
            model, r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0, bias="none",
            target_modules=list(LORA_TARGETS), use_gradient_checkpointing=checkpointing,
            random_state=s.seed, max_seq_length=s.seq)
    if hasattr(FastLanguageModel, "for_training"):
        # Explicitly: left to itself it turns checkpointing on where no adapter recorded a choice.
        FastLanguageModel.for_training(model, use_gradient_checkpointing=checkpointing)
    model.train()
    return Prepared(model, model, {"unsloth_checkpointing": str(checkpointing)})


def fastft_summary(model) -> dict[str, Any]:
    """What fastft did to the model (its Report), in a few numbers; {} where that API differs."""
    try:
        import fastft

        r = fastft.report(model)
        return {"rewrites": r.counts(), "graphs_captured": r.graphs_captured,
                "graph_breaks": sum(g.count for g in r.graph_breaks),
                "capture_failures": [f"{f.entry}: {f.error}" for f in r.capture_failures],
                "near_misses": len(r.near_misses)}
    except Exception as e:  # noqa: BLE001  (a summary must not fail the measured run)
        return {"report_error": f"{type(e).__name__}: {e}"}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def package_versions(systems: list[str]) -> dict[str, str | None]:
    dists = ["torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate"]
    for s in systems:
        dists += [d for d in PACKAGES.get(s, []) if d not in dists]
    return {d: _version(d) for d in dists}
