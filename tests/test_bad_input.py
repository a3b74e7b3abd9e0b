"""Bad input raises an error that names the problem, from the C++ kernels and the fake impls."""
import pytest
import torch

import efficientvit_kernels  # noqa: F401
from cases import cast, cga_args, random_cga_params, random_dwconv_params, random_ffn_params, random_input

ops = torch.ops.efficientvit


def args_with(**changes):
    p = cast(random_cga_params(32, 2, (5, 3), 7), torch.float32)
    p["x"] = random_input(1, 32, 9, 9).float()
    p.update(changes)
    return (p["x"], *cga_args(p), True)


def _bad_cga_cases():
    p = cast(random_cga_params(32, 2, (5, 3), 7), torch.float32)
    return {
        "channels": (args_with(x=torch.randn(1, 30, 9, 9)), "heads do not divide|qkv_weight"),
        "rank": (args_with(x=torch.randn(32, 9, 9)), "4-D"),
        "integer dtype": (args_with(x=torch.ones(1, 32, 9, 9, dtype=torch.int32)), "floating"),
        "dtype mismatch": (args_with(proj_bias=p["proj_bias"].double()), "proj_bias has dtype"),
        "even kernel": (args_with(dw_weight=torch.zeros(2, 16, 4, 4)), "odd"),
        "bias table": (args_with(attention_bias=torch.zeros(2, 5, 5)), "attention_bias"),
        "window": (args_with(window_size=0), "window_size"),
        "heads": (args_with(qkv_weight=torch.zeros(3, 2 * 16 + 10, 10)), "heads do not divide"),
        "qkv shape": (args_with(qkv_weight=torch.zeros(2, 40, 16)), "qkv_weight"),
        "proj shape": (args_with(proj_weight=torch.zeros(32, 16)), "proj_weight"),
    }


@pytest.mark.parametrize("case", list(_bad_cga_cases()))
@pytest.mark.parametrize("mode", ["eager", "fake"])
def test_cga_bad_input(case, mode):
    args, message = _bad_cga_cases()[case]
    if mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode() as fake:
            args = tuple(fake.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            with pytest.raises((RuntimeError, ValueError), match=message):
                ops.cga(*args)
    else:
        with pytest.raises((RuntimeError, ValueError), match=message):
            ops.cga(*args)


def test_cga_device_mismatch():
    args = list(args_with())
    args[1] = args[1].to("meta")
    with pytest.raises((RuntimeError, ValueError), match="device|meta"):
        ops.cga(*args)


def test_dwconv_bad_input():
    w, b = (t.float() for t in random_dwconv_params(8))
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises((RuntimeError, ValueError), match="weight must have shape"):
        ops.dwconv(torch.randn(1, 9, 5, 5), w, b, False, True)
    with pytest.raises((RuntimeError, ValueError), match="odd"):
        ops.dwconv(x, torch.zeros(8, 2, 2), b, False, True)
    with pytest.raises((RuntimeError, ValueError), match="4-D"):
        ops.dwconv(x[0], w, b, False, True)
    with pytest.raises((RuntimeError, ValueError), match="floating"):
        ops.dwconv(x.int(), w, b, False, True)


def test_ffn_bad_input():
    w1, b1, w2, b2 = (t.float() for t in random_ffn_params(8, 16))
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises((RuntimeError, ValueError), match="w1 must have shape"):
        ops.ffn(torch.randn(1, 7, 5, 5), w1, b1, w2, b2, True)
    with pytest.raises((RuntimeError, ValueError), match="w2 must have shape"):
        ops.ffn(x, w1, b1, w1, b2, True)
    with pytest.raises((RuntimeError, ValueError), match="b1 has dtype"):
        ops.ffn(x, w1, b1.double(), w2, b2, True)
