"""dwconv_ffn on every backend (tests/conftest.py: backend) against
python_ref.functional.dwconv_ffn in float64 on the same dtype-rounded inputs; and the fused
Triton kernel, which runs fp16 and bf16 (fp32 runs the dwconv and ffn kernels in turn), in fp16
(and bf16 on a GPU; the interpreter has no bf16 products), where it must also equal the two
kernels in turn (in the interpreter): kernel sizes 3 and 5, odd widths, channels in
one and in several chunks, every input layout, tiles of a channels-last batch that span
images (the interpreter's take 128 pixels), each case its own test."""
import pytest
import torch

from efficientvit_kernels.testing import (DTYPES, LAYOUTS, assert_close, assert_layout,
                                          call_poisoned, random_dwconv_params, random_ffn_params,
                                          random_input)
from python_ref import functional

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"

# name: (C, M, K, B, H, W, layout, small)
CASES = {
    "m4_stage1": (128, 256, 3, 2, 14, 14, "channels_last", False),
    "hidden7_k5": (20, 7, 5, 1, 5, 3, "contiguous", True),
    "permuted": (48, 96, 3, 2, 4, 4, "permuted", True),
    "strided": (24, 40, 3, 1, 5, 7, "strided", True),
    "slice": (16, 48, 3, 2, 3, 3, "channels_last_slice", True),
    # 2 x 9 x 9 pixels: the interpreter's first tile ends inside the second image
    "tiles_span_images": (24, 48, 3, 2, 9, 9, "channels_last", True),
    "one_pixel": (8, 16, 3, 3, 1, 1, "channels_last", True),
    "m5_stage3": (384, 768, 3, 1, 4, 4, "channels_last", False),
    "batch0": (8, 16, 3, 0, 2, 2, "contiguous", True),
}


def params(C, M, K, dtype):
    return [t.to(dtype) for t in (*random_dwconv_params(C, K, seed=C), *random_ffn_params(C, M, seed=M))]


def run(op, name, C, M, K, B, H, W, layout, dtype, device):
    weights = params(C, M, K, dtype)
    x = random_input(B, C, H, W, dtype=dtype, layout=layout, device=device)
    out = call_poisoned(op, x, *(t.to(device) for t in weights))
    assert out.shape == x.shape and out.dtype == dtype
    assert_layout(out, x)
    ref = functional.dwconv_ffn(x.cpu().double(), *(t.double() for t in weights))
    assert_close(out, ref, dtype, f"{name} dwconv_ffn")
    return x, weights, out


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_dwconv_ffn(backend, case, dtype):
    *shape, small = CASES[case]
    backend.skip_unless_small(small)
    run(backend.ops.dwconv_ffn, backend.name, *shape, DTYPES[dtype], backend.device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] if GPU else [torch.float16],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", list(CASES))
def test_triton_fused_kernel(case, dtype):
    """The fused Triton kernel (fp16, and bf16 on a GPU) against the reference; in the
    interpreter also bit for bit against the dwconv and ffn kernels in turn: y is rounded
    where the dwconv kernel stores it."""
    kernels = pytest.importorskip("efficientvit_kernels.triton")
    if not kernels.available():
        pytest.skip("triton is not installed")
    *shape, small = CASES[case]
    if not (small or GPU):
        pytest.skip("the interpreter is slow: small cases only")
    x, weights, out = run(kernels.dwconv_ffn, "triton", *shape, dtype, DEVICE)
    if not GPU:
        dw, ffn = [t.to(DEVICE) for t in weights[:2]], [t.to(DEVICE) for t in weights[2:]]
        assert torch.equal(out, kernels.ffn(kernels.dwconv(x, *dw, False, True), *ffn, True))


@pytest.mark.parametrize("fp16", [False, True], ids=["first_dtype", "fp16"])
def test_dwconv_ffn_nan_stays_in_its_image(backend, fp16):
    """A NaN at the last pixel of the first image reaches its 3x3 neighbours there and nothing
    of the second image, which follows it in a channels-last tile (in fp16 too, the Triton
    kernel's fused path)."""
    if fp16 and torch.float16 not in backend.dtypes and backend.name != "triton (interpreter)":
        pytest.skip(f"{backend.name} has no fp16")
    dtype = torch.float16 if fp16 else backend.dtypes[0]
    weights = [t.to(backend.device) for t in params(16, 32, 3, dtype)]
    x = random_input(2, 16, 4, 5, dtype=dtype, layout="channels_last", device=backend.device)
    x[0, 3, 3, 4] = float("nan")
    out = backend.ops.dwconv_ffn(x, *weights)
    nan = out.isnan().any(1).cpu()
    expected = torch.zeros(2, 4, 5, dtype=torch.bool)
    expected[0, 2:, 3:] = True
    assert torch.equal(nan, expected) and out.isnan().sum() == 16 * 4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dwconv_ffn_opcheck(backend, layout):
    if not backend.dispatcher:
        pytest.skip(f"{backend.name} is not what torch.ops.efficientvit dispatches to here")
    dtype = backend.dtypes[0]
    weights = [t.to(backend.device) for t in params(16, 40, 3, dtype)]
    x = random_input(2, 16, 5, 6, dtype=dtype, layout=layout, device=backend.device)
    torch.library.opcheck(torch.ops.efficientvit.dwconv_ffn.default, (x, *weights))
