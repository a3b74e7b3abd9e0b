"""The compiled ops on CPU against python_ref.functional (the spec), evaluated in float64."""
import pytest
import torch

import efficientvit_kernels  # noqa: F401  (registers the ops)
from cases import (cast, cga_args, random_cga_params, random_dwconv_params, random_ffn_params, random_input,
                   reference_cga, relative_error, stage_shapes)
from python_ref import functional

ops = torch.ops.efficientvit
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
LAYOUT = {False: torch.contiguous_format, True: torch.channels_last}  # output keeps x's layout


def run_cga(x, params, residual=True):
    return ops.cga(x, *cga_args(params), residual)


@pytest.mark.parametrize("name,C,heads,kernels,window", stage_shapes(), ids=lambda v: str(v))
def test_cga_every_model_stage(name, C, heads, kernels, window):
    params = random_cga_params(C, heads, kernels, window)
    size = {7: (14, 14), 4: (4, 4)}[window]
    x = random_input(2, C, *size)
    out = run_cga(x.float(), cast(params, torch.float32))
    assert relative_error(out, reference_cga(x, params)) < TOL[torch.float32]


@pytest.mark.parametrize("window,H,W", [(7, 10, 13), (7, 17, 9), (7, 7, 7), (7, 1, 1), (7, 8, 15),
                                        (4, 3, 5), (4, 4, 4), (4, 5, 3), (4, 9, 2)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_cga_padded_windows(window, H, W, channels_last):
    params = random_cga_params(64, 4, (7, 5, 3, 3), window, seed=H * 31 + W)
    x = random_input(3, 64, H, W, channels_last=channels_last)
    out = run_cga(x.float(), cast(params, torch.float32))
    assert out.shape == x.shape
    assert out.is_contiguous(memory_format=LAYOUT[channels_last])
    assert relative_error(out, reference_cga(x, params)) < TOL[torch.float32]


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("residual", [True, False])
def test_cga_batch_dtype_residual(batch, dtype, residual):
    params = random_cga_params(48, 3, (7, 5, 3), 7, seed=batch)
    x = random_input(batch, 48, 9, 11)
    out = run_cga(x.to(dtype), cast(params, dtype), residual)
    assert out.dtype == dtype
    assert relative_error(out, reference_cga(x, params, residual)) < TOL[dtype]


@pytest.mark.parametrize("heads,kernels,key_dim", [(1, (1,), 16), (2, (3, 1), 8), (8, (7,) * 8, 16),
                                                   (5, (5, 3, 3, 1, 1), 4)])
def test_cga_heads_kernels_key_dims(heads, kernels, key_dim):
    C = heads * 12
    params = random_cga_params(C, heads, kernels, 7, key_dim=key_dim)
    x = random_input(2, C, 7, 9)
    out = run_cga(x.float(), cast(params, torch.float32))
    assert relative_error(out, reference_cga(x, params)) < TOL[torch.float32]


@pytest.mark.parametrize("heads,kernels,key_dim", [(1, (1,), 16), (2, (3, 1), 8), (5, (5, 3, 3, 1, 1), 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cga_channels_last_odd_widths(heads, kernels, key_dim, dtype):
    """Channels-last input whose widths (C, d = 12, kd) are not whole SIMD vectors, padded windows."""
    C = heads * 12
    params = random_cga_params(C, heads, kernels, 7, key_dim=key_dim, seed=heads)
    x = random_input(2, C, 9, 8, channels_last=True)
    out = run_cga(x.to(dtype), cast(params, dtype))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, reference_cga(x, params)) < TOL[dtype]


@pytest.mark.parametrize("window", [1, 2, 5, 14])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_cga_other_window_sizes(window, channels_last):
    params = random_cga_params(32, 2, (3, 3), window, seed=window)
    x = random_input(2, 32, 15, 13, channels_last=channels_last)
    out = run_cga(x.float(), cast(params, torch.float32))
    assert relative_error(out, reference_cga(x, params)) < TOL[torch.float32]


def test_cga_non_contiguous_input():
    params = random_cga_params(32, 2, (5, 5), 7)
    x = random_input(2, 32, 16, 12)[:, :, 1:, ::2]  # neither contiguous nor channels-last
    out = run_cga(x.float(), cast(params, torch.float32))
    assert relative_error(out, reference_cga(x, params)) < TOL[torch.float32]


def test_cga_nan_propagates():
    params = cast(random_cga_params(32, 2, (5, 5), 7), torch.float32)
    x = random_input(1, 32, 7, 7).float()
    x[0, 3, 2, 2] = float("nan")
    assert torch.isnan(run_cga(x, params)).any()


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_cga_nan_where_the_reference_has_nan(channels_last):
    """A NaN in x (full or padded window) or in one attention bias reaches exactly the outputs it
    reaches in the reference: no softmax trick may drop it."""
    params = cast(random_cga_params(32, 2, (5, 3), 7), torch.float32)
    for pos in [(0, 3, 0, 0), (0, 20, 8, 8), (0, 31, 4, 8), None]:
        x = random_input(1, 32, 9, 9, channels_last=channels_last).float()
        p = dict(params)
        if pos is None:
            p["attention_bias"] = p["attention_bias"].clone()
            p["attention_bias"][1, 6, 6] = float("nan")
        else:
            x[pos] = float("nan")
        out = run_cga(x, p)
        ref = functional.cga(x, **p, residual=True)
        assert torch.isnan(out).any()
        assert torch.equal(torch.isnan(out), torch.isnan(ref)), pos


def test_cga_batch_zero():
    params = cast(random_cga_params(32, 2, (5, 5), 7), torch.float32)
    out = run_cga(torch.empty(0, 32, 9, 9), params)
    assert out.shape == (0, 32, 9, 9)


@pytest.mark.parametrize("C,K", [(64, 3), (144, 3), (240, 5), (17, 1), (24, 7)])
@pytest.mark.parametrize("H,W", [(14, 14), (7, 5), (1, 1), (4, 9)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_dwconv(C, K, H, W, channels_last):
    weight, bias = random_dwconv_params(C, K, seed=C + K)
    x = random_input(2, C, H, W, channels_last=channels_last)
    for relu in (False, True):
        for residual in (False, True):
            ref = functional.dwconv(x, weight, bias, relu, residual)
            out = ops.dwconv(x.float(), weight.float(), bias.float(), relu, residual)
            assert out.is_contiguous(memory_format=LAYOUT[channels_last])
            assert relative_error(out, ref) < TOL[torch.float32], (relu, residual)


@pytest.mark.parametrize("C,M", [(64, 128), (144, 288), (384, 768), (20, 7)])
@pytest.mark.parametrize("B,H,W", [(2, 14, 14), (1, 5, 3), (16, 4, 4)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_ffn(C, M, B, H, W, channels_last):
    w1, b1, w2, b2 = random_ffn_params(C, M, seed=C)
    x = random_input(B, C, H, W, channels_last=channels_last)
    for residual in (False, True):
        ref = functional.ffn(x, w1, b1, w2, b2, residual)
        out = ops.ffn(x.float(), w1.float(), b1.float(), w2.float(), b2.float(), residual)
        assert out.is_contiguous(memory_format=LAYOUT[channels_last])
        assert relative_error(out, ref) < TOL[torch.float32], residual


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dwconv_ffn_dtypes_and_empty(dtype):
    weight, bias = random_dwconv_params(8)
    w1, b1, w2, b2 = random_ffn_params(8, 16)
    x = random_input(2, 8, 5, 6)
    out = ops.dwconv(x.to(dtype), weight.to(dtype), bias.to(dtype), False, True)
    assert relative_error(out, functional.dwconv(x, weight, bias, False, True)) < TOL[dtype]
    args = [t.to(dtype) for t in (w1, b1, w2, b2)]
    out = ops.ffn(x.to(dtype), *args, True)
    assert relative_error(out, functional.ffn(x, w1, b1, w2, b2, True)) < TOL[dtype]
    empty = torch.empty(0, 8, 5, 6, dtype=dtype)
    assert ops.dwconv(empty, weight.to(dtype), bias.to(dtype), False, True).shape == empty.shape
    assert ops.ffn(empty, *args, True).shape == empty.shape


def test_dwconv_ffn_channels_last_float64():
    weight, bias = random_dwconv_params(20, 5)
    w1, b1, w2, b2 = random_ffn_params(20, 36)
    x = random_input(3, 20, 6, 7, channels_last=True)
    for relu in (False, True):
        out = ops.dwconv(x, weight, bias, relu, True)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert relative_error(out, functional.dwconv(x, weight, bias, relu, True)) < TOL[torch.float64]
    out = ops.ffn(x, w1, b1, w2, b2, True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, functional.ffn(x, w1, b1, w2, b2, True)) < TOL[torch.float64]
    # 24 channels, whole float64 vectors: the last GEMM adds the residual to its finished sums and
    # writes the output, in place of the copy that adds it for 20.
    w1, b1, w2, b2 = random_ffn_params(24, 40)
    x = random_input(3, 24, 6, 7, channels_last=True)
    out = ops.ffn(x, w1, b1, w2, b2, True)
    assert relative_error(out, functional.ffn(x, w1, b1, w2, b2, True)) < TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [64, 24, 20])
def test_ffn_residual_rounds_as_a_separate_add(C, dtype):
    # The residual joins the finished sums (adding it first would round every multiply-add at
    # the residual's magnitude), whether the kernel writes the output itself or copies it.
    w1, b1, w2, b2 = [t.to(dtype) for t in random_ffn_params(C, 2 * C, seed=C)]
    for channels_last in (False, True):
        x = (random_input(3, C, 7, 9, channels_last=channels_last) * 10).to(dtype)
        assert torch.equal(ops.ffn(x, w1, b1, w2, b2, True), ops.ffn(x, w1, b1, w2, b2, False) + x)


def test_dwconv_ffn_nan_propagates():
    weight, bias = random_dwconv_params(8)
    w1, b1, w2, b2 = random_ffn_params(8, 16)
    x = random_input(1, 8, 5, 5).float()
    x[0, 1, 2, 2] = float("nan")
    assert torch.isnan(ops.dwconv(x, weight.float(), bias.float(), True, False)).any()
    assert torch.isnan(ops.ffn(x, w1.float(), b1.float(), w2.float(), b2.float(), False)).any()


def _opcheck_cases():
    p = cast(random_cga_params(32, 2, (5, 3), 7), torch.float32)
    x = random_input(2, 32, 9, 8).float()

    w, b = random_dwconv_params(32)
    ffn = random_ffn_params(32, 64)
    return [(ops.cga.default, (x, *cga_args(p), True)),
            (ops.dwconv.default, (x, w.float(), b.float(), True, True)),
            (ops.ffn.default, (x, *[t.float() for t in ffn], True)),
            (ops.ffn.default, (x.to(memory_format=torch.channels_last), *[t.float() for t in ffn], False))]


@pytest.mark.parametrize("case", range(4))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                "test_aot_dispatch_static", "test_aot_dispatch_dynamic"))
