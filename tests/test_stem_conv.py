"""stem_conv (CPU only): the patch embedding's first convolution and ReLU, alone or with the
second convolution and ReLU, against its spec, python_ref.functional.stem_conv, in float64."""
import pytest
import torch
import torch.nn.functional as F

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


def random_layers(channels, seed=0, dtype=torch.float64):
    """(weight, bias) of each convolution, for channels = [Ci, C1] or [Ci, C1, C2]."""
    return [t for i, (ci, co) in enumerate(zip(channels, channels[1:]))
            for t in random_stem_params(co, ci, seed=seed + i, dtype=dtype)]


def check(x, params, dtype):
    out = ops.stem_conv(x.to(dtype), *(t.to(dtype) for t in params))
    ref = functional.stem_conv(x.double(), *(t.double() for t in params))
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, ref) < TOL[dtype]
    return out, ref


# C1 = embed_dim / 8 of every model (8, 16, 24), a width that is not whole vectors (12, 20) and
# one that needs several channel blocks (40); the image size of the models, odd and unequal
# sizes (the right/bottom edge taps fall outside), 1x1 and 2x2.
@pytest.mark.parametrize("C1", [8, 16, 24, 12, 20, 40])
@pytest.mark.parametrize("H,W", [(224, 224), (17, 9), (10, 31), (1, 1), (2, 2), (3, 64)])
def test_stem_conv_shapes(C1, H, W):
    check(random_input(2, 3, H, W, seed=H * 7 + W), random_layers([3, C1], seed=C1),
          torch.float32)


# Two layers: C2 = embed_dim / 4 of every model (16, 32, 48), one that is not whole vectors (20,
# 36) and one of several GEMM panels (72); first-layer widths as above; sizes whose first
# output is odd (the second's right/bottom taps read the padding) or even, 1x1, 4x4 and H != W.
@pytest.mark.parametrize("C1,C2", [(8, 16), (16, 32), (24, 48), (12, 20), (20, 36), (40, 72)])
@pytest.mark.parametrize("H,W", [(224, 224), (17, 9), (10, 31), (1, 1), (4, 4), (6, 13)])
def test_stem_conv_two_layers_shapes(C1, C2, H, W):
    check(random_input(2, 3, H, W, seed=H * 7 + W), random_layers([3, C1, C2], seed=C2),
          torch.float32)


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("Ci", [1, 3, 5])
@pytest.mark.parametrize("layers", [1, 2])
def test_stem_conv_batch_dtype_channels(batch, dtype, Ci, layers):
    channels = [Ci, 16, 32][:layers + 1]
    check(random_input(batch, Ci, 23, 30, seed=batch), random_layers(channels, seed=Ci), dtype)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("layers", [1, 2])
def test_stem_conv_any_input_layout(layout, layers):
    x = random_input(2, 3, 15, 12)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    else:
        x = random_input(2, 3, 15, 24)[..., ::2]  # every other column: not dense
    check(x, random_layers([3, 16, 32][:layers + 1]), torch.float32)


def test_stem_conv_every_output_written_and_nan_kept():
    weight, bias = random_stem_params(8)
    x = random_input(1, 3, 9, 9).float()
    assert ops.stem_conv(torch.zeros(0, 3, 9, 9), weight.float(), bias.float()).shape == (0, 8, 5, 5)
    x[0, 1, 4, 4] = float("nan")  # read by output (2, 2) alone: rows and columns 3..5
    out = ops.stem_conv(x, weight.float(), bias.float())
    assert torch.isnan(out[0, :, 2, 2]).all() and torch.isnan(out).sum() == 8


def test_stem_conv_two_layers_every_output_written_and_nan_kept():
    params = [t.float() for t in random_layers([3, 8, 16])]
    assert ops.stem_conv(torch.zeros(0, 3, 9, 9), *params).shape == (0, 16, 3, 3)
    for y, x_ in [(4, 4), (0, 8), (8, 0)]:  # the centre and two edges of a 9x9 image
        x = random_input(2, 3, 9, 9, seed=y).float()
        x[1, 2, y, x_] = float("nan")
        out = ops.stem_conv(x, *params)
        # the outputs whose receptive field holds the NaN pixel, and no others
        reach = torch.zeros(2, 1, 9, 9)
        reach[1, 0, y, x_] = 1
        ones = torch.ones(1, 1, 3, 3)
        reach = F.conv2d(F.conv2d(reach, ones, stride=2, padding=1), ones, stride=2, padding=1) > 0
        assert torch.equal(torch.isnan(out), reach.expand_as(out)), (y, x_)


def test_stem_conv_bad_input():
    weight, bias = (t.float() for t in random_stem_params(8))
    weight2, bias2 = (t.float() for t in random_stem_params(16, 8))
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
    with pytest.raises((RuntimeError, ValueError), match="weight2 and bias2 together"):
        ops.stem_conv(x, weight, bias, weight2)
    with pytest.raises((RuntimeError, ValueError), match="weight2 must have shape"):
        ops.stem_conv(x, weight, bias, weight2[:, :4], bias2)
    with pytest.raises((RuntimeError, ValueError), match="weight2 must be 4-D"):
        ops.stem_conv(x, weight, bias, weight2[0], bias2)
    with pytest.raises((RuntimeError, ValueError), match="bias2 must have shape"):
        ops.stem_conv(x, weight, bias, weight2, bias2[:4])
    with pytest.raises((RuntimeError, ValueError), match="weight2 has dtype"):
        ops.stem_conv(x, weight, bias, weight2.double(), bias2)
    for check_args in [(torch.randn(1, 4, 8, 8), weight, bias),  # the fake's check
                       (x, weight, bias, weight2[:, :4], bias2)]:
        with pytest.raises((RuntimeError, ValueError), match="weight2? must have shape"):
            K.ops.check_stem_conv(*check_args)


@pytest.mark.parametrize("layers", [1, 2])
def test_stem_conv_opcheck(layers):
    params = [t.float() for t in random_layers([3, 16, 32][:layers + 1])]
    x = random_input(2, 3, 11, 14).float()
    torch.library.opcheck(ops.stem_conv.default, (x, *params),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static",
                                      "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("layers", [1, 2])
def test_fused_stem_conv_module(layers):
    params = [t.float() for t in random_layers([3, 16, 32][:layers + 1])]
    module = K.FusedStemConv(*params)
    assert len(module.state_dict()) == 2 * layers
    x = random_input(2, 3, 13, 10).float()
    ref = functional.stem_conv(x, *params)
    with torch.no_grad():
        assert relative_error(module(x), ref) < TOL[torch.float32]
        # the spec path, which the module takes on devices without the op
        assert relative_error(K.FusedStemConv(*params, backend="reference")(x), ref) < 1e-6
