"""``fastft-inspect [MODEL] [--json] [--check]``: which rewrites apply to a model, where, and why not."""
from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_MODEL = "llama"  # a built-in tiny model of the most common decoder layout


def _load(model: str):
    from .tiny import build_tiny_model

    if os.path.isdir(model):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model)
    return build_tiny_model(model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastft-inspect", description=__doc__)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help="a local Hugging Face model folder, or a transformers model_type (llama, "
                             "qwen3, gemma3, ...) built tiny with random weights; default: a tiny llama")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--check", action="store_true", help="also run fastft.check on a random batch")
    parser.add_argument("--lower", default="auto", choices=["auto", "eager", "inductor"])
    args = parser.parse_args(argv)

    import fastft

    from .tiny import random_batch

    try:
        model = _load(args.model)
    except (ValueError, OSError) as error:
        print(f"fastft-inspect: cannot load {args.model!r}: {error}", file=sys.stderr)
        return 2
    import torch

    if torch.cuda.is_available():
        model = model.cuda()
    model.train()
    fastft.optimize(model, lower=args.lower)
    batch = random_batch(model)
    out = model(**batch)
    out.loss.backward()
    report = fastft.report(model)
    result = fastft.check(model, batch) if args.check else None

    if args.json:
        data = {"model": args.model, "architecture": type(model).__name__, **report.to_dict()}
        if result is not None:
            data["check"] = {"ok": result.ok, "summary": str(result),
                             "errors": [str(c) for c in result.errors], "problems": result.problems}
        print(json.dumps(data, indent=2))
    else:
        print(f"{args.model}: {type(model).__name__}")
        print(report)
        if result is not None:
            print()
            print(result)
    return 0 if result is None or result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
