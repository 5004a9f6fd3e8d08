"""Build a shape's random-weight model once and save it (with a small tokenizer) to a directory
that every system then loads with from_pretrained: the same weights for all, and the directory
Unsloth's loader needs. Runs in its own subprocess (see runner.py)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .shapes import CONFIGS, make_config

STAMP = "train_step_stamp.json"


def stamp_for(shape: str, seed: int) -> dict[str, Any]:
    return {"shape": shape, "seed": seed, "config": CONFIGS[shape][1]}


def is_ready(model_dir: Path, shape: str, seed: int) -> bool:
    try:
        return json.loads((model_dir / STAMP).read_text()) == json.loads(json.dumps(stamp_for(shape, seed)))
    except (OSError, ValueError):
        return False


def save_tokenizer(model_dir: Path) -> None:
    """A word-level tokenizer with bos/eos/pad/unk (the data are random token ids; Unsloth's loader
    only needs a tokenizer to exist, with a pad token distinct from eos so it changes nothing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(60)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(model_dir))


def prepare(shape: str, seed: int, model_dir: Path, device: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    if is_ready(model_dir, shape, seed):
        return {"model_dir": str(model_dir), "reused": True}
    t0 = time.perf_counter()
    if model_dir.exists():
        shutil.rmtree(model_dir)
    tmp = model_dir.with_name(model_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = make_config(shape)
    torch.manual_seed(seed)
    # Initialised on the accelerator (an 8B model's random init on CPU takes minutes), in bf16.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(tmp))
    save_tokenizer(tmp)
    (tmp / STAMP).write_text(json.dumps(stamp_for(shape, seed), indent=1))
    n_params = sum(p.numel() for p in model.parameters())
    del model
    os.replace(tmp, model_dir)
    return {"model_dir": str(model_dir), "reused": False, "build_s": time.perf_counter() - t0,
            "parameters": n_params}
