"""squeeze_excite (CPU and Triton kernels; with backend "cuda", its plain-PyTorch definition):
each image's channels scaled by sigmoid(w2 relu(w1 mean + b1) + b2), against its spec,
python_ref.functional.squeeze_excite, in float64."""
import pytest
import torch

import efficientvit_kernels as K
import python_ref as R
from efficientvit_kernels.testing import (DTYPES, LAYOUTS, assert_close, assert_layout, call_poisoned,
                                          random_input)
from python_ref import functional

ops = torch.ops.efficientvit


def random_params(C, R, seed=0, dtype=torch.float64):
    """Weights that put the scales across the sigmoid's range, not all near 0.5."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(R, C, generator=g, dtype=torch.float64) * 2 * C ** -0.5
    b1 = torch.randn(R, generator=g, dtype=torch.float64) * 0.5  # some hidden units ReLU'd to 0
    w2 = torch.randn(C, R, generator=g, dtype=torch.float64) * 2 * R ** -0.5
    b2 = torch.randn(C, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (w1, b1, w2, b2)]


def check(x, params, dtype):
    xd, pd = x.to(dtype), [t.to(dtype) for t in params]
    out = ops.squeeze_excite(xd, *pd)
    ref = functional.squeeze_excite(x.double(), *(t.double() for t in params))
    assert out.dtype == dtype and out.shape == ref.shape
    assert_layout(out, xd)
    assert_close(out, ref, dtype)
    return out


# PatchMerging's widths (M0's and M4's hidden 4C -> C), widths that are not whole vectors
# (20 -> 5, 36 -> 9), images of one pixel, odd and unequal sizes, batch above 1 (a scale per
# image).
@pytest.mark.parametrize("C,R", [(256, 64), (1024, 256), (20, 5), (36, 9)])
@pytest.mark.parametrize("B,H,W", [(1, 7, 7), (3, 4, 4), (2, 5, 3), (2, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_squeeze_excite(C, R, B, H, W, channels_last):
    check(random_input(B, C, H, W, seed=H * W, channels_last=channels_last),
          random_params(C, R, seed=C + R), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squeeze_excite_dtype_and_strided_input(dtype):
    params = random_params(24, 6, dtype=dtype)
    check(random_input(2, 24, 9, 10, seed=2), params, dtype)
    check(random_input(2, 24, 9, 20)[..., ::2], params, dtype)  # not dense


def test_scale_per_image():
    """Two images: each scaled by its own mean's scales, not the batch's."""
    params = random_params(16, 4)
    x = random_input(2, 16, 3, 3)
    x[1] *= -3
    out = check(x, params, torch.float32)
    assert_close(out[1:], functional.squeeze_excite(x[1:], *params), torch.float32)


def test_module_in_converted_model():
    """On CPU, convert's patch_ops pass turns each squeeze-excite into FusedSqueezeExcite;
    the reference backend keeps it as Linear layers."""
    model = R.randomize_(R.build("m0"), seed=2)
    fused = K.convert(model)
    modules = [m for m in fused.modules() if isinstance(m, K.FusedSqueezeExcite)]
    assert len(modules) == 2 and all(m.w1.shape == (m.w2.shape[1], m.w2.shape[0]) for m in modules)
    assert not any(isinstance(m, K.FusedSqueezeExcite)
                   for m in K.convert(model, backend="reference").modules())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert_close(fused(x), R.fold_batchnorm(model).double()(x.double()), torch.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_squeeze_excite_opcheck(layout):
    x = random_input(2, 20, 5, 3, layout=layout, dtype=torch.float32)
    torch.library.opcheck(ops.squeeze_excite.default, (x, *random_params(20, 5, dtype=torch.float32)))


def test_fused_squeeze_excite_module():
    params = random_params(16, 4, dtype=torch.float32)
    x = random_input(2, 16, 5, 6).float()
    module = K.FusedSqueezeExcite(*params)
    with torch.no_grad():
        assert_close(module(x), functional.squeeze_excite(x, *params))
        module.b2.add_(1)  # the weights are read at each call
        assert_close(module(x), functional.squeeze_excite(x, *params[:3], params[3] + 1))
        assert_close(K.FusedSqueezeExcite(*params, backend="reference")(x),
                     functional.squeeze_excite(x, *params))
    assert "reduced=4" in repr(module)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_definition(layout):
    """What the op runs on CUDA (its spec, checked, in the output layout), called here on CPU
    tensors: a model converted on CPU keeps working after .to("cuda")."""
    params = random_params(20, 5, dtype=torch.float32)
    x = random_input(2, 20, 5, 3, layout=layout, dtype=torch.float32)
    out = K.ops.squeeze_excite_composite(x, *params)
    assert_layout(out, x)
    assert_close(out, ops.squeeze_excite(x, *params), torch.float32)
    with pytest.raises(ValueError, match="w1 must have shape"):
        K.ops.squeeze_excite_composite(x[:, :19], *params)


# Every backend with a kernel of its own (tests/conftest.py: patch_ops_backend), in each dtype
# it runs: name: (C, R, B, H, W, layout, small). M4's second PatchMerging (1024 channels, 256
# hidden: several channel blocks); widths that are not whole blocks (20 -> 5, 100 -> 24) on odd
# sizes; more pixels than one block holds (9x10); more images than one program of the Triton
# gates takes (16), pixel tiles spanning images; one pixel; an empty batch.
BACKEND_CASES = {
    "m4": (1024, 256, 2, 4, 4, "channels_last", False),
    "odd": (20, 5, 3, 5, 3, "permuted", True),
    "many_pixels": (100, 24, 2, 9, 10, "contiguous", True),
    "strided": (36, 9, 1, 4, 7, "strided", True),
    "many_images": (24, 8, 19, 2, 3, "channels_last", True),
    "one_pixel": (16, 8, 2, 1, 1, "channels_last_slice", True),
    "batch0": (16, 8, 0, 3, 3, "contiguous", True),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(BACKEND_CASES))
def test_squeeze_excite_backend(patch_ops_backend, case, dtype):
    C, R, B, H, W, layout, small = BACKEND_CASES[case]
    backend, dtype = patch_ops_backend, DTYPES[dtype]
    backend.skip_unless_small(small)
    params = random_params(C, R, seed=C)
    x = random_input(B, C, H, W, seed=H * W, dtype=dtype, layout=layout, device=backend.device)
    out = call_poisoned(backend.ops.squeeze_excite, x, *(t.to(backend.device, dtype) for t in params))
    ref = functional.squeeze_excite(x.cpu().double(), *params)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_layout(out, x)
    assert_close(out, ref, dtype, f"{backend.name} squeeze_excite")


def test_squeeze_excite_backend_nan(patch_ops_backend):
    """A NaN pixel makes its image's means, and so every output of that image, NaN."""
    dtype, device = patch_ops_backend.dtypes[0], patch_ops_backend.device
    params = [t.to(device, dtype) for t in random_params(16, 8)]
    x = random_input(2, 16, 3, 3, dtype=dtype, device=device)
    x[1, 5, 2, 1] = float("nan")
    out = patch_ops_backend.ops.squeeze_excite(x, *params).cpu()
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
