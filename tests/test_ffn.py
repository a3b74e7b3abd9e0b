"""ffn on every backend (tests/conftest.py: backend) against python_ref.functional.ffn in
float64 on the same dtype-rounded inputs: hidden widths below, at and past a tile, the M0-M5
widths, every input layout, each case its own test."""
import pytest
import torch

from efficientvit_kernels.testing import (DTYPES, LAYOUTS, assert_close, assert_layout,
                                          call_poisoned, random_ffn_params, random_input)
from python_ref import functional


# name: (C, M, B, H, W, residual, layout, small)
CASES = {
    "m4_stage1": (128, 256, 2, 14, 14, True, "channels_last", False),
    "hidden7": (20, 7, 1, 5, 3, True, "contiguous", True),
    "hidden200": (48, 200, 3, 4, 4, False, "permuted", True),
    "strided": (24, 40, 1, 5, 7, True, "strided", True),
    "slice": (16, 48, 2, 3, 3, True, "channels_last_slice", True),
    "m5_stage3": (384, 768, 1, 4, 4, False, "channels_last", False),
    "batch16": (64, 128, 16, 4, 4, True, "contiguous", False),
    "batch0": (8, 16, 0, 2, 2, True, "contiguous", True),
}



def run(backend, C, M, B, H, W, residual, layout, dtype):
    weights = random_ffn_params(C, M, seed=C + M, dtype=dtype)
    x = random_input(B, C, H, W, dtype=dtype, layout=layout, device=backend.device)
    out = call_poisoned(backend.ops.ffn, x, *(t.to(backend.device) for t in weights), residual)
    assert out.shape == x.shape and out.dtype == dtype
    assert_layout(out, x)
    ref = functional.ffn(x.cpu().double(), *(t.double() for t in weights), residual)
    assert_close(out, ref, dtype, f"{backend.name} ffn")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_ffn(backend, case, dtype):
    *shape, small = CASES[case]
    backend.skip_unless_small(small)
    run(backend, *shape, DTYPES[dtype])  # pairs absent here: deselected (conftest)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ffn_layouts(backend, layout):
    run(backend, 24, 40, 2, 5, 6, True, layout, backend.dtypes[0])


def test_ffn_nan_stays_in_its_pixel(backend):
    dtype = backend.dtypes[0]
    weights = [t.to(backend.device) for t in random_ffn_params(16, 32, dtype=dtype)]
    x = random_input(2, 16, 3, 4, dtype=dtype, device=backend.device)
    x[1, 3, 2, 1] = float("nan")
    out = backend.ops.ffn(x, *weights, True)
    assert out[1, :, 2, 1].isnan().all() and out.isnan().sum() == 16


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ffn_opcheck(backend, layout):
    if not backend.dispatcher:
        pytest.skip(f"{backend.name} is not what torch.ops.efficientvit dispatches to here")
    dtype = backend.dtypes[0]
    weights = [t.to(backend.device) for t in random_ffn_params(16, 40, dtype=dtype)]
    x = random_input(2, 16, 5, 6, dtype=dtype, layout=layout, device=backend.device)
    torch.library.opcheck(torch.ops.efficientvit.ffn.default, (x, *weights, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("C", [64, 24, 20])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_ffn_residual_rounds_as_a_separate_add(C, dtype, layout):
    """The residual joins the finished sums (adding it first would round every multiply-add at
    the residual's magnitude), whether the kernel writes the output itself or copies it."""
    w = [t.to(dtype) for t in random_ffn_params(C, 2 * C, seed=C)]
    x = random_input(3, C, 7, 9, layout=layout, dtype=dtype) * 10
    ffn = torch.ops.efficientvit.ffn
    assert torch.equal(ffn(x, *w, True), ffn(x, *w, False) + x)
