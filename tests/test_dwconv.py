"""dwconv on every backend (tests/conftest.py: backend) against python_ref.functional.dwconv
in float64 on the same dtype-rounded inputs: kernel sizes 1-7 (wider than the map too), ReLU
and residual, every input layout, each case its own test."""
import pytest
import torch

from efficientvit_kernels.testing import (DTYPES, LAYOUTS, assert_close, assert_layout,
                                          call_poisoned, random_dwconv_params, random_input)
from python_ref import functional


# name: (C, K, B, H, W, relu, residual, layout, small)
CASES = {
    "k3_m4": (64, 3, 2, 14, 14, False, True, "contiguous", False),
    "k1": (17, 1, 1, 4, 9, True, False, "channels_last", True),
    "k7_wider_than_map": (24, 7, 1, 3, 8, False, True, "channels_last", True),
    "k5_relu": (20, 5, 2, 7, 5, True, True, "permuted", True),
    "k3_strided": (12, 3, 1, 7, 7, True, False, "strided", True),
    "k3_slice": (10, 3, 2, 5, 6, False, True, "channels_last_slice", True),
    "one_pixel": (8, 3, 1, 1, 1, False, True, "contiguous", True),
    "batch0": (8, 3, 0, 4, 4, False, True, "contiguous", True),
    "c240_k5": (240, 5, 2, 7, 7, False, True, "channels_last", False),
    # channels-last rows of 15 inner pixels (runs of 8, 4, 2 and 1) and channels past the last
    # whole vector
    "k3_runs": (83, 3, 2, 5, 17, True, True, "channels_last", True),
}



def run(backend, C, K, B, H, W, relu, residual, layout, dtype):
    weight, bias = random_dwconv_params(C, K, dtype=dtype)
    x = random_input(B, C, H, W, dtype=dtype, layout=layout, device=backend.device)
    out = call_poisoned(backend.ops.dwconv, x, weight.to(backend.device), bias.to(backend.device),
                        relu, residual)
    assert out.shape == x.shape and out.dtype == dtype
    assert_layout(out, x)
    ref = functional.dwconv(x.cpu().double(), weight.double(), bias.double(), relu, residual)
    assert_close(out, ref, dtype, f"{backend.name} dwconv")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_dwconv(backend, case, dtype):
    *shape, small = CASES[case]
    backend.skip_unless_small(small)
    run(backend, *shape, DTYPES[dtype])  # pairs absent here: deselected (conftest)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dwconv_layouts(backend, layout):
    run(backend, 20, 3, 2, 5, 6, True, True, layout, backend.dtypes[0])


def test_dwconv_nan_propagates(backend):
    dtype = backend.dtypes[0]
    weight, bias = (t.to(backend.device) for t in random_dwconv_params(8, 3, dtype=dtype))
    x = random_input(1, 8, 6, 6, dtype=dtype, device=backend.device)
    x[0, 2, 3, 3] = float("nan")
    out = backend.ops.dwconv(x, weight, bias, True, True)  # the ReLU keeps NaN
    expected = functional.dwconv(x.cpu(), weight.cpu(), bias.cpu(), True, True)
    assert torch.equal(out.isnan().cpu(), expected.isnan()) and out.isnan().sum() == 9


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dwconv_opcheck(backend, layout):
    if not backend.dispatcher:
        pytest.skip(f"{backend.name} is not what torch.ops.efficientvit dispatches to here")
    dtype = backend.dtypes[0]
    weight, bias = (t.to(backend.device) for t in random_dwconv_params(12, 3, dtype=dtype))
    x = random_input(2, 12, 5, 6, dtype=dtype, layout=layout, device=backend.device)
    torch.library.opcheck(torch.ops.efficientvit.dwconv.default, (x, weight, bias, True, True))
