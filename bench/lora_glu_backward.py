"""A LoRA MLP's GLU backward with the adapters' products of dg, du and h in the same pass
(kernels/lora_glu.py ``lora_glu_backward``) against what kernels/lora.py ran before it: the GLU
backward writing dg, du and h, ``adapter_grads`` over dg and over du, and the GEMM dyb_d^T h for
the down adapter's dA.

    python3 bench/lora_glu_backward.py [--rows 8192] [--width 8192] [--rank 16]

bf16, SiLU, eager bf16 roundings (the 1B LoRA step's MLP: 8,192 tokens, width 8,192). Each
variant: the default tiles and the alternatives below, median us in a CUDA graph
(``triton.testing.do_bench_cudagraph``: as the training step replays them, no host launch cost),
and the largest difference from the unfused ops' results relative to their largest value. GPU only.
"""
from __future__ import annotations

import argparse

import torch
import triton

import fastft  # noqa: F401  (registers the ops)
from fastft.kernels import lora_glu
from fastft.kernels.adapter_grads import Tiles, adapter_grads, sum_partials
from fastft.kernels.glu import glu_backward, glu_backward_and_output

ALTERNATIVES = (
    Tiles(64, 64, 4, 4, 2), Tiles(64, 64, 4, 3, 3), Tiles(64, 64, 4, 3, 1), Tiles(64, 32, 4, 3, 2),
    Tiles(64, 32, 4, 4, 3), Tiles(64, 64, 8, 3, 2), Tiles(128, 64, 8, 3, 1), Tiles(64, 64, 4, 5, 2),
    Tiles(64, 128, 8, 3, 1),
)
# With dA_d alone in the GLU pass (the gate and up products by adapter_grads after it).
DA_ONLY = (
    Tiles(64, 128, 8, 3, 1), Tiles(32, 128, 4, 3, 2, True),
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    dt, r, rows, width = torch.bfloat16, args.rank, args.rows, args.width
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dt)

    dh, g, u = rand(rows, width), rand(rows, width), rand(rows, width)
    xa = rand(rows, 2 * r)
    xg, xu = xa[:, :r], xa[:, r:]
    bg, bu = rand(width, r, scale=r ** -0.5), rand(width, r, scale=r ** -0.5)
    dybd = rand(rows, r)
    sg, su = 0.5, 2.0

    def unfused():
        dg, du, h = glu_backward_and_output(dh.clone(), g, u, "silu", dt, dt, h_over_dout=True)
        dyb = dh.new_empty((rows, 2 * r))
        _, db_g = adapter_grads(dg, bg, xa[:, :r], sg, dyb_out=dyb[:, :r], db_dtype=torch.float32)
        _, db_u = adapter_grads(du, bu, xa[:, r:], su, dyb_out=dyb[:, r:], db_dtype=torch.float32)
        da = torch.mm(dybd.t(), h, out_dtype=torch.float32)
        return dg, du, dyb, db_g, db_u, da

    def fused(tiles=None):
        dyb, pending = dh.new_empty((rows, 2 * r)), []
        res = lora_glu.lora_glu_backward(dh.clone(), g, u, xg, xu, bg, bu, dybd, sg, su, "silu", dt, dt, dyb,
                                         pending, dg_over_dh=True, tiles=tiles)
        sum_partials(pending)
        return res.dg, res.du, dyb, res.db_gate, res.db_up, res.da_down

    def da_only(tiles=None):
        dyb, pending = dh.new_empty((rows, 2 * r)), []
        res = lora_glu.lora_glu_backward(dh.clone(), g, u, xg, xu, bg, bu, dybd, sg, su, "silu", dt, dt, None,
                                         pending, dg_over_dh=True, tiles=tiles)
        sum_partials(pending)
        _, db_g = adapter_grads(res.dg, bg, xg, sg, dyb_out=dyb[:, :r], db_dtype=torch.float32)
        _, db_u = adapter_grads(res.du, bu, xu, su, dyb_out=dyb[:, r:], db_dtype=torch.float32)
        return res.dg, res.du, dyb, db_g, db_u, res.da_down

    def timed(fn) -> float:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3

    def clone_cost():  # both variants clone dh (the kernels overwrite it): timed alone, subtracted
        dh.clone()

    want = unfused()

    def err(have) -> float:
        return max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item() for a, b in zip(have, want))

    t_clone = timed(clone_cost)
    print(f"[{rows}, {width}] r{r} bf16 silu; dh clone {t_clone:.1f} us subtracted from each")
    print(f"| variant | us | max rel diff vs unfused |")
    print("|---|--:|--:|")
    print(f"| unfused (GLU backward + h, adapter_grads x2, dA GEMM) | {timed(unfused) - t_clone:.1f} | 0 |", flush=True)
    print(f"| GLU backward alone (dg, du; a floor) | {timed(lambda: glu_backward(dh, g, u, 'silu', dt)):.1f} | - |",
          flush=True)
    print(f"| fused, default {tuple(lora_glu.BACKWARD_GPU_TILES)} | {timed(fused) - t_clone:.1f} "
          f"| {err(fused()):.1e} |", flush=True)
    for tiles in ALTERNATIVES:
        try:
            t = timed(lambda: fused(tiles)) - t_clone
            print(f"| fused {tuple(tiles)} | {t:.1f} | {err(fused(tiles)):.1e} |", flush=True)
        except Exception as e:  # a configuration that does not fit the GPU's shared memory or registers
            print(f"| fused {tuple(tiles)} | failed: {type(e).__name__}: {str(e)[:100]} | |", flush=True)
    for tiles in DA_ONLY:
        try:
            t = timed(lambda: da_only(tiles)) - t_clone
            print(f"| dA_d alone in the pass {tuple(tiles)}, then adapter_grads x2 | {t:.1f} "
                  f"| {err(da_only(tiles)):.1e} |", flush=True)
        except Exception as e:
            print(f"| dA_d alone {tuple(tiles)} | failed: {type(e).__name__}: {str(e)[:100]} | |", flush=True)


if __name__ == "__main__":
    main()
