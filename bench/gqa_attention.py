"""Time SDPA's forward + backward at one grouped-query attention layer's shapes, with the key and
value heads repeated before the call (what a model that passes a mask does) and unrepeated with
``enable_gqa=True`` (what the causal-mask rewrite now calls), each under the default dispatch and
forced to cuDNN and to flash; then compare the two calls' outputs and gradients.

    python3 bench/gqa_attention.py [--batch 4] [--seq 2048] [--heads 32] [--kv-heads 8] [--dim 64]

GPU only. Medians of ``triton.testing.do_bench`` in ms; a backend that refuses a call says so.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gqa_attention.py times GPU kernels: no GPU here")
    n = a.heads // a.kv_heads

    def leaf(heads):
        return torch.randn(a.batch, heads, a.seq, a.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    q, k, v = leaf(a.heads), leaf(a.kv_heads), leaf(a.kv_heads)
    grad_out = torch.randn(a.batch, a.heads, a.seq, a.dim, device="cuda", dtype=torch.bfloat16)

    def repeat(t):
        return t[:, :, None].expand(a.batch, a.kv_heads, n, a.seq, a.dim).reshape(a.batch, a.heads, a.seq, a.dim)

    def repeated():
        out = F.scaled_dot_product_attention(q, repeat(k), repeat(v), is_causal=True)
        out.backward(grad_out)
        return out

    def grouped():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(grad_out)
        return out

    print(f"SDPA fwd+bwd, q [{a.batch}, {a.heads}, {a.seq}, {a.dim}], {a.kv_heads} kv heads, bf16, causal, "
          f"on {torch.cuda.get_device_name()} (ms):")
    for backend in (None, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        for label, fn in (("repeated k, v", repeated), ("enable_gqa", grouped)):
            name = "default" if backend is None else backend.name
            try:
                if backend is None:
                    ms = triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
                else:
                    with sdpa_kernel(backend):
                        ms = triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
                print(f"  {name:16s} {label:14s} {ms:.3f}")
            except RuntimeError as e:
                print(f"  {name:16s} {label:14s} refused: {str(e).splitlines()[0][:120]}")
    results = []
    for fn in (repeated, grouped):
        for t in (q, k, v):
            t.grad = None
        out = fn()
        results.append((out.detach(), q.grad.clone(), k.grad.clone(), v.grad.clone()))
    diffs = [(x - y).abs().max().item() for x, y in zip(*results)]
    print("max |difference| out, dq, dk, dv: " + ", ".join(f"{d:.3g}" for d in diffs))


if __name__ == "__main__":
    main()
