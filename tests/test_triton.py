"""What only the Triton kernels have: fp16 rounding points checked in the interpreter, their
own input checks, and the package importing without triton. (Their correctness on every case is
tested with the other backends': tests/test_cga.py, test_dwconv.py, test_ffn.py,
test_patch_embed.py, test_conv1x1.py, test_squeeze_excite.py.)"""
import importlib
import sys

import pytest
import torch

pytest.importorskip("triton")  # conftest.py sets TRITON_INTERPRET=1 where there is no GPU

import efficientvit_kernels  # noqa: E402
import efficientvit_kernels.triton as kernels  # noqa: E402
triton_ffn = importlib.import_module("efficientvit_kernels.triton.ffn")  # the module
from efficientvit_kernels.testing import (assert_close, cast, cga_args, random_cga_params,  # noqa: E402
                                          random_dwconv_params, random_ffn_params, random_input,
                                          random_patch_embed_params, reference_cga,
                                          relative_error)
import python_ref as R  # noqa: E402
from python_ref import functional  # noqa: E402

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"


def to_device(t, dtype):
    """t rounded to dtype on DEVICE with t's strides (.to would make a strided view contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=DEVICE).copy_(t)


@pytest.mark.skipif(GPU, reason="the GPU runs every case in fp16")
def test_fp16_in_interpreter():
    # The interpreter's dots take fp16 operands with fp32 accumulation, like tensor cores:
    # this checks the kernels' rounding points. (Its bf16 dots and casts are not faithful.)
    dtype = torch.float16
    p = cast(random_cga_params(72, 3, (5, 3, 3), 7), dtype, DEVICE)
    x = to_device(random_input(1, 72, 10, 9), dtype)
    assert_close(kernels.cga(x, *cga_args(p), False), reference_cga(x, cast(p, torch.float64), False))
    x = to_device(random_input(2, 40, 5, 6, channels_last=True), dtype)
    w, b = (to_device(t, dtype) for t in random_dwconv_params(40))
    ref = functional.dwconv(*(t.double() for t in (x, w, b)), True, False)
    assert_close(kernels.dwconv(x, w, b, True, False), ref)
    ffn = [to_device(t, dtype) for t in random_ffn_params(40, 88)]
    ref = functional.ffn(*(t.double() for t in (x, *ffn)), False)
    assert_close(kernels.ffn(x, *ffn, False), ref)
    # the stem's and PatchMerging's ops (ffn's parameters serve squeeze-excite and conv1x1)
    ref = functional.squeeze_excite(*(t.double() for t in (x, *ffn)))
    assert_close(kernels.squeeze_excite(x, *ffn), ref)
    # its gates in 64-channel steps, the last partial, and images for two programs of 16
    se = [to_device(t, dtype) for t in random_ffn_params(136, 34, seed=3)]
    xs = to_device(random_input(18, 136, 3, 2, channels_last=True), dtype)
    ref = functional.squeeze_excite(*(t.double() for t in (xs, *se)))
    assert_close(kernels.squeeze_excite(xs, *se), ref)
    conv = [*ffn[:2], *(to_device(t, dtype) for t in random_dwconv_params(88))]
    ref = functional.conv1x1(*(t.double() for t in (x, *conv[:2])), True, *(t.double() for t in conv[2:]))
    assert_close(kernels.conv1x1(x, *conv[:2], True, *conv[2:]), ref)
    weights, biases = ([to_device(t, dtype) for t in ts] for ts in random_patch_embed_params([3, 16, 24]))
    x = to_device(random_input(1, 3, 13, 10), dtype)
    ref = functional.patch_embed(x.double(), [w.double() for w in weights], [b.double() for b in biases], False)
    assert_close(kernels.patch_embed(x, weights, biases, False), ref)


@pytest.mark.skipif(GPU, reason="the GPU runs every case in fp16")
@pytest.mark.parametrize("d,kernel_sizes,window", [
    (64, (7, 5), 7),      # v in two 32-channel passes, the projection in two 64-channel steps
    (48, (7, 5, 3), 7),   # the second pass partial (d padded to 48, 64 columns)
    (40, (5, 3), 4),      # stacked 4x4 windows: 16-channel passes, a partial projection step
], ids=["d64_7x7", "d48_7x7", "d40_4x4"])
def test_cga_fp16_paths_in_interpreter(d, kernel_sizes, window):
    """The attention's fp16/bf16-only paths (the weights kept in registers for the value
    product, v in wider passes, the projection 64 input channels a step), which the fp32 cases
    of tests/test_cga.py do not take."""
    dtype = torch.float16
    heads = len(kernel_sizes)
    p = cast(random_cga_params(heads * d, heads, kernel_sizes, window), dtype, DEVICE)
    x = to_device(random_input(2, heads * d, 9, 8, channels_last=True), dtype)
    assert_close(kernels.cga(x, *cga_args(p), True), reference_cga(x, cast(p, torch.float64), True))


# The staged FFN kernel (fp16/bf16 past 256 channels): (C, hidden, K of the dwconv before it,
# B, H, W, layout, residual). Hidden widths within one chunk and past several (a last one
# masked); output columns in tiles of 128, a last one masked; a token tile spanning images,
# and images of several tiles, so that a program loops over tiles (the interpreter runs two
# programs) and reuses its scratch.
STAGED_FFN_CASES = {
    "c272_m40_span_images": (272, 40, 3, 2, 5, 6, "channels_last", True),
    "c320_m640": (320, 640, 5, 1, 3, 5, "contiguous", False),
    "c384_m768": (384, 768, 3, 1, 4, 4, "channels_last", True),
    "c288_m80_tiles_per_image": (288, 80, 3, 2, 9, 9, "strided", True),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] if GPU else [torch.float16])
@pytest.mark.parametrize("tiling", range(len(triton_ffn.STAGED_TILINGS)),
                         ids=[f"bt{t['BT']}" for t in triton_ffn.STAGED_TILINGS])
@pytest.mark.parametrize("case", list(STAGED_FFN_CASES))
def test_staged_ffn(case, tiling, dtype, monkeypatch):
    """Each tiling on its own (a GPU runs the faster; the interpreter, the first)."""
    monkeypatch.setattr(triton_ffn, "STAGED_TILINGS", triton_ffn.STAGED_TILINGS[tiling:][:1])
    C, M, K, B, H, W, layout, residual = STAGED_FFN_CASES[case]
    x = to_device(random_input(B, C, H, W, layout=layout), dtype)
    ffn = [to_device(t, dtype) for t in random_ffn_params(C, M, seed=C + M)]
    dw = [to_device(t, dtype) for t in random_dwconv_params(C, K, seed=K)]
    ref = functional.ffn(*(t.double() for t in (x, *ffn)), residual)
    assert_close(kernels.ffn(x, *ffn, residual), ref, dtype, f"staged ffn {case}")
    ref = functional.dwconv_ffn(*(t.double() for t in (x, *dw, *ffn)))
    assert_close(kernels.dwconv_ffn(x, *dw, *ffn), ref, dtype, f"staged dwconv_ffn {case}")


def test_bad_input():
    x = to_device(random_input(1, 32, 7, 7), torch.float32)
    w, b = (to_device(t, torch.float32) for t in random_dwconv_params(32))
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.dwconv(x, w[:16], b, False, True)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        kernels.dwconv(x.double(), w.double(), b.double(), False, True)
    ffn = [to_device(t, torch.float32) for t in random_ffn_params(32, 64)]
    with pytest.raises(ValueError, match="dtype"):
        kernels.ffn(x, ffn[0].half(), *ffn[1:], True)
    p = cast(random_cga_params(32, 2, (5, 5), 7), torch.float32, DEVICE)
    with pytest.raises(ValueError, match="attention_bias must have shape"):
        kernels.cga(x, *cga_args(p)[:7], 4, p["scale"], True)
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.conv1x1(x, ffn[0][:, :16], ffn[1], True)
    with pytest.raises(ValueError, match="dw_weight and dw_bias together"):
        kernels.conv1x1(x, *ffn[:2], True, w)
    with pytest.raises(ValueError, match="w2 must have shape"):
        kernels.squeeze_excite(x, ffn[0], ffn[1], ffn[0], ffn[3])
    weights, biases = ([to_device(t, torch.float32) for t in ts] for ts in random_patch_embed_params([3, 8]))
    with pytest.raises(ValueError, match=r"weights\[0\] must have shape"):
        kernels.patch_embed(x, weights, biases, False)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        kernels.patch_embed(x[:, :3].double(), [w.double() for w in weights], [b.double() for b in biases], False)


def test_import_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.delitem(sys.modules, "efficientvit_kernels.triton")
    monkeypatch.setattr(efficientvit_kernels, "triton", kernels)  # restored afterwards
    fresh = importlib.import_module("efficientvit_kernels.triton")
    assert kernels.available() and not fresh.available()
    for name in fresh.OPS:
        with pytest.raises(RuntimeError, match=f"triton.{name} needs triton"):
            getattr(fresh, name)()


@pytest.mark.parametrize("warps,registers,spill,spills,expected", [
    (4, 200, 0, {}, {}),                        # 128 threads: two blocks fit up to 255 registers
    (8, 128, 0, {}, {}),                        # two blocks already
    (8, 162, 0, {}, {"maxnreg": 128}),          # the cap brings the second block, no spill
    (8, 162, 0, {(128, 3): 8}, {"maxnreg": 128, "num_stages": 2}),  # with two stages
    (8, 162, 0, {(128, 3): 8, (128, 2): 8}, {"maxnreg": 128, "num_stages": 1}),  # with one
    (8, 162, 0, {(128, 3): 8, (128, 2): 8, (128, 1): 8}, {}),  # the cap spills: left as it is
    (8, 128, 8, {}, {"maxnreg": 128}),          # ptxas's own choice spills, an explicit 128 not
    (8, 128, 8, {(128, 3): 8, (128, 2): 8, (128, 1): 8}, {"maxnreg": 255}),
    (4, 128, 8, {}, {"maxnreg": 128}),          # four blocks of 128 threads
    (4, 128, 8, {(128, 3): 8}, {"maxnreg": 168}),  # three
    (4, 128, 8, {(128, 3): 8, (168, 3): 8}, {"maxnreg": 255}),  # two
    (4, 128, 8, {(128, 3): 8, (168, 3): 8, (255, 3): 8}, {"maxnreg": 255, "num_stages": 1}),
    (8, 255, 8, {(128, 3): 8, (128, 2): 8, (128, 1): 8, (255, 3): 8, (255, 1): 8}, {}),
    (16, 128, 8, {(128, 3): 8}, {"maxnreg": 128, "num_stages": 1}),  # 512 threads: 128 at most
    (16, 128, 8, {(128, 3): 8, (128, 1): 8}, {}),
], ids=["4warps", "8warps_fits", "8warps_capped", "8warps_capped_2stages",
        "8warps_capped_1stage", "8warps_cap_spills", "8warps_spill_capped",
        "8warps_spill_uncapped", "4warps_spill_4blocks",
        "4warps_spill_3blocks", "4warps_spill_2blocks", "4warps_spill_one_stage",
        "spills_anyway", "16warps_one_stage", "16warps_spills_anyway"])
def test_register_cap_policy(warps, registers, spill, spills, expected):
    """A launch's register limit: 128 for a 256-thread launch that takes more (two blocks per
    multiprocessor), with three stages of loads in flight or else two or one, where that spills
    nothing; for a launch whose compile spills, the first of those, then the limits that let
    4, 3, 2, 1 blocks reside (of 128 threads: 128, 168, 255; of 256: 128, 255; of 512: 128),
    then the one-block limit with one stage, that spills nothing. ``spills``: what a compile
    with (limit, stages) spills."""
    from efficientvit_kernels.triton._common import capped_registers

    def compile(kwargs):
        if "maxnreg" not in kwargs:
            return registers, spill
        return kwargs["maxnreg"], spills.get((kwargs["maxnreg"], kwargs.get("num_stages", 3)), 0)

    kwargs = capped_registers({"num_warps": warps, "BD": 16}, compile)
    assert kwargs == {"num_warps": warps, "BD": 16, **expected}


def test_run_fastest_measures_once_per_key(monkeypatch):
    """run_fastest times each launch the first time a key comes, then runs the fastest alone
    for that key; a lone launch runs untimed."""
    from efficientvit_kernels.triton import _common
    monkeypatch.setattr(_common, "_FASTEST", {})
    runs, timed = [], []
    times = {"a": 2.0, "b": 1.0, "c": 3.0}

    def bench(launch):
        timed.append(launch.__name__)
        return times[launch.__name__]
    monkeypatch.setattr(_common.triton.testing, "do_bench", bench)

    def launch(name):
        def run():
            runs.append(name)
        run.__name__ = name
        return run
    launches = [launch(n) for n in "abc"]
    _common.run_fastest("k", launches)
    _common.run_fastest("k", launches)
    assert timed == ["a", "b", "c"] and runs == ["b", "b"]
    times["a"] = 0.5  # another key is measured on its own
    _common.run_fastest("k2", launches)
    assert runs == ["b", "b", "a"]
    _common.run_fastest("k3", launches[2:])
    assert timed == ["a", "b", "c"] * 2 and runs == ["b", "b", "a", "c"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_converted_model(dtype):
    """A model converted for Triton runs on its kernels alone (no convolution is left: the
    stem and PatchMerging run on theirs) and computes the reference's output: in fp32, and in
    fp16, where each dwconv runs in the kernel of the FFN after it, as in the model converted
    without that fusion (bit for bit in the interpreter)."""
    model = R.randomize_(R.build("m0"), seed=1)
    fused = efficientvit_kernels.convert(model, backend="triton").to(DEVICE, dtype)
    assert not any(isinstance(m, torch.nn.Conv2d) for m in fused.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = fused(x.to(DEVICE, dtype)).cpu()
    ref = R.fold_batchnorm(model).double()(x.double())
    if dtype == torch.float32:
        assert_close(out, ref, dtype)
        return
    # a whole fp16 model: the bound benchmarks/bench_models_gpu.py holds the fused models to
    assert relative_error(out, ref) < 1e-2
    if GPU:  # autotuning may tile the fused FFN otherwise: its hidden chunks sum in another order
        return
    unpaired = efficientvit_kernels.convert(model, backend="triton", passes=[
        p for p in efficientvit_kernels.PASSES if p != "dwconv_ffn"]).to(DEVICE, dtype)
    assert not any(isinstance(m, efficientvit_kernels.FusedDWConvFFN) for m in unpaired.modules())
    with torch.no_grad():
        assert torch.equal(out, unpaired(x.to(DEVICE, dtype)).cpu())
