"""A LoRA backward's two products of dY, fused into one pass (kernels/adapter_grads.py) against
the two GEMMs that each read dY (what kernels/lora.py ran before):

    python3 bench/adapter_grads.py [--rank 16]

dyb = dY (s B) and dB = s dY^T (X A^T), bf16, for the dY shapes of the 1B LoRA step (gate/up
[8192, 8192], q/o/down [8192, 2048], k/v [8192, 512]) and of the 8B QLoRA step ([2048, 14336],
[2048, 4096]); each with the default tiles and the alternatives below, the largest relative
difference from the float64 products, and the time one read of dY takes at 4.8 TB/s (the H200's
peak) for scale. GPU only (``triton.testing.do_bench_cudagraph``: replayed in a CUDA graph as the training step
runs them, so the host's launch cost is not counted; median us).
"""
from __future__ import annotations

import argparse

import torch
import triton

import fastft  # noqa: F401  (registers the ops)
from fastft.kernels import adapter_grads as ag

SHAPES = ((8192, 8192), (8192, 2048), (8192, 512), (2048, 14336), (2048, 4096))
ALTERNATIVES = (
    ag.Tiles(64, 256, 8, 3, 2), ag.Tiles(64, 256, 8, 2, 2), ag.Tiles(32, 256, 4, 4, 3), ag.Tiles(64, 128, 4, 3, 3),
    ag.Tiles(128, 128, 8, 3, 2), ag.Tiles(64, 512, 8, 2, 1), ag.Tiles(128, 256, 8, 2, 1),
    ag.Tiles(64, 256, 8, 3, 2, True), ag.Tiles(64, 256, 4, 3, 2, True), ag.Tiles(64, 128, 4, 3, 4, True),
)


def _rel_err(have: torch.Tensor, want: torch.Tensor) -> float:
    return ((have.double() - want).abs().max() / want.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    dt, r, s = torch.bfloat16, args.rank, 0.5
    print(f"| dY | two GEMMs us | fused, default tiles us | best alternative | one read at 4.8 TB/s us | max rel err |")
    print("|---|--:|--:|---|--:|--:|")
    for rows, n in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        dy = torch.randn(rows, n, device="cuda", generator=g).to(dt)
        b = (torch.randn(n, r, device="cuda", generator=g) * r ** -0.5).to(dt)
        xa = torch.randn(rows, r, device="cuda", generator=g).to(dt)

        def gemms():
            torch.mm(dy, b)
            torch.mm(dy.t(), xa, out_dtype=torch.float32).mul_(s)

        def timed(fn) -> float:  # in a CUDA graph, as the training step runs them: no host launch cost
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3

        t_gemms = timed(gemms)
        t_default = timed(lambda: ag.adapter_grads(dy, b, xa, s, db_dtype=torch.float32))
        exact_dyb, exact_db = dy.double() @ b.double(), (dy.double().t() @ xa.double()) * s
        dyb, db = ag.adapter_grads(dy, b, xa, s, db_dtype=torch.float32)
        err = max(_rel_err(dyb, exact_dyb), _rel_err(db, exact_db))
        alternatives = []
        for tiles in ALTERNATIVES:
            try:
                t = timed(lambda: ag.adapter_grads(dy, b, xa, s, db_dtype=torch.float32, tiles=tiles))
                dyb, db = ag.adapter_grads(dy, b, xa, s, db_dtype=torch.float32, tiles=tiles)
                err = max(err, _rel_err(dyb, exact_dyb), _rel_err(db, exact_db))
            except Exception as e:  # a configuration that does not fit the GPU's shared memory
                print(f"  {tuple(tiles)} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            alternatives.append((t, tiles))
        best = min(alternatives, default=None, key=lambda a: a[0])
        best_text = f"{best[0]:.1f} us {tuple(best[1])}" if best else "-"
        print(f"| [{rows}, {n}] | {t_gemms:.1f} | {t_default:.1f} | {best_text} | {rows * n * 2 / 4.8e6:.1f} "
              f"| {err:.1e} |", flush=True)
        print("  all: " + "; ".join(f"{tuple(t)} {ms:.1f}" for ms, t in alternatives), flush=True)


if __name__ == "__main__":
    main()
