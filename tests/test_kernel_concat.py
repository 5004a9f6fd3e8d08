"""Column concatenation (kernels/concat.py), the operands of a GEMM through its depth, against torch.cat."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastft.kernels.concat import concat_columns

from helpers import DEVICE


def _rand(rows, cols, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_cat(dtype):
    parts = [_rand(37, w, dtype, i) for i, w in enumerate((16, 300, 5))]
    out = concat_columns(*parts)
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, torch.cat(parts, dim=1))


def test_parts_are_cast_to_the_first_dtype():
    a, b = _rand(9, 7, torch.bfloat16, 0), _rand(9, 3, torch.float32, 1)
    assert torch.equal(concat_columns(a, b), torch.cat([a, b.to(torch.bfloat16)], dim=1))


def test_strided_views_and_empty_parts():
    wide = _rand(20, 50, torch.float32, 2)
    parts = [wide[:, 10:30], wide.t()[:7].t(), wide[:, :0], wide[:, 49:]]  # row-strided, column-strided, empty
    assert torch.equal(concat_columns(*parts), torch.cat(parts, dim=1))


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(0, 300), widths=st.lists(st.integers(0, 1100), min_size=1, max_size=3),
       seed=st.integers(0, 2 ** 16))
def test_any_shapes(rows, widths, seed):
    parts = [_rand(rows, w, torch.float32, seed + i) for i, w in enumerate(widths)]
    assert torch.equal(concat_columns(*parts), torch.cat(parts, dim=1))


def test_mismatched_rows_are_refused():
    with pytest.raises(ValueError, match="part 1 is \\[4, 2\\]; every part must be 2-D with 3 rows"):
        concat_columns(_rand(3, 2, torch.float32, 0), _rand(4, 2, torch.float32, 1))
