"""cga on every backend (tests/conftest.py: backend) against python_ref.functional.cga in
float64 on the same dtype-rounded inputs: random weights and attention biases, padded and
whole-map windows, odd value dims and kernels, every input layout, each case its own test."""
import pytest
import torch

from efficientvit_kernels.testing import (DTYPES, LAYOUTS, assert_close, assert_layout,
                                          call_poisoned, cast, cga_args, random_cga_params,
                                          random_input, reference_cga, stage_shapes)


# name: (C, heads, kernels, key_dim, window, B, H, W, residual, layout, small)
CASES = {
    "whole_7x7": (64, 4, (7, 5, 3, 3), 16, 7, 2, 7, 7, True, "contiguous", True),
    "padded_7x7": (48, 3, (7, 5, 3), 16, 7, 1, 10, 13, True, "channels_last", True),
    "padded_4x4_d10": (40, 4, (5, 3, 3, 1), 16, 4, 2, 6, 5, False, "permuted", True),
    "heads8_d3": (24, 8, (3,) * 8, 8, 3, 1, 7, 8, True, "strided", True),
    "kd4_kernel1": (60, 5, (5, 3, 3, 1, 1), 4, 7, 1, 7, 9, False, "channels_last_slice", True),
    "one_pixel": (32, 2, (3, 3), 16, 7, 1, 1, 1, True, "contiguous", True),
    "batch0": (16, 2, (3, 3), 16, 4, 0, 4, 4, True, "channels_last", True),
    "window_2": (16, 2, (3, 1), 8, 2, 1, 5, 3, True, "contiguous", True),
    "window_14": (64, 2, (5, 3), 16, 14, 1, 14, 14, True, "channels_last", False),
    "m4_stage3": (384, 4, (7, 5, 3, 3), 16, 4, 1, 4, 4, True, "contiguous", False),
    "batch16": (64, 4, (7, 5, 3, 3), 16, 7, 16, 14, 14, True, "channels_last", False),
}


def run(backend, C, heads, kernels, key_dim, window, B, H, W, residual, layout, dtype, seed=0):
    params = random_cga_params(C, heads, kernels, window, key_dim=key_dim, seed=seed, dtype=dtype)
    x = random_input(B, C, H, W, dtype=dtype, layout=layout, device=backend.device)
    p = cast(params, dtype, backend.device)
    out = call_poisoned(backend.ops.cga, x, *cga_args(p), residual)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert_layout(out, x)
    assert_close(out, reference_cga(x.cpu(), cast(p, torch.float64), residual), dtype,
                 f"{backend.name} cga")
    return out



@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_cga(backend, case, dtype):
    *shape, small = CASES[case]
    backend.skip_unless_small(small)
    run(backend, *shape, DTYPES[dtype])  # pairs absent here: deselected (conftest)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cga_layouts(backend, layout):
    run(backend, 40, 4, (5, 3, 3, 1), 16, 4, 2, 6, 5, True, layout, backend.dtypes[0])


@pytest.mark.parametrize("name,C,heads,kernels,window", stage_shapes(), ids=lambda v: str(v))
def test_cga_every_model_stage(backend, name, C, heads, kernels, window):
    backend.skip_unless_small(False)
    size = {7: 14, 4: 4}.get(window, 2 * window)
    run(backend, C, heads, kernels, 16, window, 2, size, size, True, "channels_last", backend.dtypes[0])


@pytest.mark.parametrize("where", ["full_window", "padded_window", "edge", "attention_bias"])
def test_cga_nan_where_the_reference_has_nan(backend, where):
    """A NaN in x (in a full or a padded window) or in one attention bias reaches exactly the
    outputs it reaches in the reference: no softmax trick may drop it."""
    dtype = backend.dtypes[0]
    p = cast(random_cga_params(32, 2, (5, 3), 7), dtype, backend.device)
    x = random_input(1, 32, 9, 9, dtype=dtype, device=backend.device)
    if where == "attention_bias":
        p["attention_bias"] = p["attention_bias"].clone()
        p["attention_bias"][1, 6, 6] = float("nan")
    else:
        x[{"full_window": (0, 3, 0, 0), "padded_window": (0, 20, 8, 8), "edge": (0, 31, 4, 8)}[where]] = float("nan")
    out = backend.ops.cga(x, *cga_args(p), True)
    expected = reference_cga(x.cpu(), cast(p, torch.float64), True)
    assert out.isnan().any() and torch.equal(out.isnan().cpu(), expected.isnan())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cga_opcheck(backend, layout):
    """The dispatcher op on this backend's device: schema, fake (shapes and strides), autograd
    registration and AOT dispatch agree with the kernel, for every input layout."""
    if not backend.dispatcher:
        pytest.skip(f"{backend.name} is not what torch.ops.efficientvit dispatches to here")
    dtype = backend.dtypes[0]
    p = cast(random_cga_params(40, 4, (5, 3, 3, 1), 4), dtype, backend.device)
    x = random_input(2, 40, 6, 5, dtype=dtype, layout=layout, device=backend.device)
    torch.library.opcheck(torch.ops.efficientvit.cga.default, (x, *cga_args(p), True))
