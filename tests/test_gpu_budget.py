"""The quick GPU check (benchmarks/gpu_check.sh) stays within its time: the Triton kernels it
compiles are counted here, without a GPU, and held to a budget.

Each distinct specialization costs one compilation on the GPU machine (one Triton cache is
shared by the steps and the test workers), two where its launcher may also compile it with a
register limit. The cases replayed are the quick cases of
tests/test_gpu.py (their parameter lists, ``gpu_full`` ones left out) and the models the
check times (M0 and M4, fp16, batch 1 and 2048), with their launches recorded on meta tensors
(efficientvit_kernels.triton_static.recording).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The quick check's time for its tests (benchmarks/gpu_check.sh: 100 s on 16 pytest-xdist
# workers) and for timing the models (65 s, one process); at most half of either may go to
# compiling.
TEST_SECONDS, WORKERS, MODEL_SECONDS = 100, 16, 65


def compile_seconds():
    """Mean time to compile one specialization of each kernel for sm_90, measured from an empty
    cache on this project's 2-core CPU machine (benchmarks/gpu_static.py wrote them; the GPU
    machine's cores are no slower)."""
    with open(os.path.join(ROOT, "benchmarks", "results", "gpu_static.json")) as f:
        rows = [r for r in json.load(f)["rows"] if r["backend"] == "triton" and r["arch"] == 90]
    times = {}
    for r in rows:
        times.setdefault(r["kernel"], []).append(r["compile_seconds"])
    return {kernel: sum(t) / len(t) for kernel, t in times.items()}


# Runs where TRITON_INTERPRET is unset: the kernels must be the compiled kind to be recorded.
COUNT = r"""
import collections
import json
import torch
import test_gpu as t
from efficientvit_kernels.testing import cast, cga_args, random_cga_params, random_dwconv_params, random_ffn_params
from efficientvit_kernels.testing import random_patch_embed_params, stage_shapes
from efficientvit_kernels import triton as k, triton_static as s
from efficientvit_kernels.triton._common import REGISTER_CAPPED

def meta(shape, dtype, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, device="meta", dtype=dtype, memory_format=fmt)

def cga(C, heads, kernels, window, shape, dtype, channels_last=False, key_dim=16,
        residual=True):
    p = cast(random_cga_params(C, heads, kernels, window, key_dim=key_dim), dtype, "meta")
    k.cga(meta(shape, dtype, channels_last), *cga_args(p), residual)

with s.recording() as tests:
    for dtype in t.DTYPES:
        for _, C, heads, kernels, window in stage_shapes():
            if dtype in t.quick(t.STAGE_DTYPES):
                cga(C, heads, kernels, window, (2, C) + {7: (14, 14), 4: (4, 4)}[window], dtype,
                    channels_last=True)
        for window, H, W in t.quick(t.CGA_PADDED):
            for cl in (False, True):
                cga(64, 4, (7, 5, 3, 3), window, (3, 64, H, W), dtype, cl)
        for batch in (1, 16):
            for residual in (True, False):
                cga(48, 3, (7, 5, 3), 7, (batch, 48, 9, 11), dtype, residual=residual)
        for heads, kernels, kd in t.quick(t.CGA_HEADS):
            cga(heads * 12, heads, kernels, 7, (2, heads * 12, 7, 9), dtype, key_dim=kd)
        p = cast(random_cga_params(32, 2, (5, 5), 7), dtype, "meta")  # a strided x
        k.cga(meta((2, 32, 16, 12), dtype)[:, :, 1:, ::2], *cga_args(p), True)
        cga(32, 2, (5, 5), 7, (1, 32, 7, 7), dtype)  # test_cga_nan_propagates'
        for C, M in ((8, 16), (64, 128)):  # test_dwconv_ffn_nan_and_empty, graph capture
            w, b = (x.to("meta", dtype) for x in random_dwconv_params(C))
            k.dwconv(meta((4, C, 14, 14), dtype), w, b, True, C == 64)
            ws = [x.to("meta", dtype) for x in random_ffn_params(C, M)]
            k.ffn(meta((4, C, 14, 14), dtype), *ws, C == 64)
        w, b = (x.to("meta", dtype) for x in random_dwconv_params(64))  # graph capture
        k.dwconv_ffn(meta((4, 64, 14, 14), dtype), w, b, *ws)
        cga(64, 4, (7, 5, 3, 3), 7, (4, 64, 14, 14), dtype)  # test_cuda_graph_capture's
        for C, K in t.quick(t.DWCONV_CHANNELS):
            w, b = (x.to("meta", dtype) for x in random_dwconv_params(C, K))
            for H, W in t.quick(t.DWCONV_SIZES):
                for cl in (False, True):
                    for relu in (False, True):
                        for residual in (False, True):
                            k.dwconv(meta((2, C, H, W), dtype, cl), w, b, relu, residual)
        for C, M in t.quick(t.FFN_CHANNELS):
            ws = [x.to("meta", dtype) for x in random_ffn_params(C, M)]
            w, b = (x.to("meta", dtype) for x in random_dwconv_params(C))
            for B, H, W in t.quick(t.FFN_SIZES):
                for cl in (False, True):
                    for residual in (False, True):
                        k.ffn(meta((B, C, H, W), dtype, cl), *ws, residual)
                    k.dwconv_ffn(meta((B, C, H, W), dtype, cl), w, b, *ws)
        for cl in (False, True):
            for channels in t.quick(t.PATCH_EMBED_CHANNELS):
                ws, bs = ([x.to("meta", dtype) for x in xs] for xs in random_patch_embed_params(channels))
                k.patch_embed(meta((2, 3, 61, 48), dtype, cl), ws, bs, False)
            for C, Co, depthwise in t.quick(t.CONV1X1_CHANNELS):
                w, b = (x.to("meta", dtype) for x in random_ffn_params(C, Co)[:2])
                dw = [x.to("meta", dtype) for x in random_dwconv_params(Co)] if depthwise else []
                k.conv1x1(meta((2, C, 15, 14), dtype, cl), w, b, True, *dw)
            for C, R in t.quick(t.SQUEEZE_EXCITE_CHANNELS):
                ws = [x.to("meta", dtype) for x in random_ffn_params(C, R)]
                k.squeeze_excite(meta((2, C, 7, 7), dtype, cl), *ws)
# test_auto_backend_model: M0 in fp16, its Triton kernels among the candidates
tests += s.model_launches(("m0",), (torch.float16,), ((2, 64),))
models = s.model_launches(("m0", "m4"), (torch.float16,), ((1, 224), (2048, 224)))
quick = s.unique_launches(tests, 90)
more = s.unique_launches(tests + models, 90)[len(quick):]

def compilations(launches):
    # A launch whose launcher chooses its register limit costs one to five compilations (see
    # triton/_common.py; 1.4 on average over the models' launches on sm_90): counted twice,
    # without compiling to find out.
    capped = lambda l: l.kernel.fn.__name__ in REGISTER_CAPPED
    return collections.Counter(l.kernel.fn.__name__ for l in launches + list(filter(capped, launches)))

print(json.dumps([compilations(ls) for ls in (quick, more)]))
"""


def test_quick_check_compilations_fit_its_time():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])
    proc = subprocess.run([sys.executable, "-c", COUNT], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tests, models = json.loads(proc.stdout)
    seconds = compile_seconds()
    test_time = sum(n * seconds[kernel] for kernel, n in tests.items())
    model_time = sum(n * seconds[kernel] for kernel, n in models.items())
    print(f"quick check: Triton compilations {tests} in the tests, {test_time:.0f} s of compiling "
          f"(budget {TEST_SECONDS * WORKERS / 2:.0f} s over {WORKERS} workers); {models} more for "
          f"the models, {model_time:.0f} s (budget {MODEL_SECONDS / 2:.0f} s)")
    assert test_time <= TEST_SECONDS * WORKERS / 2
    assert model_time <= MODEL_SECONDS / 2
