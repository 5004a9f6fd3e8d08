"""Column concatenation and cast parts (kernels/concat.py), the operands of the LoRA GEMMs,
against torch.cat of eager casts: bit for bit."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastft.kernels.concat import CONCAT_PARTS, MAX_PARTS, cast_parts, concat_columns

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
@given(rows=st.integers(0, 300), widths=st.lists(st.integers(0, 1100), min_size=1, max_size=CONCAT_PARTS + 2),
       seed=st.integers(0, 2 ** 16))
def test_any_shapes(rows, widths, seed):
    parts = [_rand(rows, w, torch.float32, seed + i) for i, w in enumerate(widths)]
    assert torch.equal(concat_columns(*parts), torch.cat(parts, dim=1))


def test_more_parts_than_one_launch_takes():
    """Parts are copied CONCAT_PARTS to a launch, each in tiles of its own shape: narrow and wide
    parts, of two dtypes, more of them than one launch takes."""
    widths = (16, 1030, 3, 16, 64, 1, 2048)
    assert len(widths) > CONCAT_PARTS
    parts = [_rand(33, w, torch.bfloat16 if i % 2 else torch.float32, i) for i, w in enumerate(widths)]
    want = torch.cat([p.float() for p in parts], dim=1)
    assert torch.equal(concat_columns(*parts), want)


def test_mismatched_rows_are_refused():
    with pytest.raises(ValueError, match="part 1 is \\[4, 2\\]; every part must be 2-D with 3 rows"):
        concat_columns(_rand(3, 2, torch.float32, 0), _rand(4, 2, torch.float32, 1))


def _cast_reference(parts, dtype, scales):
    return torch.cat([(p.float() * s).to(dtype).reshape(-1) for p, s in zip(parts, scales)])


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_cast_parts_matches_eager_casts(in_dtype, out_dtype):
    # An adapter group's shapes: three A [r, in] of different ranks, three B [out, r].
    parts = [_rand(r, 40, in_dtype, i) for i, r in enumerate((16, 4, 8))]
    parts += [_rand(o, r, in_dtype, 10 + i) for i, (o, r) in enumerate(((40, 16), (24, 4), (24, 8)))]
    scales = [1.0, 1.0, 1.0, 2.0, 0.3, 1.0]
    out = cast_parts(parts, out_dtype, scales)
    assert out.dtype == out_dtype and out.dim() == 1
    assert torch.equal(out, _cast_reference(parts, out_dtype, scales))
    # Without scales: plain casts; the A's form the row-stacked matrix.
    stacked = cast_parts(parts[:3], out_dtype)
    assert torch.equal(stacked.view(28, 40), torch.cat([p.to(out_dtype) for p in parts[:3]]))


def test_cast_parts_beyond_one_launch_strided_and_empty():
    wide = _rand(30, 20, torch.float32, 3)
    parts = [wide[:, 3:9], wide.t(), wide[:0]] + [_rand(i + 1, 3, torch.float32, i) for i in range(MAX_PARTS + 2)]
    scales = [0.5 + 0.25 * i for i in range(len(parts))]
    assert torch.equal(cast_parts(parts, torch.bfloat16, scales), _cast_reference(parts, torch.bfloat16, scales))


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=MAX_PARTS + 1),
       scale=st.floats(0.01, 100.0), seed=st.integers(0, 2 ** 16))
def test_cast_parts_any_sizes(sizes, scale, seed):
    parts = [_rand(1, n, torch.float32, seed + i)[0] for i, n in enumerate(sizes)]
    scales = [scale if i % 2 else 1.0 for i in range(len(parts))]
    assert torch.equal(cast_parts(parts, torch.bfloat16, scales), _cast_reference(parts, torch.bfloat16, scales))


def test_cast_parts_refuses_bad_input():
    with pytest.raises(ValueError, match="no parts"):
        cast_parts([], torch.bfloat16)
    with pytest.raises(ValueError, match="2 parts but 1 scales"):
        cast_parts([_rand(2, 2, torch.float32, 0)] * 2, torch.bfloat16, [1.0])
    with pytest.raises(ValueError, match="part 1 is torch.int64"):
        cast_parts([_rand(2, 2, torch.float32, 0), torch.ones(3, dtype=torch.int64, device=DEVICE)], torch.bfloat16)
