"""``round_fp32`` (kernels/rounding.py), the rounding every kernel applies where eager PyTorch
rounds to a 16-bit dtype, against PyTorch's own casts: bit for bit, over random bit patterns
(every exponent, subnormals, NaNs and infinities among them), exact ties and the edges of each
format's range. Off the GPU this runs the interpreter's integer rounding; on one, the hardware
conversions the compiled kernels use."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import fastft  # noqa: F401  (before triton kernels run: selects the interpreter off the GPU)
from fastft.kernels.rounding import TL_DTYPE, round_fp32

from helpers import DEVICE


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, round_fp32(tl.load(x_ptr + offs, mask=mask), DTYPE), mask=mask)


def _values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(-2 ** 31, 2 ** 31, (1 << 16,), generator=g, dtype=torch.int64).to(torch.int32)
    edges = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45, 1.17e-38, 3.4e38, -3.4e38,
             65504.0, 65519.99, 65520.0, -65520.0, 6.1e-5, 6.0e-5, 5.96e-8, 2.98e-8, 2.99e-8]
    # Exact ties: halfway between two neighbours in bf16 (8 mantissa bits) and fp16 (11), even
    # and odd below.
    ties = [1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 2048.0 + 1.0]
    return torch.cat([patterns.view(torch.float32), torch.tensor(edges + ties),
                      torch.randn(1 << 14, generator=g) * 100]).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_fp32_matches_the_cast(dtype):
    x = _values()
    y = torch.empty_like(x)
    block = 1 << 12
    _round_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), DTYPE=TL_DTYPE[dtype], BLOCK=block)
    want = x.to(dtype).float()
    same = (y.view(torch.int32) == want.view(torch.int32)) | (torch.isnan(y) & torch.isnan(want))
    assert bool(same.all()), (x[~same][:8].tolist(), y[~same][:8].tolist(), want[~same][:8].tolist())


def test_float32_is_left_as_it_is():
    x = _values()
    y = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), DTYPE=tl.float32, BLOCK=4096)
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))
