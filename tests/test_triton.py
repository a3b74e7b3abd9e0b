"""The Triton kernels against python_ref.functional (the spec), evaluated in float64.

Without a GPU they run on CPU tensors in the Triton interpreter, in fp32, on small shapes
(the interpreter is slow). With one, the same cases run on the GPU in fp32, fp16 and bf16
(plus every model stage), each output poisoned with NaN first so an unwritten element fails.
"""
import importlib
import sys

import pytest
import torch

pytest.importorskip("triton")  # conftest.py sets TRITON_INTERPRET=1 where there is no GPU

import efficientvit_kernels  # noqa: E402
import efficientvit_kernels.triton as kernels  # noqa: E402
from cases import (cast, cga_args, random_cga_params, random_dwconv_params, random_ffn_params,  # noqa: E402
                   random_input, reference_cga, relative_error, stage_shapes)
from python_ref import functional  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
# fp32 dots use input_precision="ieee" (no tf32), so fp32 meets the fp32 tolerance.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if GPU else [torch.float32]
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
layouts = pytest.mark.parametrize("channels_last", [False, True],
                                  ids=["contiguous", "channels_last"])


def call(op, x, *args):
    """op(x, *args); on a GPU, first frees a NaN-filled block of the output's size, which the
    caching allocator then hands to the output: an element the kernel misses stays NaN."""
    if GPU:  # freed as soon as it is made: its block goes back to the allocator's cache
        torch.full((x.numel(),), float("nan"), dtype=x.dtype, device=x.device)
    return op(x, *args)


def to_device(t, dtype):
    """t rounded to dtype on DEVICE with t's strides (.to would make a strided view contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=DEVICE).copy_(t)


def check_cga(x, params, dtype, residual=True):
    p = cast(params, dtype, DEVICE)
    xd = to_device(x, dtype)
    out = call(kernels.cga, xd, *cga_args(p), residual)
    assert out.shape == x.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last) == (
        not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))
    # The spec on the rounded inputs: the error measured is the kernel's alone.
    ref = reference_cga(xd.cpu(), cast(p, torch.float64, "cpu"), residual)
    err = relative_error(out.cpu(), ref)
    assert err < TOL[dtype], err


@dtypes
@layouts
@pytest.mark.parametrize("window,B,H,W", [(7, 1, 10, 13), (4, 2, 3, 5), (7, 2, 7, 7), (4, 2, 4, 4)],
                         ids=["pad7", "pad4", "whole7", "whole4"])
def test_cga_windows(window, B, H, W, channels_last, dtype):
    # Value dim 24: not a power of two; kernels differ per head.
    params = random_cga_params(96, 4, (7, 5, 3, 3), window, seed=H * 31 + W)
    check_cga(random_input(B, 96, H, W, channels_last=channels_last), params, dtype)


@dtypes
@pytest.mark.parametrize("heads,kernels,key_dim,d,window,H,W", [
    (3, (5, 3, 3), 16, 24, 7, 9, 8),
    (2, (3, 7), 8, 40, 5, 6, 11),    # key dim below the 16 padding; N = 25
    (4, (3, 3, 1, 5), 16, 32, 4, 5, 3),
], ids=["h3", "h2-kd8-ws5", "h4-k1"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_cga_heads_kernels_residual(heads, kernels, key_dim, d, window, H, W, residual, dtype):
    params = random_cga_params(heads * d, heads, kernels, window, key_dim=key_dim, seed=heads)
    check_cga(random_input(1, heads * d, H, W), params, dtype, residual)


def test_non_contiguous_input():
    # Neither contiguous nor channels-last, and rows are not W pixels apart: the kernels'
    # general strided path, not the flat one (see _common.pixel_offsets).
    x = random_input(2, 32, 16, 12)[:, :, 1:, 1:10]
    xd = to_device(x, torch.float32)
    assert xd.stride() == x.stride() and xd.stride(2) != xd.shape[3] * xd.stride(3)
    check_cga(x, random_cga_params(32, 2, (5, 5), 7), torch.float32)
    w, b = random_dwconv_params(32)
    out = call(kernels.dwconv, xd, *(to_device(t, torch.float32) for t in (w, b)), True, True)
    assert relative_error(out.cpu(), functional.dwconv(x, w, b, True, True)) < TOL[torch.float32]
    ffn = random_ffn_params(32, 48)
    out = call(kernels.ffn, xd, *(to_device(t, torch.float32) for t in ffn), True)
    assert relative_error(out.cpu(), functional.ffn(x, *ffn, True)) < TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="model-sized stages are too slow for the interpreter")
@dtypes
@pytest.mark.parametrize("name,C,heads,kernels,window", stage_shapes(), ids=lambda v: str(v))
def test_cga_every_model_stage(name, C, heads, kernels, window, dtype):
    params = random_cga_params(C, heads, kernels, window)
    size = {7: (14, 14), 4: (4, 4)}[window]
    check_cga(random_input(8, C, *size), params, dtype)


@dtypes
@layouts
@pytest.mark.parametrize("C,K,H,W", [(20, 3, 7, 5), (17, 5, 4, 9), (64, 1, 6, 6), (24, 7, 3, 8)])
def test_dwconv(C, K, H, W, channels_last, dtype):
    weight, bias = random_dwconv_params(C, K, seed=C + K)
    x = random_input(2, C, H, W, channels_last=channels_last)
    xd, w, b = (to_device(t, dtype) for t in (x, weight, bias))
    for relu in (False, True):
        for residual in (False, True):
            out = call(kernels.dwconv, xd, w, b, relu, residual)
            assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
            ref = functional.dwconv(*(t.cpu().double() for t in (xd, w, b)), relu, residual)
            assert relative_error(out.cpu(), ref) < TOL[dtype], (relu, residual)


@dtypes
@layouts
@pytest.mark.parametrize("C,M,B,H,W", [(20, 56, 2, 5, 3), (64, 128, 1, 7, 9), (48, 200, 3, 4, 4)])
def test_ffn(C, M, B, H, W, channels_last, dtype):
    params = [to_device(t, dtype) for t in random_ffn_params(C, M, seed=C)]
    xd = to_device(random_input(B, C, H, W, channels_last=channels_last), dtype)
    for residual in (False, True):
        out = call(kernels.ffn, xd, *params, residual)
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        ref = functional.ffn(*(t.cpu().double() for t in (xd, *params)), residual)
        assert relative_error(out.cpu(), ref) < TOL[dtype], residual


@pytest.mark.skipif(GPU, reason="the GPU runs every case in fp16")
def test_fp16_in_interpreter():
    # The interpreter's dots take fp16 operands with fp32 accumulation, like tensor cores:
    # this checks the kernels' rounding points. (Its bf16 dots and casts are not faithful.)
    dtype = torch.float16
    check_cga(random_input(1, 72, 10, 9), random_cga_params(72, 3, (5, 3, 3), 7), dtype, False)
    x = to_device(random_input(2, 40, 5, 6, channels_last=True), dtype)
    w, b = (to_device(t, dtype) for t in random_dwconv_params(40))
    ref = functional.dwconv(*(t.double() for t in (x, w, b)), True, False)
    assert relative_error(kernels.dwconv(x, w, b, True, False), ref) < TOL[dtype]
    ffn = [to_device(t, dtype) for t in random_ffn_params(40, 88)]
    ref = functional.ffn(*(t.double() for t in (x, *ffn)), False)
    assert relative_error(kernels.ffn(x, *ffn, False), ref) < TOL[dtype]


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy on NaN
def test_nan_propagates():
    x = to_device(random_input(1, 32, 7, 7), torch.float32)
    x[0, 3, 2, 2] = float("nan")
    p = cast(random_cga_params(32, 2, (5, 5), 7), torch.float32, DEVICE)
    assert torch.isnan(kernels.cga(x, *cga_args(p), False)).any()
    w, b = (to_device(t, torch.float32) for t in random_dwconv_params(32))
    assert torch.isnan(kernels.dwconv(x, w, b, True, False)).any()
    ffn = [to_device(t, torch.float32) for t in random_ffn_params(32, 64)]
    assert torch.isnan(kernels.ffn(x, *ffn, False)).any()


def test_empty_batch():
    x = torch.empty(0, 32, 9, 9, device=DEVICE)
    p = cast(random_cga_params(32, 2, (5, 5), 7), torch.float32, DEVICE)
    assert kernels.cga(x, *cga_args(p), True).shape == x.shape
    w, b = (to_device(t, torch.float32) for t in random_dwconv_params(32))
    assert kernels.dwconv(x, w, b, False, True).shape == x.shape
    ffn = [to_device(t, torch.float32) for t in random_ffn_params(32, 64)]
    assert kernels.ffn(x, *ffn, True).shape == x.shape


def test_bad_input():
    x = to_device(random_input(1, 32, 7, 7), torch.float32)
    w, b = (to_device(t, torch.float32) for t in random_dwconv_params(32))
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.dwconv(x, w[:16], b, False, True)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        kernels.dwconv(x.double(), w.double(), b.double(), False, True)
    ffn = [to_device(t, torch.float32) for t in random_ffn_params(32, 64)]
    with pytest.raises(ValueError, match="dtype"):
        kernels.ffn(x, ffn[0].half(), *ffn[1:], True)
    p = cast(random_cga_params(32, 2, (5, 5), 7), torch.float32, DEVICE)
    with pytest.raises(ValueError, match="attention_bias must have shape"):
        kernels.cga(x, *cga_args(p)[:7], 4, p["scale"], True)


def test_import_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.delitem(sys.modules, "efficientvit_kernels.triton")
    monkeypatch.setattr(efficientvit_kernels, "triton", kernels)  # restored afterwards
    fresh = importlib.import_module("efficientvit_kernels.triton")
    assert kernels.available() and not fresh.available()
    with pytest.raises(RuntimeError, match="needs triton"):
        fresh.ffn(None, None, None, None, None)
