"""A gradient-checkpointed LoRA step on a model whose checkpointed layers have a Python side effect:
Gemma 3n's text model, whose layers share keys and values through a dict. One variant a process:

    python3 bench/gemma3n_checkpointed.py eager|fastft|fastft-without-side-effects [--batch 1]
                                          [--seq 2048] [--steps 8] [--tiny]

The model has Gemma3nTextConfig's default sizes (random weights; ``--tiny``: fastft.tiny's sizes, on
the CPU, to try the script), bf16, HF gradient checkpointing (non-reentrant), peft LoRA r16 on every
q/k/v/o/gate/up/down projection, AdamW over the adapters. ``fastft-without-side-effects`` captures
without Dynamo's ``skip_fwd_side_effects_in_bwd_under_checkpoint``, as fastft did before it set it:
the checkpointed layers then break the graph and run unfused. Steps are synchronised; after 3
warm-up steps the median of the timed ones is printed with the peak memory, the losses and, for
fastft, the report's counts and graph breaks, as one JSON line.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time

import peft
import torch
import transformers

import fastft

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("eager", "fastft", "fastft-without-side-effects")
SIDE_EFFECTS = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def build(tiny: bool, device: str) -> tuple[torch.nn.Module, transformers.PretrainedConfig]:
    torch.manual_seed(0)
    if tiny:
        from fastft.tiny import tiny_config

        config = tiny_config("gemma3n_text")
    else:
        config = transformers.Gemma3nTextConfig()
    config.use_cache = False
    with torch.device(device):
        model = transformers.Gemma3nForCausalLM(config).to(torch.bfloat16)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    return peft.get_peft_model(model, lora), config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=VARIANTS)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    cuda = not args.tiny
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench/gemma3n_checkpointed.py times GPU steps: no GPU here (--tiny runs on the CPU)")
    capture = importlib.import_module("fastft.optimize")
    if args.variant == "fastft-without-side-effects":
        capture._CAPTURE_CONFIG.pop(SIDE_EFFECTS, None)

    model, config = build(args.tiny, "cuda" if cuda else "cpu")
    if args.variant != "eager":
        fastft.optimize(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    # The per-layer embeddings have a smaller vocabulary than the main one.
    vocab = min(config.vocab_size, getattr(config, "vocab_size_per_layer_input", config.vocab_size))
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to("cuda" if cuda else "cpu")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses, warmup = [], [], 3
    t_start = time.perf_counter()
    for step in range(warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        sync()
        t1 = time.perf_counter()
        losses.append(round(loss.item(), 4))
        if step == 0:
            first_s = t1 - t_start
        if step >= warmup:
            times.append((t1 - t0) * 1e3)
    row = dict(variant=args.variant, torch=torch.__version__, transformers=transformers.__version__,
               batch=args.batch, seq=args.seq, step_ms=round(statistics.median(times), 1),
               min_ms=round(min(times), 1), max_ms=round(max(times), 1), first_s=round(first_s, 1),
               peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None, losses=losses)
    if args.variant != "eager":
        report = fastft.report(model)
        row.update(counts=report.counts(), graph_breaks=sum(b.count for b in report.graph_breaks),
                   break_reasons=sorted({b.reason[:80] for b in report.graph_breaks}))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
