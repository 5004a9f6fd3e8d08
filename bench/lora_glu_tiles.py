"""Time the LoRA GLU kernel (kernels/lora_glu.py) over tile configurations against the unfused
ops it replaces (``addmm_`` of each correction, then the GLU kernel), at one MLP's size.

    python3 bench/lora_glu_tiles.py [--rows 8192] [--width 8192] [--rank 16] [--quick]

Prints one line per configuration: median ms (``triton.testing.do_bench``) and the max abs
difference from the unfused result. GPU only; the pick goes into ``kernels/lora_glu.py``'s
GPU_TILES with the device, date and command.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton

import fastft  # noqa: F401  (registers the ops)
from fastft.kernels.glu import glu_forward
from fastft.kernels.lora_glu import lora_glu_forward


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="32 or 64 rows x 64 or 128 columns only")
    args = ap.parse_args()
    rows, width, r = args.rows, args.width, args.rank
    dt = torch.bfloat16

    def rand(*s, scale=1.0):
        return (torch.randn(*s, device="cuda") * scale).to(dt)

    g, u, xa = rand(rows, width), rand(rows, width), rand(rows, 2 * r)
    bg, bu = rand(width, r, scale=r ** -0.5), rand(width, r, scale=r ** -0.5)
    rest = (xa[:, :r], xa[:, r:], bg, bu, 0.5, 2.0, "silu", None, dt)

    def unfused():
        gc = g.clone().addmm_(xa[:, :r], bg.t(), alpha=0.5)  # the clone stands for the GEMM's output
        uc = u.clone().addmm_(xa[:, r:], bu.t(), alpha=2.0)
        return glu_forward(gc, uc, "silu", None, dt)

    def copies():
        return g.clone(), u.clone()

    ref = unfused()
    t_copies = triton.testing.do_bench(copies)
    print(f"{rows} x {width}, rank {r}, bf16, {torch.cuda.get_device_name()}; times less two clones "
          f"({t_copies:.3f} ms) that stand for the gate and up GEMMs' outputs")
    print(f"unfused (2 addmm_ + glu): {triton.testing.do_bench(unfused) - t_copies:.3f} ms")
    print("rows  cols  warps    ms    max|diff|")
    shapes = itertools.product((32, 64), (64, 128), (4, 8)) if args.quick else \
        itertools.product((16, 32, 64, 128), (64, 128, 256), (4, 8))
    for block_rows, block_n, warps in shapes:
        tiles = dict(BLOCK_ROWS=block_rows, BLOCK_N=block_n, num_warps=warps)
        try:
            h = lora_glu_forward(g.clone(), u.clone(), *rest, tiles=tiles)
            t = triton.testing.do_bench(lambda: lora_glu_forward(*copies(), *rest, tiles=tiles)) - t_copies
        except Exception as e:  # a config the compiler refuses (registers, shared memory) is skipped
            print(f"{block_rows:4d} {block_n:5d} {warps:6d}  failed: {type(e).__name__}")
            continue
        print(f"{block_rows:4d} {block_n:5d} {warps:6d} {t:6.3f}  {(h.float() - ref.float()).abs().max().item():8.3g}",
              flush=True)


if __name__ == "__main__":
    main()
