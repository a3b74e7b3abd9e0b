"""Per-op CPU microbenchmarks (pytest-benchmark), one thread, batch 16, fp32: fused vs reference.

    python -m pytest benchmarks/test_ops_cpu.py --benchmark-only --benchmark-group-by=param:shape

Each shape is timed for the fused op ("fused"), for cga and ffn also on weights packed ahead
("packed", what a converted model runs), and for its plain-PyTorch spec on the same folded
parameters ("reference"); compare within a group.
"""
import os
import sys

import pytest
import torch

import efficientvit_kernels  # noqa: F401
from python_ref import functional

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from cases import cast, cga_args, random_cga_params, random_dwconv_params, random_ffn_params  # noqa: E402

BATCH = 16
# (label, C, heads, kernels, window, map size): the attention stages of M4 and M0 at 224^2
CGA_SHAPES = [("m4-s1", 128, 4, (7, 5, 3, 3), 7, 14), ("m4-s2", 256, 4, (7, 5, 3, 3), 7, 7),
              ("m4-s3", 384, 4, (7, 5, 3, 3), 4, 4), ("m0-s1", 64, 4, (5,) * 4, 7, 14),
              ("m0-s2", 128, 4, (5,) * 4, 7, 7), ("m0-s3", 192, 4, (5,) * 4, 4, 4)]
PW_SHAPES = [("m4-s1", 128, 14), ("m4-s2", 256, 7), ("m4-s3", 384, 4), ("m0-s1", 64, 14)]
IMPLS = {"fused": torch.ops.efficientvit, "reference": functional}
PACKED = "packed"  # cga_packed / ffn_packed on weights packed before the timing


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("impl", [*IMPLS, PACKED])
@pytest.mark.parametrize("shape", CGA_SHAPES, ids=[s[0] for s in CGA_SHAPES])
def test_cga(benchmark, shape, impl):
    _, C, heads, kernels, window, size = shape
    p = cast(random_cga_params(C, heads, kernels, window), torch.float32)
    x = torch.randn(BATCH, C, size, size)
    with torch.no_grad():
        if impl == PACKED:
            packed = torch.ops.efficientvit.cga_pack(*cga_args(p))
            benchmark(torch.ops.efficientvit.cga_packed, x, packed, p["dw_weight"].shape[1], window, True)
        else:
            benchmark(IMPLS[impl].cga, x, *cga_args(p), True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", PW_SHAPES, ids=[s[0] for s in PW_SHAPES])
def test_dwconv(benchmark, shape, impl):
    _, C, size = shape
    w, b = random_dwconv_params(C, dtype=torch.float32)
    x = torch.randn(BATCH, C, size, size)
    with torch.no_grad():
        benchmark(IMPLS[impl].dwconv, x, w, b, False, True)


@pytest.mark.parametrize("impl", [*IMPLS, PACKED])
@pytest.mark.parametrize("shape", PW_SHAPES, ids=[s[0] for s in PW_SHAPES])
def test_ffn(benchmark, shape, impl):
    _, C, size = shape
    w1, b1, w2, b2 = random_ffn_params(C, 2 * C, dtype=torch.float32)
    x = torch.randn(BATCH, C, size, size)
    with torch.no_grad():
        if impl == PACKED:
            benchmark(torch.ops.efficientvit.ffn_packed, x, torch.ops.efficientvit.ffn_pack(w1, b1, w2, b2), True)
        else:
            benchmark(IMPLS[impl].ffn, x, w1, b1, w2, b2, True)
