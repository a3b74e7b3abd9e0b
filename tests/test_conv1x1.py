"""conv1x1 (CPU and Triton kernels; with backend "cuda", its plain-PyTorch definition): a 1x1
convolution with optional ReLU, optionally followed by a depthwise 3x3 stride-2 convolution and
ReLU, and the CPU kernel on packed weights, against its spec, python_ref.functional.conv1x1, in
float64."""
import pytest
import torch

import efficientvit_kernels as K
from efficientvit_kernels.testing import (DTYPES, LAYOUTS, assert_close, assert_layout, call_poisoned,
                                          random_input)
from python_ref import functional

ops = torch.ops.efficientvit
cpu = torch.ops.efficientvit_cpu


def random_conv1x1_params(C, Co, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(Co, C, generator=g, dtype=torch.float64) * C ** -0.5
    bias = torch.randn(Co, generator=g, dtype=torch.float64) * 0.3  # some outputs ReLU'd to 0
    return weight.to(dtype), bias.to(dtype)


def random_depthwise_params(Co, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed + 1)
    dw_weight = torch.randn(Co, 3, 3, generator=g, dtype=torch.float64) / 3
    dw_bias = torch.randn(Co, generator=g, dtype=torch.float64) * 0.3
    return dw_weight.to(dtype), dw_bias.to(dtype)


def check(x, weight, bias, relu, dtype, depthwise=()):
    xd, wd, bd = x.to(dtype), weight.to(dtype), bias.to(dtype)
    dwd = [t.to(dtype) for t in depthwise]
    out = ops.conv1x1(xd, wd, bd, relu, *dwd)
    ref = functional.conv1x1(x.double(), weight.double(), bias.double(), relu,
                               *(t.double() for t in depthwise))
    assert out.dtype == dtype and out.shape == ref.shape
    assert_layout(out, xd)
    assert_close(out, ref, dtype)
    assert torch.equal(cpu.conv1x1_pack(wd, bd, *dwd).run(xd, relu), out)
    return out


# PatchMerging's convolutions (C -> 4C, 4C -> C'), widths that are not whole vectors or GEMM
# panels (20 -> 7, 36 -> 100), a tile spanning images (7x7, batch 3), H != W, 1x1.
@pytest.mark.parametrize("C,Co", [(128, 512), (1024, 384), (20, 7), (36, 100)])
@pytest.mark.parametrize("B,H,W", [(2, 14, 14), (3, 7, 7), (1, 5, 3), (2, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_conv1x1(C, Co, B, H, W, channels_last, relu):
    weight, bias = random_conv1x1_params(C, Co, seed=C + Co)
    check(random_input(B, C, H, W, seed=H, channels_last=channels_last), weight, bias, relu,
          torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 16])
def test_conv1x1_dtype_batch_and_strided_input(dtype, batch):
    weight, bias = random_conv1x1_params(24, 40, dtype=dtype)
    check(random_input(batch, 24, 9, 10, seed=batch), weight, bias, True, dtype)
    check(random_input(batch, 24, 9, 20)[..., ::2], weight, bias, False, dtype)  # not dense


# With the depthwise convolution: PatchMerging's widths (M4's first, M0's, M5's second), widths
# that are not whole vectors (20, 100); images of one band (7x7, 14x14), of several (30 rows of
# 9, 40 of 5: bands of 10 and 18 rows), odd and unequal sizes (the last output row and column
# read one padding row or column), a row of width 1, 1x1, 2x2.
@pytest.mark.parametrize("C,Co", [(128, 512), (64, 256), (288, 1152), (20, 8), (36, 100)])
@pytest.mark.parametrize("B,H,W", [(2, 14, 14), (3, 7, 7), (1, 30, 9), (2, 40, 5), (1, 5, 3),
                                   (2, 9, 1), (2, 1, 1), (1, 2, 2)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_conv1x1_depthwise(C, Co, B, H, W, channels_last, relu):
    weight, bias = random_conv1x1_params(C, Co, seed=C + Co)
    depthwise = random_depthwise_params(Co, seed=Co)
    x = random_input(B, C, H, W, seed=H * W, channels_last=channels_last)
    out = check(x, weight, bias, relu, torch.float32, depthwise)
    assert out.shape == (B, Co, (H + 1) // 2, (W + 1) // 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 16])
def test_conv1x1_depthwise_dtype_batch_and_strided_input(dtype, batch):
    weight, bias = random_conv1x1_params(24, 40, dtype=dtype)
    depthwise = random_depthwise_params(40, dtype=dtype)
    check(random_input(batch, 24, 15, 14, seed=batch), weight, bias, True, dtype, depthwise)
    check(random_input(batch, 24, 9, 20)[..., ::2], weight, bias, False, dtype, depthwise)


def test_conv1x1_depthwise_threads():
    """Bands split between threads: a thread's first band computes the row above it instead of
    taking it from the band before."""
    weight, bias = random_conv1x1_params(16, 32)
    depthwise = random_depthwise_params(32)
    x = random_input(3, 16, 45, 8, channels_last=True)  # bands of 12 rows: 4 per image
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(check(x, weight, bias, True, torch.float64, depthwise))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_conv1x1_empty_and_nan():
    weight, bias = (t.float() for t in random_conv1x1_params(8, 16))
    assert ops.conv1x1(torch.zeros(0, 8, 3, 3), weight, bias, True).shape == (0, 16, 3, 3)
    x = random_input(2, 8, 5, 5).float()
    x[1, 3, 2, 4] = float("nan")
    out = ops.conv1x1(x, weight, bias, True)  # ReLU keeps NaN
    assert torch.isnan(out[1, :, 2, 4]).all() and torch.isnan(out).sum() == 16
    # with the depthwise convolution (stride 2): only output (1, 2) has a tap on pixel (2, 4)
    dw_weight, dw_bias = (t.float() for t in random_depthwise_params(16))
    out = ops.conv1x1(x, weight, bias, True, dw_weight, dw_bias)
    assert out.shape == (2, 16, 3, 3) and torch.isnan(out[1, :, 1, 2]).all()
    assert torch.isnan(out).sum() == 16
    empty = ops.conv1x1(torch.zeros(2, 8, 0, 3), weight, bias, True, dw_weight, dw_bias)
    assert empty.shape == (2, 16, 0, 2)


def test_conv1x1_bad_input():
    weight, bias = (t.float() for t in random_conv1x1_params(8, 16))
    x = torch.randn(1, 8, 4, 4)
    with pytest.raises((RuntimeError, ValueError), match="weight must have shape"):
        ops.conv1x1(torch.randn(1, 5, 4, 4), weight, bias, False)
    with pytest.raises((RuntimeError, ValueError), match="weight must be 2-D"):
        ops.conv1x1(x, weight[:, :, None, None], bias, False)
    with pytest.raises((RuntimeError, ValueError), match="bias must have shape"):
        ops.conv1x1(x, weight, bias[:4], False)
    with pytest.raises((RuntimeError, ValueError), match="bias has dtype"):
        ops.conv1x1(x, weight, bias.double(), False)
    with pytest.raises((RuntimeError, ValueError), match="4-D"):
        ops.conv1x1(x[0], weight, bias, False)
    with pytest.raises((RuntimeError, ValueError), match="weight must have shape"):
        K.ops.check_conv1x1(torch.randn(1, 5, 4, 4), weight, bias)  # the fake's check
    dw_weight, dw_bias = (t.float() for t in random_depthwise_params(16))
    for check_op in (ops.conv1x1, K.ops.check_conv1x1):  # the C++ checks and the fake's
        args = (True,) if check_op is ops.conv1x1 else ()
        with pytest.raises((RuntimeError, ValueError), match="dw_weight and dw_bias together"):
            check_op(x, weight, bias, *args, dw_weight)
        with pytest.raises((RuntimeError, ValueError), match="dw_weight must have shape"):
            check_op(x, weight, bias, *args, dw_weight[:, :2, :2], dw_bias)
        with pytest.raises((RuntimeError, ValueError), match="dw_weight must have shape"):
            check_op(x, weight, bias, *args, dw_weight[:8], dw_bias)
        with pytest.raises((RuntimeError, ValueError), match="dw_bias must have shape"):
            check_op(x, weight, bias, *args, dw_weight, dw_bias[:8])
        with pytest.raises((RuntimeError, ValueError), match="dw_bias has dtype"):
            check_op(x, weight, bias, *args, dw_weight, dw_bias.double())
    with pytest.raises(ValueError, match="dw_weight must have shape"):
        cpu.conv1x1_pack(weight, bias, dw_weight[:, None], dw_bias)
    packed = cpu.conv1x1_pack(weight, bias)
    with pytest.raises(ValueError, match="5 channels but the weights were packed for 8"):
        packed.run(torch.randn(1, 5, 4, 4), False)
    with pytest.raises(ValueError, match="packed for Float"):
        packed.run(x.double(), False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("depthwise", [False, True], ids=["conv1x1", "with_dwconv"])
def test_conv1x1_opcheck(layout, depthwise):
    weight, bias = (t.float() for t in random_conv1x1_params(16, 24))
    x = random_input(2, 16, 5, 6, layout=layout, dtype=torch.float32)
    dw = [t.float() for t in random_depthwise_params(24)] if depthwise else []
    torch.library.opcheck(ops.conv1x1.default, (x, weight, bias, True, *dw))


def test_fused_conv1x1_module():
    weight, bias = (t.float() for t in random_conv1x1_params(16, 24))
    x = random_input(2, 16, 5, 6).float()
    ref = functional.conv1x1(x, weight, bias, True)
    module = K.FusedConv1x1(weight, bias, relu=True)
    with torch.no_grad():
        assert_close(module(x), ref)
        module.weight.mul_(2)  # repacked: the version counter moved (the op's cache)
        assert_close(module(x), functional.conv1x1(x, 2 * weight, bias, True))
        # the spec path, which the module takes on devices without the op
        assert_close(K.FusedConv1x1(weight, bias, True, backend="reference")(x), ref)
        depthwise = [t.float() for t in random_depthwise_params(24)]
        ref = functional.conv1x1(x, weight, bias, True, *depthwise)
        for backend in ("auto", "reference"):
            module = K.FusedConv1x1(weight, bias, True, *depthwise, backend=backend)
            assert_close(module(x), ref)
        module.dw_bias.add_(1)
        assert_close(module(x), functional.conv1x1(x, weight, bias, True, depthwise[0], depthwise[1] + 1))
        assert "dwconv3x3_stride2=True" in repr(module)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_fused_linear_module(backend):
    """The classifier as conv1x1 on a 1x1 map: x's last dimension, any leading ones."""
    weight, bias = (t.float() for t in random_conv1x1_params(20, 36))
    module = K.FusedLinear(weight, bias, backend=backend)
    with torch.no_grad():
        for shape in [(3, 20), (2, 5, 20), (20,), (0, 20)]:
            x = torch.randn(shape)
            out = module(x)
            assert out.shape == (*shape[:-1], 36)
            assert_close(out, torch.nn.functional.linear(x.double(), weight.double(), bias.double()),
                         torch.float32)
    assert "in_features=20, out_features=36" in repr(module)
    if backend == "auto":  # off CPU, torch's linear (meta: its shapes only)
        assert module.to("meta")(torch.empty(3, 20, device="meta")).shape == (3, 36)


@pytest.mark.parametrize("depthwise", [False, True], ids=["conv1x1", "with_dwconv"])
def test_cuda_definition(depthwise):
    """What the op runs on CUDA (its spec, checked, in the output layout), on CPU tensors."""
    weight, bias = (t.float() for t in random_conv1x1_params(16, 24))
    dw = [t.float() for t in random_depthwise_params(24)] if depthwise else []
    x = random_input(2, 16, 5, 6, channels_last=True, dtype=torch.float32)
    out = K.ops.conv1x1_composite(x, weight, bias, True, *dw)
    assert_layout(out, x)
    assert_close(out, ops.conv1x1(x, weight, bias, True, *dw), torch.float32)
    with pytest.raises(ValueError, match="weight must have shape"):
        K.ops.conv1x1_composite(x[:, :15], weight, bias, True, *dw)


# Every backend with a kernel of its own (tests/conftest.py: patch_ops_backend), in each dtype
# it runs: name: (C, Co, B, H, W, relu, depthwise, layout, small). M4's first PatchMerging
# convolution with its depthwise one, and its last; widths that are not whole tiles (20, 36,
# 100: the reduction and output tiles are masked), odd and unequal sizes (the last output row
# and column read a padding row and column), tiles of pixels spanning images (Triton: 3x5
# images, and 2x2 outputs, four to a tile and one more), one pixel, an empty batch.
BACKEND_CASES = {
    "m4_conv1_dw": (128, 512, 2, 14, 14, True, True, "channels_last", False),
    "m4_conv3": (512, 256, 2, 7, 7, False, False, "channels_last", False),
    "odd_dw": (20, 36, 2, 7, 5, True, True, "permuted", True),
    "linear_dw": (36, 20, 1, 6, 9, False, True, "contiguous", True),
    "wide_reduction": (100, 24, 2, 4, 3, False, False, "strided", True),
    "relu": (36, 100, 1, 5, 6, True, False, "channels_last_slice", True),
    "images_per_tile": (24, 40, 3, 3, 5, True, False, "channels_last", True),
    "images_per_tile_dw": (16, 24, 5, 4, 3, False, True, "channels_last", True),
    "one_pixel_dw": (24, 16, 1, 1, 1, True, True, "contiguous", True),
    "batch0": (8, 16, 0, 4, 4, True, True, "contiguous", True),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(BACKEND_CASES))
def test_conv1x1_backend(patch_ops_backend, case, dtype):
    C, Co, B, H, W, relu, depthwise, layout, small = BACKEND_CASES[case]
    backend, dtype = patch_ops_backend, DTYPES[dtype]
    backend.skip_unless_small(small)
    weight, bias = random_conv1x1_params(C, Co, seed=C + Co)
    dw = random_depthwise_params(Co, seed=Co) if depthwise else ()
    x = random_input(B, C, H, W, seed=H * W, dtype=dtype, layout=layout, device=backend.device)
    args = [t.to(backend.device, dtype) for t in (weight, bias)]
    out = call_poisoned(backend.ops.conv1x1, x, *args, relu,
                        *(t.to(backend.device, dtype) for t in dw))
    ref = functional.conv1x1(x.cpu().double(), weight, bias, relu, *dw)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_layout(out, x)
    assert_close(out, ref, dtype, f"{backend.name} conv1x1")


def test_conv1x1_backend_nan(patch_ops_backend):
    dtype, device = patch_ops_backend.dtypes[0], patch_ops_backend.device
    weight, bias = (t.to(device, dtype) for t in random_conv1x1_params(8, 16))
    dw_weight, dw_bias = (t.to(device, dtype) for t in random_depthwise_params(16))
    x = random_input(2, 8, 5, 5, dtype=dtype, device=device)
    x[1, 3, 2, 4] = float("nan")
    out = patch_ops_backend.ops.conv1x1(x, weight, bias, True)  # ReLU keeps NaN
    assert torch.isnan(out[1, :, 2, 4]).all() and torch.isnan(out).sum() == 16
    # with the depthwise convolution (stride 2): only output (1, 2) has a tap on pixel (2, 4)
    out = patch_ops_backend.ops.conv1x1(x, weight, bias, True, dw_weight, dw_bias)
    assert torch.isnan(out[1, :, 1, 2]).all() and torch.isnan(out).sum() == 16
