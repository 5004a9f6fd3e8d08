"""Time the fused loss's rows kernel (kernels/linear_cross_entropy.py) over (BLOCK_V, num_warps),
its grid (a program per row, or a few programs per SM taking rows in turn, so that fewer rows are
in flight and each stays in L2 between its two passes) and the gradient pass's block order, on one
chunk of 16-bit logits, gradients computed, as the loss's forward launches it.

    python3 bench/loss_tiles.py [--rows 1024] [--vocab 128256]

Prints the configurations by median microseconds (``triton.testing.do_bench``). GPU only; the
pick goes into ``_kernel_config``, ``PROGRAMS_PER_SM`` and ``GRAD_REVERSED`` with the device, date
and this command.
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
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = ((4096, 16), (8192, 16), (8192, 32), (2048, 8), (4096, 8))
    results = []
    for (block_v, num_warps), per_sm, reversed_ in itertools.product(tiles, (None, 1, 2, 3), (False, True)):
        programs = rows if per_sm is None else min(rows, per_sm * sms)

        def run():  # the gradient goes over the logits, as in the op: the values stay finite
            linear_cross_entropy_rows_kernel[(programs,)](
                logits, labels, logits, loss, inv_div, rows, vocab, logits.stride(0), -100, 1.0, 1.0,
                HAS_COLUMN_SCALE=False, HAS_SOFTCAP=False, COMPUTE_GRAD=True, DTYPE=TL_DTYPE[dtype],
                BLOCK_V=block_v, GRAD_REVERSED=reversed_, num_warps=num_warps)
        us = triton.testing.do_bench(run, warmup=20, rep=150, return_mode="median") * 1e3
        results.append((us, block_v, num_warps, per_sm, reversed_))
    print(f"rows kernel, {rows} rows x V {vocab} {dtype}, on {torch.cuda.get_device_name()} ({sms} SMs):")
    for us, block_v, num_warps, per_sm, reversed_ in sorted(results):
        grid = "a program per row" if per_sm is None else f"{per_sm} programs per SM"
        order = "reversed" if reversed_ else "in order"
        print(f"  {us:8.1f} us  BLOCK_V {block_v:5d}  num_warps {num_warps:2d}  {grid:18s}  gradient pass {order}")


if __name__ == "__main__":
    main()
