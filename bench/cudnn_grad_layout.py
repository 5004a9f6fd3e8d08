"""Does cuDNN's attention backward depend on the first gradient layout it saw at a shape?

    python3 bench/cudnn_grad_layout.py

Causal grouped-query SDPA in bf16 (q [B, S, H, D] transposed to [B, H, S, D], as models lay it out;
k and v contiguous), under cuDNN only. At each fresh sequence length the backward runs twice: first
with the output's gradient in one layout (the output's own, or contiguous), then in the other.
Prints the rel_l2 error of dq, dk and dv against the math kernel in float64. Wrong gradients on the
second call (rel_l2 ~1) mean the plan cache does not tell the layouts apart, the reason
``fastft.check`` hands each region its gradient in its output's layout. GPU only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _grads(backend, dtype, q, k, v, grad_out):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    return out.stride(), torch.autograd.grad(out, leaves, grad_out.to(dtype))


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    print("| seq | first layout | this call | out strides | grad strides | dq | dk | dv |")
    print("|--:|---|---|---|---|--:|--:|--:|")
    for first, lengths in (("output's", (11, 13)), ("contiguous", (17, 19))):  # fresh shapes for each order
        for seq in lengths:
            q = torch.randn(2, seq, 4, 16, device="cuda").to(torch.bfloat16).transpose(1, 2)
            k, v = (torch.randn(2, 2, seq, 16, device="cuda").to(torch.bfloat16) for _ in range(2))
            g = torch.randn(2, 4, seq, 16, device="cuda").to(torch.bfloat16)
            layouts = {"output's": g.transpose(1, 2).contiguous().transpose(1, 2), "contiguous": g.contiguous()}
            _, want = _grads(SDPBackend.MATH, torch.float64, q, k, v, g)
            for name in (first, *(x for x in layouts if x != first)):
                strides, have = _grads(SDPBackend.CUDNN_ATTENTION, torch.bfloat16, q, k, v, layouts[name])
                errors = " | ".join(f"{_rel(a, b):.4f}" for a, b in zip(have, want))
                print(f"| {seq} | {first} | {name} | {strides} | {layouts[name].stride()} | {errors} |")


if __name__ == "__main__":
    main()
