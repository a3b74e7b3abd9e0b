"""stem_conv (CPU only): the patch embedding's first convolution and ReLU against its spec,
python_ref.functional.stem_conv, evaluated in float64."""
import pytest
import torch

import efficientvit_kernels as K
from cases import random_input, relative_error
from python_ref import functional

ops = torch.ops.efficientvit
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def random_stem_params(Co, Ci=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(Co, Ci, 3, 3, generator=g, dtype=torch.float64) * (9 * Ci) ** -0.5
    bias = torch.randn(Co, generator=g, dtype=torch.float64) * 0.3  # some outputs ReLU'd to 0
    return weight.to(dtype), bias.to(dtype)


def check(x, weight, bias, dtype):
    out = ops.stem_conv(x.to(dtype), weight.to(dtype), bias.to(dtype))
    ref = functional.stem_conv(x.double(), weight.double(), bias.double())
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, ref) < TOL[dtype]
    return out, ref


# Co = embed_dim / 8 of every model (8, 16, 24), a width that is not whole vectors (12, 20) and
# one that needs several channel blocks (40); the image size of the models, odd and unequal
# sizes (the right/bottom edge taps fall outside), 1x1 and 2x2.
@pytest.mark.parametrize("Co", [8, 16, 24, 12, 20, 40])
@pytest.mark.parametrize("H,W", [(224, 224), (17, 9), (10, 31), (1, 1), (2, 2), (3, 64)])
def test_stem_conv_shapes(Co, H, W):
    weight, bias = random_stem_params(Co, seed=Co)
    check(random_input(2, 3, H, W, seed=H * 7 + W), weight, bias, torch.float32)


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("Ci", [1, 3, 5])
def test_stem_conv_batch_dtype_channels(batch, dtype, Ci):
    weight, bias = random_stem_params(16, Ci, seed=Ci)
    check(random_input(batch, Ci, 23, 30, seed=batch), weight, bias, dtype)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_stem_conv_any_input_layout(layout):
    weight, bias = random_stem_params(16)
    x = random_input(2, 3, 15, 12)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    else:
        x = random_input(2, 3, 15, 24)[..., ::2]  # every other column: not dense
    check(x, weight, bias, torch.float32)


def test_stem_conv_every_output_written_and_nan_kept():
    weight, bias = random_stem_params(8)
    x = random_input(1, 3, 9, 9).float()
    assert ops.stem_conv(torch.zeros(0, 3, 9, 9), weight.float(), bias.float()).shape == (0, 8, 5, 5)
    x[0, 1, 4, 4] = float("nan")  # read by output (2, 2) alone: rows and columns 3..5
    out = ops.stem_conv(x, weight.float(), bias.float())
    assert torch.isnan(out[0, :, 2, 2]).all() and torch.isnan(out).sum() == 8


def test_stem_conv_bad_input():
    weight, bias = (t.float() for t in random_stem_params(8))
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises((RuntimeError, ValueError), match="weight must have shape"):
        ops.stem_conv(torch.randn(1, 4, 8, 8), weight, bias)
    with pytest.raises((RuntimeError, ValueError), match="weight must be 4-D"):
        ops.stem_conv(x, weight[0], bias)
    with pytest.raises((RuntimeError, ValueError), match="weight must have shape"):
        ops.stem_conv(x, torch.zeros(8, 3, 5, 5), bias)
    with pytest.raises((RuntimeError, ValueError), match="bias must have shape"):
        ops.stem_conv(x, weight, bias[:4])
    with pytest.raises((RuntimeError, ValueError), match="bias has dtype"):
        ops.stem_conv(x, weight, bias.double())
    with pytest.raises((RuntimeError, ValueError), match="4-D"):
        ops.stem_conv(x[0], weight, bias)
    with pytest.raises((RuntimeError, ValueError), match="floating"):
        ops.stem_conv(x.int(), weight, bias)
    with pytest.raises((RuntimeError, ValueError), match="weight must have shape"):
        K.ops.check_stem_conv(torch.randn(1, 4, 8, 8), weight, bias)  # the fake's check


def test_stem_conv_opcheck():
    weight, bias = (t.float() for t in random_stem_params(16))
    x = random_input(2, 3, 11, 14).float()
    torch.library.opcheck(ops.stem_conv.default, (x, weight, bias),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static",
                                      "test_aot_dispatch_dynamic"))


def test_fused_stem_conv_module():
    weight, bias = (t.float() for t in random_stem_params(16))
    module = K.FusedStemConv(weight, bias)
    x = random_input(2, 3, 13, 10).float()
    ref = functional.stem_conv(x, weight, bias)
    with torch.no_grad():
        assert relative_error(module(x), ref) < TOL[torch.float32]
        # the spec path, which the module takes on devices without the op
        assert relative_error(K.FusedStemConv(weight, bias, backend="reference")(x), ref) < 1e-6
