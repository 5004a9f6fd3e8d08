"""Time the fused loss's rows kernel (kernels/linear_cross_entropy.py) over (BLOCK_V, num_warps)
on one chunk of 16-bit logits, gradients computed, as the loss's forward launches it.

    python3 bench/loss_tiles.py [--rows 1024] [--vocab 128256]

Prints the configurations by median microseconds (``triton.testing.do_bench``). GPU only; the
pick goes into ``_kernel_config`` with the device, date and this command.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton

import fastft  # noqa: F401  (before triton kernels are defined: selects the interpreter off the GPU)
from fastft.kernels.linear_cross_entropy import linear_cross_entropy_rows_kernel
from fastft.kernels.rounding import TL_DTYPE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=128256)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/loss_tiles.py times GPU kernels: no GPU here")
    rows, vocab, dtype = args.rows, args.vocab, torch.bfloat16
    logits = torch.randn(rows, vocab, device="cuda", dtype=dtype)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    loss = torch.empty(rows, device="cuda")
    inv_div = torch.ones(1, device="cuda")
    results = []
    for block_v, num_warps in itertools.product((1024, 2048, 4096, 8192, 16384), (4, 8, 16, 32)):
        def run():  # the gradient goes over the logits, as in the op: the values stay finite
            linear_cross_entropy_rows_kernel[(rows,)](
                logits, labels, logits, loss, inv_div, vocab, logits.stride(0), -100, 1.0, 1.0,
                HAS_COLUMN_SCALE=False, HAS_SOFTCAP=False, COMPUTE_GRAD=True, DTYPE=TL_DTYPE[dtype],
                BLOCK_V=block_v, num_warps=num_warps)
        us = triton.testing.do_bench(run, warmup=20, rep=150, return_mode="median") * 1e3
        results.append((us, block_v, num_warps))
    print(f"rows kernel, {rows} rows x V {vocab} {dtype}, on {torch.cuda.get_device_name()}:")
    for us, block_v, num_warps in sorted(results):
        print(f"  {us:8.1f} us  BLOCK_V {block_v:5d}  num_warps {num_warps}")


if __name__ == "__main__":
    main()
