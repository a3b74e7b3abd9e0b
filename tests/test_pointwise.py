"""pointwise (CPU only): a 1x1 convolution with optional ReLU, and its packed halves, against its
spec, python_ref.functional.pointwise, in float64."""
import pytest
import torch

import efficientvit_kernels as K
from cases import random_input, relative_error
from python_ref import functional

ops = torch.ops.efficientvit
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
LAYOUT = {False: torch.contiguous_format, True: torch.channels_last}


def random_pointwise_params(C, Co, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(Co, C, generator=g, dtype=torch.float64) * C ** -0.5
    bias = torch.randn(Co, generator=g, dtype=torch.float64) * 0.3  # some outputs ReLU'd to 0
    return weight.to(dtype), bias.to(dtype)


def check(x, weight, bias, relu, dtype):
    xd, wd, bd = x.to(dtype), weight.to(dtype), bias.to(dtype)
    out = ops.pointwise(xd, wd, bd, relu)
    ref = functional.pointwise(x.double(), weight.double(), bias.double(), relu)
    assert out.dtype == dtype and out.shape == ref.shape
    assert relative_error(out, ref) < TOL[dtype]
    assert torch.equal(ops.pointwise_packed(xd, ops.pointwise_pack(wd, bd), weight.shape[0], relu), out)
    return out


# PatchMerging's convolutions (C -> 4C, 4C -> C'), widths that are not whole vectors or GEMM
# panels (20 -> 7, 36 -> 100), a tile spanning images (7x7, batch 3), H != W, 1x1.
@pytest.mark.parametrize("C,Co", [(128, 512), (1024, 384), (20, 7), (36, 100)])
@pytest.mark.parametrize("B,H,W", [(2, 14, 14), (3, 7, 7), (1, 5, 3), (2, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_pointwise(C, Co, B, H, W, channels_last):
    weight, bias = random_pointwise_params(C, Co, seed=C + Co)
    x = random_input(B, C, H, W, seed=H, channels_last=channels_last)
    for relu in (False, True):
        out = check(x, weight, bias, relu, torch.float32)
        assert out.is_contiguous(memory_format=LAYOUT[channels_last])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 16])
def test_pointwise_dtype_batch_and_strided_input(dtype, batch):
    weight, bias = random_pointwise_params(24, 40, dtype=dtype)
    check(random_input(batch, 24, 9, 10, seed=batch), weight, bias, True, dtype)
    check(random_input(batch, 24, 9, 20)[..., ::2], weight, bias, False, dtype)  # not dense


def test_pointwise_empty_and_nan():
    weight, bias = (t.float() for t in random_pointwise_params(8, 16))
    assert ops.pointwise(torch.zeros(0, 8, 3, 3), weight, bias, True).shape == (0, 16, 3, 3)
    x = random_input(2, 8, 5, 5).float()
    x[1, 3, 2, 4] = float("nan")
    out = ops.pointwise(x, weight, bias, True)  # ReLU keeps NaN
    assert torch.isnan(out[1, :, 2, 4]).all() and torch.isnan(out).sum() == 16


def test_pointwise_bad_input():
    weight, bias = (t.float() for t in random_pointwise_params(8, 16))
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises((RuntimeError, ValueError), match="weight must have shape"):
        ops.pointwise(torch.randn(1, 5, 4, 4), weight, bias, False)
    with pytest.raises((RuntimeError, ValueError), match="weight must be 2-D"):
        ops.pointwise(x, weight[:, :, None, None], bias, False)
    with pytest.raises((RuntimeError, ValueError), match="bias must have shape"):
        ops.pointwise(x, weight, bias[:4], False)
    with pytest.raises((RuntimeError, ValueError), match="bias has dtype"):
        ops.pointwise(x, weight, bias.double(), False)
    with pytest.raises((RuntimeError, ValueError), match="4-D"):
        ops.pointwise(x[0], weight, bias, False)
    with pytest.raises((RuntimeError, ValueError), match="weight must have shape"):
        K.ops.check_pointwise(torch.randn(1, 5, 4, 4), weight, bias)  # the fake's check
    packed = ops.pointwise_pack(weight, bias)
    with pytest.raises(RuntimeError, match="packed weight must have shape"):
        ops.pointwise_packed(torch.randn(1, 5, 4, 4), packed, 16, False)
    with pytest.raises(RuntimeError, match="packed weight must have shape"):
        ops.pointwise_packed(x, packed, 40, False)
    with pytest.raises(RuntimeError, match="packed weight has dtype"):
        ops.pointwise_packed(x.double(), packed, 16, False)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_pointwise_opcheck(channels_last):
    weight, bias = (t.float() for t in random_pointwise_params(16, 24))
    x = random_input(2, 16, 5, 6, channels_last=channels_last).float()
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.pointwise.default, (x, weight, bias, True), test_utils=utils)
    torch.library.opcheck(ops.pointwise_packed.default, (x, ops.pointwise_pack(weight, bias), 24, False),
                          test_utils=utils)


def test_fused_pointwise_module():
    weight, bias = (t.float() for t in random_pointwise_params(16, 24))
    x = random_input(2, 16, 5, 6).float()
    ref = functional.pointwise(x, weight, bias, True)
    module = K.FusedPointwise(weight, bias, relu=True)
    with torch.no_grad():
        assert relative_error(module(x), ref) < TOL[torch.float32]
        module.weight.mul_(2)  # repacked: the version counter moved
        assert relative_error(module(x), functional.pointwise(x, 2 * weight, bias, True)) < TOL[torch.float32]
        # the spec path, which the module takes on devices without the op
        assert relative_error(K.FusedPointwise(weight, bias, True, backend="reference")(x), ref) < 1e-6
