"""The GPU backends against python_ref.functional (the spec) in float64, on a CUDA device.

Backends: "cuda" (torch.ops.efficientvit.* with the kernels of csrc/cuda) and "triton"
(efficientvit_kernels.triton), each in fp32, fp16 and bf16, over the M0-M5 layer shapes and
larger batches than the per-op tests (test_cga.py, test_dwconv.py, test_ffn.py) run.
The reference runs on the inputs already rounded to the dtype, so the error measured is the
kernel's alone. Every output is poisoned with NaN first, so an element a kernel skips fails.

The quick GPU check (benchmarks/gpu_check.sh) runs ``-m "not gpu_full"``: every code path
(each model stage, padded and whole-map windows, batch 1 and 16, both layouts, fp32 and fp16)
on fewer sizes; ``gpu_full`` marks the rest (bf16 among it). The module imports without a
GPU, so that tests/test_gpu_budget.py can count the Triton compilations the quick cases cause.
"""
import pytest
import torch

import efficientvit_kernels
from efficientvit_kernels.testing import (assert_close, assert_layout, call_poisoned, cast, cga_args,
                                          random_cga_params, random_dwconv_params, random_ffn_params,
                                          random_input, random_patch_embed_params, reference_cga,
                                          relative_error, stage_shapes)
from python_ref import functional

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

DEVICE = "cuda"


def _cuda_ops():
    if not efficientvit_kernels.ops.has_compiled_kernels("cuda"):
        pytest.skip("efficientvit_kernels was built without its CUDA kernels (nvcc missing at build?)")
    return torch.ops.efficientvit


def _triton_ops():
    try:
        import efficientvit_kernels.triton as kernels
    except ImportError as e:
        pytest.skip(f"efficientvit_kernels.triton is not importable: {e}")
    if not getattr(kernels, "available", lambda: True)():
        pytest.skip("triton is not installed")
    return kernels


@pytest.fixture(params=["cuda", "triton"])
def backend(request):
    ops = _cuda_ops() if request.param == "cuda" else _triton_ops()
    return request.param, ops


def full(*values):
    """A parameter set that only the full GPU check runs."""
    return pytest.param(*values, marks=pytest.mark.gpu_full)


# bf16 only in the full check: each kernel's bf16 is its fp16 code with the other element type
# (the smoke run, bench_gpu.py --smoke, still runs both backends' attention in bf16), and its
# Triton compilations were a third of the quick check's.
DTYPES = (torch.float32, torch.float16, full(torch.bfloat16))
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])


def quick(params):
    """The values of the parameter sets the quick GPU check runs."""
    return [p for p in params if not (hasattr(p, "marks") and p.marks)]


# (window, H, W): padded windows on both sides, whole-map windows, a map smaller than a window
CGA_PADDED = [(7, 10, 13), full(7, 17, 9), (7, 7, 7), (7, 1, 1), full(7, 8, 15),
              (4, 3, 5), (4, 4, 4), full(4, 5, 3), full(4, 9, 2)]
CGA_HEADS = [(1, (1,), 16), (2, (3, 1), 8), full(8, (7,) * 8, 16), (5, (5, 3, 3, 1, 1), 4)]
DWCONV_CHANNELS = [(64, 3), full(144, 3), (240, 5), (17, 1)]
DWCONV_SIZES = [(14, 14), full(7, 5), (1, 1), full(4, 9)]
FFN_CHANNELS = [(64, 128), full(144, 288), (384, 768), (20, 7)]
FFN_SIZES = [(2, 14, 14), full(1, 5, 3), full(16, 4, 4)]
# The stem's and PatchMerging's ops, Triton only (backend "cuda" runs their PyTorch definition):
# M4's and M5's stems, a pair of widths that are not whole tiles (from 20 channels: the pair
# kernel's 16-warp variant, as M5's stem runs it); M4's first PatchMerging (its first
# convolution with the depthwise one, its last), odd widths with and without.
PATCH_EMBED_CHANNELS = [[3, 16, 32, 64, 128], full([3, 24, 48, 96, 192]), [3, 20, 12]]
CONV1X1_CHANNELS = [(128, 512, True), (512, 256, False), (20, 36, True), full(36, 20, False)]
SQUEEZE_EXCITE_CHANNELS = [(512, 128), full(1536, 384), (20, 5)]
layouts = pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])


def call(backend, op, x, *args):
    """op(x, *args) with its output poisoned (testing.call_poisoned); the CUDA ops allocate
    their output first, so for them the test also checks that it landed on the poison."""
    name, ops = backend
    return call_poisoned(getattr(ops, op), x, *args, output_first=name == "cuda")


def check_cga(backend, x, params, dtype, residual=True):
    p = cast(params, dtype, DEVICE)
    xd = x.to(device=DEVICE, dtype=dtype)  # a no-op for a tensor already there: keeps its strides
    out = call(backend, "cga", xd, *cga_args(p), residual)
    assert out.shape == x.shape and out.dtype == dtype and out.device == xd.device
    assert_layout(out, xd)
    assert_close(out, reference_cga(xd.cpu(), cast(p, torch.float64, "cpu"), residual), dtype)


# Every model stage in fp16 (the speed target); in fp32 and bf16, whose code paths the other
# tests reach, only in the full check. Channels-last, as the converted models run them (so the
# quick check's tests compile the Triton attention the models step times).
STAGE_DTYPES = [full(torch.float32), torch.float16, full(torch.bfloat16)]


@pytest.mark.parametrize("dtype", STAGE_DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("name,C,heads,kernels,window", stage_shapes(), ids=lambda v: str(v))
def test_cga_every_model_stage(backend, dtype, name, C, heads, kernels, window):
    size = {7: (14, 14), 4: (4, 4)}[window]
    check_cga(backend, random_input(2, C, *size, channels_last=True),
              random_cga_params(C, heads, kernels, window), dtype)


@dtypes
@layouts
@pytest.mark.parametrize("window,H,W", CGA_PADDED)
def test_cga_padded_windows(backend, dtype, window, H, W, channels_last):
    params = random_cga_params(64, 4, (7, 5, 3, 3), window, seed=H * 31 + W)
    check_cga(backend, random_input(3, 64, H, W, channels_last=channels_last), params, dtype)


@dtypes
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("residual", [True, False])
def test_cga_batch_residual(backend, dtype, batch, residual):
    params = random_cga_params(48, 3, (7, 5, 3), 7, seed=batch)
    check_cga(backend, random_input(batch, 48, 9, 11), params, dtype, residual)


@dtypes
@pytest.mark.parametrize("heads,kernels,key_dim", CGA_HEADS)
def test_cga_heads_kernels_key_dims(backend, dtype, heads, kernels, key_dim):
    C = heads * 12
    check_cga(backend, random_input(2, C, 7, 9), random_cga_params(C, heads, kernels, 7, key_dim=key_dim),
              dtype)


@dtypes
def test_cuda_cga_largest_window(dtype):
    # 8x8 windows of 384 channels: 64 tokens, the most the CUDA kernel's plan is sized for
    params = random_cga_params(384, 4, (7, 5, 3, 3), 8, seed=3)
    check_cga(("cuda", _cuda_ops()), random_input(2, 384, 12, 16), params, dtype)


@dtypes
def test_cga_non_contiguous_input(backend, dtype):
    x = random_input(2, 32, 16, 12).to(device=DEVICE, dtype=dtype)[:, :, 1:, ::2]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    check_cga(backend, x, random_cga_params(32, 2, (5, 5), 7), dtype)


@dtypes
def test_cga_nan_propagates(backend, dtype):
    p = cast(random_cga_params(32, 2, (5, 5), 7), dtype, DEVICE)
    x = random_input(1, 32, 7, 7).to(device=DEVICE, dtype=dtype)
    x[0, 3, 2, 2] = float("nan")
    assert torch.isnan(call(backend, "cga", x, *cga_args(p), True)).any()


def test_cga_batch_zero(backend):
    p = cast(random_cga_params(32, 2, (5, 5), 7), torch.float32, DEVICE)
    out = getattr(backend[1], "cga")(torch.empty(0, 32, 9, 9, device=DEVICE),
                                     *cga_args(p), True)
    assert out.shape == (0, 32, 9, 9)


def test_cuda_cga_rejects_what_it_cannot_hold():
    ops = _cuda_ops()
    p = cast(random_cga_params(384, 4, (7, 5, 3, 3), 16), torch.float32, DEVICE)
    with pytest.raises(RuntimeError, match="shared memory"):
        ops.cga(random_input(1, 384, 16, 16).float().to(DEVICE), *cga_args(p), True)
    p = cast(random_cga_params(32, 2, (5, 5), 7), torch.float64, DEVICE)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.cga(random_input(1, 32, 7, 7).to(DEVICE), *cga_args(p), True)


@dtypes
@layouts
@pytest.mark.parametrize("C,K", DWCONV_CHANNELS)
@pytest.mark.parametrize("H,W", DWCONV_SIZES)
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
def test_dwconv(backend, dtype, C, K, H, W, channels_last, relu, residual):
    weight, bias = (t.to(device=DEVICE, dtype=dtype) for t in random_dwconv_params(C, K, seed=C + K))
    x = random_input(2, C, H, W, channels_last=channels_last).to(device=DEVICE, dtype=dtype)
    out = call(backend, "dwconv", x, weight, bias, relu, residual)
    assert_layout(out, x)
    ref = functional.dwconv(x.cpu().double(), weight.cpu().double(), bias.cpu().double(),
                            relu, residual)
    assert_close(out, ref, dtype)


@dtypes
@layouts
@pytest.mark.parametrize("C,M", FFN_CHANNELS)
@pytest.mark.parametrize("B,H,W", FFN_SIZES)
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
def test_ffn(backend, dtype, C, M, B, H, W, channels_last, residual):
    w1, b1, w2, b2 = (t.to(device=DEVICE, dtype=dtype) for t in random_ffn_params(C, M, seed=C))
    x = random_input(B, C, H, W, channels_last=channels_last).to(device=DEVICE, dtype=dtype)
    out = call(backend, "ffn", x, w1, b1, w2, b2, residual)
    assert_layout(out, x)
    ref = functional.ffn(x.cpu().double(), *[t.cpu().double() for t in (w1, b1, w2, b2)], residual)
    assert_close(out, ref, dtype)


@dtypes
@layouts
@pytest.mark.parametrize("C,M", FFN_CHANNELS)
@pytest.mark.parametrize("B,H,W", FFN_SIZES)
def test_dwconv_ffn(backend, dtype, C, M, B, H, W, channels_last):
    """A block's dwconv and FFN as one op (the Triton backend's one kernel in fp16/bf16)."""
    dw = [t.to(device=DEVICE, dtype=dtype) for t in random_dwconv_params(C, 3, seed=M)]
    ffn = [t.to(device=DEVICE, dtype=dtype) for t in random_ffn_params(C, M, seed=C)]
    x = random_input(B, C, H, W, channels_last=channels_last).to(device=DEVICE, dtype=dtype)
    # not output_first: the CUDA backend's dwconv_ffn allocates the dwconv's output first
    out = call_poisoned(getattr(backend[1], "dwconv_ffn"), x, *dw, *ffn)
    assert_layout(out, x)
    assert_close(out, functional.dwconv_ffn(*(t.cpu().double() for t in (x, *dw, *ffn))), dtype)


@dtypes
def test_dwconv_ffn_nan_and_empty(backend, dtype):
    weight, bias = (t.to(device=DEVICE, dtype=dtype) for t in random_dwconv_params(8))
    ffn = [t.to(device=DEVICE, dtype=dtype) for t in random_ffn_params(8, 16)]
    x = random_input(1, 8, 5, 5).to(device=DEVICE, dtype=dtype)
    x[0, 1, 2, 2] = float("nan")
    assert torch.isnan(call(backend, "dwconv", x, weight, bias, True, False)).any()
    assert torch.isnan(call(backend, "ffn", x, *ffn, False)).any()
    empty = torch.empty(0, 8, 5, 6, device=DEVICE, dtype=dtype)
    assert getattr(backend[1], "dwconv")(empty, weight, bias, False, True).shape == empty.shape
    assert getattr(backend[1], "ffn")(empty, *ffn, True).shape == empty.shape


@dtypes
@layouts
@pytest.mark.parametrize("channels", PATCH_EMBED_CHANNELS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("kernels", ["triton", "cuda"])
def test_patch_embed(kernels, dtype, channels_last, channels):
    """The Triton kernels, and cuDNN's convolutions with the CUDA bias-and-ReLU kernel."""
    ops = _triton_ops() if kernels == "triton" else _cuda_ops()
    weights, biases = random_patch_embed_params(channels, seed=len(channels))
    x = random_input(2, 3, 61, 48, channels_last=channels_last).to(device=DEVICE, dtype=dtype)
    out = ops.patch_embed(x, [w.to(DEVICE, dtype) for w in weights],
                          [b.to(DEVICE, dtype) for b in biases], False)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = functional.patch_embed(x.cpu().double(), [w.to(dtype).double() for w in weights],
                                 [b.to(dtype).double() for b in biases], False)
    assert_close(out, ref, dtype)


@dtypes
@layouts
@pytest.mark.parametrize("C,Co,depthwise", CONV1X1_CHANNELS)
def test_triton_conv1x1(dtype, channels_last, C, Co, depthwise):
    weight, bias = (t.to(DEVICE, dtype) for t in random_ffn_params(C, Co, seed=C)[:2])
    dw = [t.to(DEVICE, dtype) for t in random_dwconv_params(Co, seed=Co)] if depthwise else []
    x = random_input(2, C, 15, 14, channels_last=channels_last).to(device=DEVICE, dtype=dtype)
    out = call(("triton", _triton_ops()), "conv1x1", x, weight, bias, True, *dw)
    assert_layout(out, x)
    ref = functional.conv1x1(*(t.cpu().double() for t in (x, weight, bias)), True,
                             *(t.cpu().double() for t in dw))
    assert_close(out, ref, dtype)


@dtypes
@layouts
@pytest.mark.parametrize("C,R", SQUEEZE_EXCITE_CHANNELS)
def test_triton_squeeze_excite(dtype, channels_last, C, R):
    params = [t.to(DEVICE, dtype) for t in random_ffn_params(C, R, seed=C)]
    x = random_input(2, C, 7, 7, channels_last=channels_last).to(device=DEVICE, dtype=dtype)
    out = call(("triton", _triton_ops()), "squeeze_excite", x, *params)
    assert_layout(out, x)
    assert_close(out, functional.squeeze_excite(*(t.cpu().double() for t in (x, *params))), dtype)


def _graph_case(op, dtype):
    """(args after x, input shape, reference function of x) for one call of op."""
    if op == "cga":
        p = random_cga_params(64, 4, (7, 5, 3, 3), 7, seed=5)
        pd = cast(p, dtype, DEVICE)
        return (cga_args(pd) + [True], (4, 64, 14, 14),
                lambda x: reference_cga(x.cpu(), cast(pd, torch.float64, "cpu")))
    if op == "dwconv_ffn":
        ws = [t.to(device=DEVICE, dtype=dtype)
              for t in (*random_dwconv_params(64, 3, seed=5), *random_ffn_params(64, 128, seed=5))]
        return (ws, (4, 64, 14, 14),
                lambda x: functional.dwconv_ffn(x.cpu().double(), *(t.cpu().double() for t in ws)))
    if op == "dwconv":
        w, b = (t.to(device=DEVICE, dtype=dtype) for t in random_dwconv_params(64, 3, seed=5))
        return ([w, b, True, True], (4, 64, 14, 14),
                lambda x: functional.dwconv(x.cpu().double(), w.cpu().double(), b.cpu().double(),
                                            True, True))
    ws = [t.to(device=DEVICE, dtype=dtype) for t in random_ffn_params(64, 128, seed=5)]
    return (ws + [True], (4, 64, 14, 14),
            lambda x: functional.ffn(x.cpu().double(), *[t.cpu().double() for t in ws], True))


@pytest.mark.parametrize("op", ["cga", "dwconv", "ffn", "dwconv_ffn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_cuda_graph_capture(backend, op, dtype):
    """The op records into a CUDA graph (no host sync, no allocation outside torch's allocator)
    and the replay computes on whatever the captured input buffer holds then."""
    fn = getattr(backend[1], op)
    args, shape, reference = _graph_case(op, dtype)
    static_x = random_input(*shape, seed=11).to(device=DEVICE, dtype=dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (autotuning, allocator caching)
        for _ in range(2):
            fn(static_x, *args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(static_x, *args)
    fresh = random_input(*shape, seed=12).to(device=DEVICE, dtype=dtype)
    static_x.copy_(fresh)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, reference(fresh), dtype)
    if backend[0] == "cuda":  # deterministic kernels: the replay matches an eager call bit for bit
        assert torch.equal(out, fn(fresh, *args))


def test_auto_backend_model(tmp_path, monkeypatch):
    """A model converted with backend "auto" on the GPU: every op's backend is measured on its
    first call and kept in the device's table (on file), and the model computes the
    reference's output."""
    from efficientvit_kernels import auto_backend
    import python_ref
    monkeypatch.setenv("EFFICIENTVIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(auto_backend, "_TABLES", {})
    model = python_ref.randomize_(python_ref.build("m0"), seed=4)
    fused = efficientvit_kernels.convert(model).half().to(DEVICE)  # backend "auto"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = fused(x.to(DEVICE, torch.float16)).float().cpu()
    # a whole fp16 model: the bound benchmarks/bench_models_gpu.py holds the fused models to
    assert relative_error(out, python_ref.fold_batchnorm(model).double()(x.double())) < 1e-2
    table = auto_backend.table(torch.device(DEVICE))
    assert {key.split()[0] for key in table.choices} == {
        "cga", "dwconv", "ffn", "patch_embed", "conv1x1", "squeeze_excite"}
    assert set(table.choices.values()) <= {"cuda", "triton", "reference"}
    with open(table.path) as f:
        assert f.read().count('"') >= 4 * len(table.choices)
