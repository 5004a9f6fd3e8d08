"""Tests for the fastft::dequantize_4bit Triton kernel (run through the interpreter when there is no
GPU) against bitsandbytes' own quantisation and dequantisation on the CPU.

Tolerance: none. The kernel, the reference and bitsandbytes all compute code * absmax in fp32
(the nested scale as an fp32 multiply, then an fp32 add) and round that product once, to nearest
even, to the output dtype, so every comparison is torch.equal, in fp32, bf16 and fp16 alike.

bitsandbytes quirk the oracle works around: its native AVX-512 CPU kernel for dequantize_4bit
(bitsandbytes 0.50.2) is given the weight as [rows, cols] and picks the wrong absmax when cols is
a multiple of 32 but not of blocksize and there is more than one block (e.g. [64, 96] with
blocksize 64, [16, 96] with 128): it disagrees there with bitsandbytes' own pure-PyTorch backend,
with its CUDA kernel and with quantize_4bit, which all index blocks over the flat weight. Called
with the flat shape [numel] (one row) it indexes blocks right, so the oracle dequantises flat and
reshapes. test_matches_bnb_with_its_shape compares with the unmodified call on shapes it gets
right, and test_round_trip_bound checks the layout without bitsandbytes' dequantisation at all.
"""
import copy
import functools

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from fastft.kernels.nf4 import (  # noqa: E402
    dequantize_4bit,
    dequantize_4bit_forward,
    dequantize_4bit_reference,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (shape, blocksize): numel a multiple of blocksize (the op's requirement), rows that are not a
# multiple of a block, rows shorter than a block, one row, and 300 blocks (two nested blocks of
# 256, the second one short).
CASES = [
    ((24, 40), 64),
    ((3, 64), 64),
    ((1, 128), 64),
    ((64, 96), 64),
    ((300, 64), 64),
    ((24, 48), 128),
    ((3, 128), 128),
    ((1, 128), 128),
    ((16, 96), 128),
]


@functools.lru_cache(maxsize=None)
def _quantised(shape, blocksize, quant_type, nested, seed=0):
    """(weight, packed, quant_state) from bitsandbytes' quantize_4bit on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05
    w[0, 0] = 0.3  # an outlier block, as in trained weights
    packed, qs = bnb_functional.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested,
                                              quant_type=quant_type)
    return w, packed, qs


def _op_args(packed, qs, device):
    """The op's arguments from a QuantState, as the module docstring maps them."""
    args = (packed.to(device), qs.absmax.to(device), qs.code.to(device), qs.blocksize, list(qs.shape))
    kwargs = {}
    if qs.nested:
        kwargs = dict(absmax2=qs.state2.absmax.to(device), code2=qs.state2.code.to(device),
                      nested_blocksize=qs.state2.blocksize, offset=float(qs.offset))
    return args, kwargs


def _reference(packed, qs, dtype):
    nested = (qs.state2.absmax, qs.state2.code, qs.state2.blocksize, qs.offset) if qs.nested else None
    return dequantize_4bit_reference(packed, qs.absmax, qs.code, qs.blocksize, qs.shape, dtype, nested)


def _bnb(packed, qs, dtype, flat=True):
    """bitsandbytes.functional.dequantize_4bit in ``dtype``; flat: through the shape [numel]."""
    qs = copy.copy(qs)
    qs.dtype = dtype
    shape = tuple(qs.shape)
    if flat:
        qs.shape = (packed.numel() * 2,)
    return bnb_functional.dequantize_4bit(packed, qs).reshape(shape)


@pytest.mark.parametrize("shape,blocksize", CASES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
def test_matches_bitsandbytes(device, shape, blocksize, quant_type, nested) -> None:
    _, packed, qs = _quantised(shape, blocksize, quant_type, nested)
    args, kwargs = _op_args(packed, qs, device)
    for dtype in DTYPES:
        expected = _bnb(packed, qs, dtype)
        ref = _reference(packed, qs, dtype)
        out = dequantize_4bit(*args, dtype, **kwargs)
        assert out.shape == shape and out.dtype == dtype and out.is_contiguous()
        assert torch.equal(ref, expected), f"reference != bitsandbytes for {dtype}"
        assert torch.equal(out.cpu(), expected), f"kernel != bitsandbytes for {dtype}"


@pytest.mark.parametrize("shape,blocksize",
                         [((24, 40), 64), ((3, 128), 128), ((300, 64), 64), ((1, 128), 64)])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
def test_matches_bnb_with_its_shape(device, shape, blocksize, nested) -> None:
    """The unmodified bitsandbytes call, on shapes its native CPU kernel indexes right."""
    _, packed, qs = _quantised(shape, blocksize, "nf4", nested)
    args, kwargs = _op_args(packed, qs, device)
    for dtype in DTYPES:
        assert torch.equal(dequantize_4bit(*args, dtype, **kwargs).cpu(), _bnb(packed, qs, dtype, flat=False))


@pytest.mark.parametrize("shape,blocksize", [((64, 96), 64), ((16, 96), 128), ((24, 40), 64)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_bound(device, shape, blocksize, quant_type) -> None:
    """Layout check that needs no dequantiser: each element comes back within half the widest
    gap of the code table, times its own block's absmax (from the original weight), of the weight
    that was quantised. A wrong nibble order or block index breaks this by far."""
    w, packed, qs = _quantised(shape, blocksize, quant_type, False)
    args, kwargs = _op_args(packed, qs, device)
    out = dequantize_4bit(*args, torch.float32, **kwargs).cpu()
    block_absmax = w.reshape(-1, blocksize).abs().amax(dim=1, keepdim=True)
    widest_gap = qs.code.sort().values.diff().max()
    err = (out - w).abs().reshape(-1, blocksize)
    assert (err <= block_absmax * widest_gap / 2 * (1 + 1e-5)).all()
    # and the even element of each byte is in the high nibble: swapping them must fail the bound
    p = args[0]
    swapped = dequantize_4bit((p >> 4) | (p << 4), *args[1:], torch.float32, **kwargs).cpu()
    assert not ((swapped - w).abs().reshape(-1, blocksize) <= block_absmax * widest_gap / 2).all()


@pytest.mark.parametrize("shape,blocks_per_program", [((10, 64), 1), ((10, 64), 4), ((300, 64), 16)])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double_quant"])
def test_tiling(device, shape, blocks_per_program, nested) -> None:
    """Small tiles, with a masked last tile, give the same result as one large tile."""
    _, packed, qs = _quantised(shape, 64, "fp4", nested)
    args, kwargs = _op_args(packed, qs, device)
    expected = _reference(packed, qs, torch.bfloat16)
    out = dequantize_4bit_forward(*args, torch.bfloat16, **kwargs, blocks_per_program=blocks_per_program)
    assert torch.equal(out.cpu(), expected)


def test_packed_layouts_and_empty(device) -> None:
    """packed as bitsandbytes stores it ([n/2, 1]), flat, or as a non-contiguous view; and an
    empty weight."""
    _, packed, qs = _quantised((24, 40), 64, "nf4", False)
    args, kwargs = _op_args(packed, qs, device)
    expected = _reference(packed, qs, torch.float16)
    p = args[0]
    strided = torch.stack((p.reshape(-1), p.reshape(-1)), dim=1)[:, 0]
    for layout in (p, p.reshape(-1), p.reshape(24, 20), strided):
        assert torch.equal(dequantize_4bit(layout, *args[1:], torch.float16, **kwargs).cpu(), expected)
    empty = dequantize_4bit(p[:0], args[1][:0], args[2], 64, [0, 40], torch.bfloat16)
    assert empty.shape == (0, 40) and empty.dtype == torch.bfloat16


def test_fp16_range(device) -> None:
    """Large scales: values beyond fp16's range become inf, as a cast of the fp32 product does."""
    _, packed, qs = _quantised((3, 64), 64, "nf4", False)
    args, _ = _op_args(packed, qs, device)
    absmax = torch.tensor([1.0, 7e4, 1e-6], device=device)
    out = dequantize_4bit(args[0], absmax, *args[2:], torch.float16).cpu()
    ref = dequantize_4bit_reference(packed, absmax.cpu(), qs.code, 64, (3, 64), torch.float16)
    assert torch.equal(out, ref) and torch.isinf(out[1]).any()


def test_compile_and_no_grad_flow(device) -> None:
    """Traces as one opaque op under torch.compile (fullgraph); the output is a plain tensor:
    the 4-bit weight is frozen, nothing requires grad."""
    _, packed, qs = _quantised((24, 48), 128, "nf4", True)
    args, kwargs = _op_args(packed, qs, device)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(*a, **k):
        return dequantize_4bit(*a, torch.bfloat16, **k) * 2

    out = f(*args, **kwargs)
    assert torch.equal(out.cpu(), _reference(packed, qs, torch.bfloat16) * 2)
    assert not out.requires_grad


def test_opcheck(device) -> None:
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    op = torch.ops.fastft.dequantize_4bit.default
    for nested in (False, True):
        _, packed, qs = _quantised((24, 40), 64, "fp4", nested)
        args, kwargs = _op_args(packed, qs, device)
        torch.library.opcheck(op, (*args, torch.bfloat16), kwargs, test_utils=tests)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
def _nested_args():
    _, packed, qs = _quantised((24, 40), 64, "nf4", True)
    return _op_args(packed, qs, "cpu")


def _plain_args():
    _, packed, qs = _quantised((24, 40), 64, "nf4", False)
    return _op_args(packed, qs, "cpu")


def _call(args, kwargs, dtype=torch.bfloat16, **changes):
    names = ("packed", "absmax", "code", "blocksize", "shape")
    a = dict(zip(names, args), **kwargs)
    a.update(changes)
    return dequantize_4bit(a.pop("packed"), a.pop("absmax"), a.pop("code"), a.pop("blocksize"),
                           a.pop("shape"), dtype, **a)


@pytest.mark.parametrize(
    "changes,dtype,match",
    [
        (dict(packed="int8"), torch.bfloat16, "packed must be uint8"),
        (dict(packed="bf16"), torch.bfloat16, "packed must be uint8"),
        (dict(shape=[24, 41]), torch.bfloat16, "480 bytes = 960 4-bit codes, but shape"),
        (dict(blocksize=48), torch.bfloat16, "blocksize must be a power of two"),
        (dict(shape=[30, 32], blocksize=128), torch.bfloat16, "does not divide the 960 elements"),
        (dict(), torch.float64, "dtype has unsupported dtype torch.float64"),
        (dict(absmax="short"), torch.bfloat16, "absmax has 14 entries, but 960 elements"),
        (dict(code="short"), torch.bfloat16, "16-entry float32 table"),
        (dict(absmax="u8"), torch.bfloat16, "uint8 absmax is double-quantised"),
        (dict(offset=0.5), torch.bfloat16, "describe double quantisation"),
    ],
)
def test_errors(changes, dtype, match) -> None:
    args, kwargs = _plain_args()
    packed, absmax, code = args[:3]
    replace = {
        "int8": packed.view(torch.int8),
        "bf16": packed.reshape(-1).view(torch.bfloat16),
        "short": None,
        "u8": absmax.to(torch.uint8),
    }
    for k, v in list(changes.items()):
        if isinstance(v, str):
            if v == "short":
                changes[k] = {"absmax": absmax[:-1], "code": code[:-1]}[k]
            else:
                changes[k] = replace[v]
    with pytest.raises(ValueError, match=match):
        _call(args, kwargs, dtype, **changes)


@pytest.mark.parametrize(
    "drop,changes,match",
    [
        ("code2", {}, "absmax2 was given without code2"),
        ("absmax2", {}, "code2 was given without absmax2"),
        (None, dict(nested_blocksize=0), "nested_blocksize is 0"),
        (None, dict(absmax="float"), "absmax holds uint8 codes"),
        (None, dict(absmax2="long"), "absmax2 must be float32 with one entry per 256 blocks"),
    ],
)
def test_nested_errors(drop, changes, match) -> None:
    args, kwargs = _nested_args()
    if drop:
        kwargs.pop(drop)
    if changes.get("absmax") == "float":
        changes["absmax"] = args[1].float()
    if changes.get("absmax2") == "long":
        changes["absmax2"] = torch.cat((kwargs["absmax2"], kwargs["absmax2"]))
    with pytest.raises(ValueError, match=match):
        _call(args, kwargs, **changes)
    # the fake impl validates the same way (errors surface at trace time under torch.compile)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(ValueError, match=match):
        _call(args, kwargs, **changes)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_offset_read_from_a_tensor(device, quant_type) -> None:
    """The captured graph holds the offset as a 0-d device tensor: the launcher reads it there
    and gives the same bits as with the Python float."""
    _, packed, qs = _quantised((24, 64), 64, quant_type, True)
    args, kwargs = _op_args(packed, qs, device)
    expected = dequantize_4bit_forward(*args, torch.bfloat16, **kwargs)
    kwargs["offset"] = qs.offset.to(device)
    assert torch.equal(dequantize_4bit_forward(*args, torch.bfloat16, **kwargs), expected)
    with pytest.raises(ValueError, match="tensor offset"):
        dequantize_4bit_forward(*args, torch.bfloat16, **{**kwargs, "offset": torch.zeros(2, device=device)})
