"""Time each GEMM of one LoRA decoder layer's training step at its own shape, as cuBLAS runs it,
and a few ways of grouping them, to see where the step's GEMM time goes.

    python3 bench/layer_gemms.py [--tokens 8192] [--hidden 2048] [--width 8192] [--heads 32]
                                 [--kv-heads 8] [--rank 16]

Defaults: the Llama-3.2-1B layer at batch 4 x 2048. Each line: microseconds (median of CUDA-graph
replays, ``triton.testing.do_bench_cudagraph``) and TFLOP/s. "+=" marks a GEMM accumulating into
its output (beta = 1), as the LoRA ops' ``addmm_`` does. GPU only.
"""
from __future__ import annotations

import argparse

import torch
import triton


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/layer_gemms.py times GPU GEMMs: no GPU here")
    t, h, w, r = args.tokens, args.hidden, args.width, args.rank
    kv = h * args.kv_heads // args.heads

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    x, xq = rand(t, h), rand(t, h + 3 * r)
    rows = []

    def case(name: str, a: torch.Tensor, b: torch.Tensor, acc: bool = False) -> None:
        out = torch.empty(a.shape[0], b.shape[1], device="cuda", dtype=a.dtype)
        fn = (lambda: out.addmm_(a, b)) if acc else (lambda: torch.mm(a, b, out=out))
        us = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
        flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        rows.append((name, f"[{a.shape[0]}, {a.shape[1]}] @ [{b.shape[0]}, {b.shape[1]}]" + (" +=" if acc else ""),
                     us, flops / us / 1e6))

    # Forward
    case("q", x, rand(h, h).t())
    case("k (or v)", x, rand(kv, h).t())
    case("q, k, v in one GEMM", x, rand(h + 2 * kv, h).t())
    case("q, k, v through the depth", xq, rand(h + 2 * kv, h + 3 * r).t())
    case("rank-r correction of q", rand(t, r), rand(h, r).t(), acc=True)
    case("rank-r correction of k", rand(t, r), rand(kv, r).t(), acc=True)
    case("o", x, rand(h, h).t())
    case("gate (or up), plain", x, rand(w, h).t())
    case("gate (or up) through the depth", rand(t, h + r), rand(w, h + r).t())
    case("gate and up in one GEMM", x, rand(2 * w, h).t())
    case("down", rand(t, w), rand(h, w).t())
    case("rank-r correction of down", rand(t, r), rand(h, r).t(), acc=True)
    # Backward: input gradients (the bases are frozen: no dW) and the adapters' dA
    case("dx of q", rand(t, h), rand(h, h))
    case("dx of k (or v)", rand(t, kv), rand(kv, h), acc=True)
    case("dx of q, k, v in one GEMM", rand(t, h + 2 * kv), rand(h + 2 * kv, h))
    case("dx of gate", rand(t, w), rand(w, h))
    case("dx of up", rand(t, w), rand(w, h), acc=True)
    case("dx of gate and up in one GEMM", rand(t, 2 * w), rand(2 * w, h))
    case("dx of down through the depth", rand(t, h + r), rand(h + r, w))
    case("dA of q, k, v", rand(3 * r, t), x)
    case("dA of down", rand(r, t), rand(t, w))
    print(f"one layer's GEMMs: {t} tokens, hidden {h}, MLP {w}, kv {kv}, rank {r}, bf16, "
          f"{torch.cuda.get_device_name()}")
    for name, shape, us, tflops in rows:
        print(f"  {us:8.1f} us {tflops:6.0f} TFLOP/s  {name:32s} {shape}")


if __name__ == "__main__":
    main()
