"""What only the Triton kernels have: fp16 rounding points checked in the interpreter, their
own input checks, and the package importing without triton. (Their correctness on every case is
tested with the other backends': tests/test_cga.py, test_dwconv.py, test_ffn.py.)"""
import importlib
import sys

import pytest
import torch

pytest.importorskip("triton")  # conftest.py sets TRITON_INTERPRET=1 where there is no GPU

import efficientvit_kernels  # noqa: E402
import efficientvit_kernels.triton as kernels  # noqa: E402
from efficientvit_kernels.testing import (assert_close, cast, cga_args, random_cga_params,  # noqa: E402
                                          random_dwconv_params, random_ffn_params, random_input,
                                          reference_cga)
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


def test_import_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.delitem(sys.modules, "efficientvit_kernels.triton")
    monkeypatch.setattr(efficientvit_kernels, "triton", kernels)  # restored afterwards
    fresh = importlib.import_module("efficientvit_kernels.triton")
    assert kernels.available() and not fresh.available()
    with pytest.raises(RuntimeError, match="needs triton"):
        fresh.ffn(None, None, None, None, None)


@pytest.mark.parametrize("warps,registers,capped_spill,expected", [
    (4, 200, 0, None),     # 128 threads: two blocks fit up to 255 registers
    (8, 128, 0, None),     # two blocks already
    (8, 162, 0, 128),      # the cap brings the second block, without spilling
    (8, 162, 8, None),     # the cap would spill: left as it is
], ids=["4warps", "8warps_fits", "8warps_capped", "8warps_cap_spills"])
def test_register_cap_policy(warps, registers, capped_spill, expected):
    """A 256-thread launch gets maxnreg=128 (two blocks per multiprocessor) exactly where the
    kernel takes more and the capped compile spills nothing."""
    from efficientvit_kernels.triton._common import capped_registers
    compiles = []

    def compile(kwargs):
        compiles.append(kwargs)
        return (kwargs["maxnreg"], capped_spill) if "maxnreg" in kwargs else (registers, 0)

    kwargs = capped_registers({"num_warps": warps, "BD": 16}, compile)
    assert kwargs.get("maxnreg") == expected
    assert {k: v for k, v in kwargs.items() if k != "maxnreg"} == {"num_warps": warps, "BD": 16}
