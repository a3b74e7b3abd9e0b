"""What only the emulated CUDA kernels (csrc/cuda/*.cuh run on CPU under tests/emulation) show:
the launch plans (windows per block, rows per block) at small shared-memory targets, thread
orders, planted bugs caught, and patch_embed's bias-and-ReLU kernel. (The same kernels on every
op case: tests/test_cga.py, test_dwconv.py, test_ffn.py, backend "cuda (emulated)".)

The kernel headers compile as host C++ (tests/emulation/emulation.h says what is emulated):
threads are fibers run one after another between barriers, in forward, reverse or shuffled
order, shared memory starts as NaN, global memory accesses are bounds-checked and mma.sync is
computed from the fragments the lanes hold. tests/emulation/emulated_ops.cpp exposes the ops
through the real launchers' checks and plans. The build is cached in build/emulation (or
$EFFICIENTVIT_EMUL_BUILD); the mutant builds go to a temporary directory.
"""
import concurrent.futures
import os
import shutil

import pytest
import torch

from conftest import ROOT, build_emulation
from efficientvit_kernels.testing import (TOLERANCE, cga_args, random_cga_params, random_dwconv_params,
                                          random_ffn_params, random_input, random_patch_embed_params,
                                          reference_cga, relative_error)
from python_ref import functional

FORWARD, REVERSE, SHUFFLED = 0, 1, 2  # emulation::Order
ORDERS = {"forward": FORWARD, "reverse": REVERSE, "shuffled": SHUFFLED}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                                 ids=lambda t: str(t).split(".")[1])


# cga cases: (C, heads, kernels, window, B, H, W, channels_last, smem_target or None[, key dim])
CGA_CASES = {
    # one whole-map window of 49 tokens, one head, 7x7 queries: four 16-row tiles, the last partial
    "whole_map": (16, 1, (7,), 7, 1, 7, 7, False, None),
    # padded 4x4 windows, four per block, value dim 10, kernels 5/3/3/1, two images
    "padded": (40, 4, (5, 3, 3, 1), 4, 2, 6, 5, True, None),
    # eight heads of value dim 3; 7 windows per block, the second block has 2 (rows past the end)
    "heads8": (24, 8, (3,) * 8, 3, 1, 7, 8, False, None),
    # as "padded" but a tiny shared-memory target: one window per block
    "one_window_per_block": (40, 4, (5, 3, 3, 1), 4, 2, 6, 5, False, 1),
    "batch0": (16, 2, (3, 3), 4, 0, 4, 4, False, None),
    # no dimension a multiple of 8: value dim 9, key dim 8 (half a 16-bit k step), 36 channels;
    # 5x5 windows (rows padded to 32 for 16-bit, two windows per block), partial at two edges
    "odd_dims": (36, 4, (3, 5, 3, 1), 5, 1, 7, 6, True, None, 8),
    # as "padded" (channels last, 16-bit: x and out in 16-byte packs), but x one element past a
    # 16-byte boundary: element by element
    "unaligned": (40, 4, (5, 3, 3, 1), 4, 2, 6, 5, "unaligned", None),
}


def run_cga(ops, case, dtype, order=FORWARD, seed=0, residual=True):
    C, heads, kernels, ws, B, H, W, cl, target, *key_dim = case
    params = random_cga_params(C, heads, kernels, ws, *key_dim, dtype=dtype)
    x = random_input(B, C, H, W, dtype=dtype, channels_last=bool(cl))
    if cl == "unaligned":
        x = unaligned_channels_last(x)
    out = ops.cga(x, *cga_args(params), residual, order, seed, target or ops.smem_target())
    assert out.shape == x.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    return out, reference_cga(x, params, residual=residual)


def check(out, ref, dtype):
    if out.numel() == 0:
        return
    err = relative_error(out, ref)
    assert err <= TOLERANCE[dtype], f"relative error {err:.3g} > {TOLERANCE[dtype]}"


@DTYPES
@pytest.mark.parametrize("case", list(CGA_CASES))
def test_cga_emul(emul, case, dtype):
    check(*run_cga(emul, CGA_CASES[case], dtype, residual=case != "heads8"), dtype)


@pytest.mark.parametrize("order", ["reverse", "shuffled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_cga_emul_thread_orders(emul, order, dtype):
    check(*run_cga(emul, CGA_CASES["padded"], dtype, ORDERS[order], seed=3), dtype)


def test_cga_emul_plans(emul):
    """The cases reach several windows per block, and one where the target says so; 16-bit
    rows pad each window to a multiple of 16 (3x3 windows: 16 rows, four windows)."""
    def wpb(case, dtype):
        C, heads, kernels, ws, B, H, W, _, target, *key_dim = CGA_CASES[case]
        p = random_cga_params(C, heads, kernels, ws, *key_dim, dtype=dtype)
        return emul.cga_windows_per_block(random_input(B, C, H, W, dtype=dtype), p["qkv_weight"],
                                          p["dw_weight"], ws, target or emul.smem_target())
    cases = ("whole_map", "padded", "heads8", "one_window_per_block", "odd_dims")
    assert [wpb(c, torch.float32) for c in cases] == [1, 4, 7, 1, 2]
    assert [wpb(c, torch.float16) for c in cases] == [1, 4, 4, 1, 2]


# dwconv cases: (C, K, B, H, W, channels_last, relu, residual)
DWCONV_CASES = {
    "k1": (5, 1, 1, 3, 4, False, False, False),
    "k3_cl": (6, 3, 1, 5, 7, True, True, True),
    "k5_two_images": (3, 5, 2, 4, 6, False, True, False),
    # 7x7 kernel wider than the map; 2 blocks, the second partial
    "k7_cl": (4, 7, 1, 3, 9, True, False, True),
    "batch0": (4, 3, 0, 3, 3, False, False, True),
    # channels last, 16 channels: 16-byte packs of 4 (fp32) or 8 (16-bit) channels per thread
    "k3_cl_packs": (16, 3, 2, 5, 3, True, True, True),
    "k5_cl_packs": (24, 5, 1, 4, 6, True, False, False),
}


def run_dwconv(ops, case, dtype, order=FORWARD, seed=0):
    C, K, B, H, W, cl, relu, residual = case
    weight, bias = random_dwconv_params(C, K, dtype=dtype)
    x = random_input(B, C, H, W, dtype=dtype, channels_last=cl)
    out = ops.dwconv(x, weight, bias, relu, residual, order, seed)
    assert out.shape == x.shape
    return out, functional.dwconv(x.double(), weight.double(), bias.double(), relu, residual)


@DTYPES
@pytest.mark.parametrize("case", list(DWCONV_CASES))
def test_dwconv_emul(emul, case, dtype):
    check(*run_dwconv(emul, DWCONV_CASES[case], dtype), dtype)


def unaligned_channels_last(x):
    """x, channels last, in a storage that starts one element past a 16-byte boundary."""
    storage = torch.empty(x.numel() + 1, dtype=x.dtype)[1:]
    out = storage.view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)
    out.copy_(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.data_ptr() % 16 != 0
    return out


def unaligned_tap_major(weight):
    """weight (C, K, K) as a view of tap-major (K, K, C) storage that starts one element past a
    16-byte boundary (a contiguous view of the layout the kernel reads)."""
    C, K, _ = weight.shape
    storage = torch.empty(weight.numel() + 1, dtype=weight.dtype)[1:]
    out = storage.view(K, K, C).permute(2, 0, 1)
    out.copy_(weight)
    assert out.permute(1, 2, 0).is_contiguous() and out.data_ptr() % 16 != 0
    return out


# What is not 16-byte aligned: x (then one channel per thread), or the weights' tap-major view
# (x aligned: 16-byte packs, from the kernel's own aligned copy of the weights)
DWCONV_UNALIGNED = {"unaligned": "x", "unaligned_weights": "weights"}


def run_dwconv_unaligned(ops, dtype, case="unaligned"):
    """16 channels last, as k3_cl_packs, with x or the weights not 16-byte aligned."""
    weight, bias = random_dwconv_params(16, 3, dtype=dtype)
    x = random_input(2, 16, 5, 3, dtype=dtype)
    if DWCONV_UNALIGNED[case] == "x":
        x = unaligned_channels_last(x)
    else:
        x, weight = x.to(memory_format=torch.channels_last), unaligned_tap_major(weight)
    out = ops.dwconv(x, weight, bias, True, True, FORWARD, 0)
    return out, functional.dwconv(x.double(), weight.double(), bias.double(), True, True)


@DTYPES
@pytest.mark.parametrize("case", list(DWCONV_UNALIGNED))
def test_dwconv_emul_unaligned(emul, case, dtype):
    check(*run_dwconv_unaligned(emul, dtype, case), dtype)


# patch_embed cases: (channels, B, H, W, channels-last weights). Its CPU convolutions stand in
# for cuDNN's; what is emulated is the kernel after each, bias and ReLU in one pass.
PATCH_EMBED_CASES = {
    # channels-last weights, as FusedPatchEmbed holds them: channels-last outputs; 8 and 16
    # channels, 16-byte packs (of 4 fp32 or 8 16-bit channels)
    "packs": ([3, 8, 16], 2, 16, 16, True),
    # 20 and 12 channels: packs of 4 in fp32 (20), one element a thread otherwise
    "odd_channels": ([3, 20, 12], 1, 13, 10, True),
    # contiguous weights: NCHW outputs, packs along each channel's 8x8 and 4x4 pixels
    "contiguous": ([3, 8, 4], 2, 16, 16, False),
    # NCHW outputs of 7x5 and 4x3 pixels: one element a thread
    "contiguous_odd": ([3, 8, 4], 1, 13, 10, False),
    "batch0": ([3, 8], 0, 8, 8, True),
}


@DTYPES
@pytest.mark.parametrize("case", list(PATCH_EMBED_CASES))
def test_patch_embed_emul(emul, case, dtype):
    """Bit for bit what the same convolutions give with their bias and ReLU in fp32, rounded
    once to the dtype, and within tolerance of the spec."""
    channels, B, H, W, weights_channels_last = PATCH_EMBED_CASES[case]
    weights, biases = random_patch_embed_params(channels, dtype=dtype)
    if weights_channels_last:
        weights = [w.contiguous(memory_format=torch.channels_last) for w in weights]
    x = random_input(B, 3, H, W, dtype=dtype)
    out = emul.patch_embed(x, weights, biases, False, FORWARD, 0)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == dtype
    y = x
    for i, (w, b) in enumerate(zip(weights, biases)):
        y = torch.nn.functional.conv2d(y, w, None, 2, 1).float() + b.float()[:, None, None]
        y = (y.relu() if i + 1 < len(weights) else y).to(dtype)
    torch.testing.assert_close(out, y, rtol=0, atol=0)
    check(out, functional.patch_embed(x.double(), [w.double() for w in weights],
                                      [b.double() for b in biases], False), dtype)


# ffn cases: (C, M, B, H, W, channels_last, residual, smem_target or None)
FFN_CASES = {
    # 35 pixels: one block of 48 rows, the last 13 past the end; hidden 40 < one chunk
    "partial_rows": (24, 40, 1, 5, 7, False, True, None),
    # 81 pixels in two blocks of 64; hidden 300 = chunks of 128, 128, 44; 20 channels
    "chunks_cl": (20, 300, 1, 9, 9, True, False, None),
    # a tiny shared-memory target: 16 rows per block (fp32; 16-bit keeps 32), two images;
    # hidden 12: less than one 16-bit k step
    "rows16": (8, 12, 2, 3, 5, False, True, 1),
    "batch0": (8, 16, 0, 2, 2, False, True, None),
    # channels last, C and M multiples of 8: 16-bit x and weights arrive by cp.async; 70 pixels
    # in one block of 80 rows; hidden 72 = chunks of 32, 32 and 8 (16-bit)
    "packs_cl": (32, 72, 1, 7, 10, True, True, None),
    # NCHW: x element by element, the weights in packs; 130 pixels: two blocks of 128 rows
    # (16-bit), the second with 2 pixels; hidden 40 = 32 + 8
    "packs_nchw": (16, 40, 2, 5, 13, False, True, None),
}


def run_ffn(ops, case, dtype, order=FORWARD, seed=0):
    C, M, B, H, W, cl, residual, target = case
    w = random_ffn_params(C, M, dtype=dtype)
    x = random_input(B, C, H, W, dtype=dtype, channels_last=cl)
    out = ops.ffn(x, *w, residual, order, seed, target or ops.smem_target())
    assert out.shape == x.shape
    return out, functional.ffn(x.double(), *(t.double() for t in w), residual)


@DTYPES
@pytest.mark.parametrize("case", list(FFN_CASES))
def test_ffn_emul(emul, case, dtype):
    check(*run_ffn(emul, FFN_CASES[case], dtype), dtype)


@pytest.mark.parametrize("order", ["reverse", "shuffled"])
def test_ffn_dwconv_emul_thread_orders(emul, order):
    check(*run_ffn(emul, FFN_CASES["chunks_cl"], torch.bfloat16, ORDERS[order], 5), torch.bfloat16)
    check(*run_dwconv(emul, DWCONV_CASES["k3_cl"], torch.float32, ORDERS[order], 5), torch.float32)


# Planted bugs: (file under csrc/cuda, the text, its replacement, what the failure says, the
# emulated runs that must catch it: "op case" names, each run in the dtypes of CHECK_DTYPES)
MUTANTS = {
    # fp32: the barrier between the query dwconv (writes Q2) and the scores product (reads
    # it): the scores read shared memory still NaN
    "cga_missing_syncthreads": ("cga.cuh",
                                "ldq, t, c);\n    }\n    __syncthreads();\n    // scores",
                                "ldq, t, c);\n    }\n    // scores", "relative error inf",
                                ("cga padded",)),
    # padding rows of a window past the map's bottom edge read as tokens, past the end of x
    "cga_padding_bound": ("cga.cuh", "if (y < p.H && x < p.W)", "if (y <= p.H && x < p.W)",
                          "is out of bounds (2400 elements)", ("cga padded",)),
    # 16-bit: attention weights written up to N only: P's k padding past 49 (or 25) tokens
    # stays NaN
    "cga_mma_p_padding": ("cga.cuh", "for (int n = lane; n < np; n += 32) {",
                          "for (int n = lane; n < N; n += 32) {", "relative error",
                          ("cga whole_map", "cga odd_dims")),
    # 16-bit: the next head's qkv weight staged before this head's product has read the
    # current one (right after the cascade): the product multiplies by the next head's
    "cga_mma_early_stage": ("cga.cuh", "    cp_async_wait<0>();\n    __syncthreads();\n    // q (fp32",
                            "    if (i + 1 < p.heads) stage_wqkv(i + 1);\n    cp_async_wait<0>();\n"
                            "    __syncthreads();\n    // q (fp32", "relative error",
                            ("cga padded", "cga odd_dims")),
    # a warp tile's results written one column to the right
    "mma_epilogue_off_by_one": ("cuda_utils.cuh", "const int n = n0 + 8 * j + 2 * t;",
                                "const int n = n0 + 8 * j + 2 * t + 1;", "relative error",
                                ("cga padded", "ffn packs_cl")),
    # ldmatrix's B rows for the second n8 tile pair taken 8 rows down instead of 16
    "mma_smem_b_rows": ("cuda_utils.cuh", "ldmatrix_x4(b23, b_row + 16 * ldb + k);",
                        "ldmatrix_x4(b23, b_row + 8 * ldb + k);", "relative error",
                        ("ffn packs_cl",)),
    # the first product starts before this chunk's W1 has landed (its copies still in flight)
    "ffn_mma_early_read": ("ffn.cuh", "    cp_async_wait<1>();  // X and this chunk's W1",
                           "    cp_async_wait<2>();  // X and this chunk's W1", "relative error",
                           ("ffn packs_cl",)),
    # the second product's k steps cover the whole chunk: past a first chunk under 16 (hidden 12
    # of rows16), W2's columns were never written (NaN)
    "ffn_mma_k_past_chunk": ("ffn.cuh", "mma_smem<T>(R, C, (mc + 15) / 16 * 16, H",
                             "mma_smem<T>(R, C, chunk, H", "relative error", ("ffn rows16",)),
    # 16-byte packs planned for an x that is not 16-byte aligned
    "cga_unaligned_packs": ("cga.cuh", "aligned16(x) && aligned16(out)};", "aligned16(out)};",
                            "is not 16-byte aligned", ("cga unaligned",)),
    "dwconv_unaligned_packs": ("dwconv.cuh", "C % V == 0 && aligned16(x) &&", "C % V == 0 &&",
                               "is not 16-byte aligned", ("dwconv unaligned",)),
    # the weights' tap-major view read in place, not copied
    "dwconv_taps_in_place": ("dwconv.cuh", "return taps.copy_(weight.permute({1, 2, 0}));",
                             "return weight.permute({1, 2, 0}).contiguous().to(at::kFloat);",
                             "is not 16-byte aligned", ("dwconv unaligned_weights",)),
}
CHECK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def mutant_root(name, directory):
    """A copy of the kernel headers and the emulation sources with mutant ``name`` planted."""
    shutil.copytree(os.path.join(ROOT, "tests", "emulation"),
                    os.path.join(directory, "tests", "emulation"))
    os.makedirs(os.path.join(directory, "csrc", "cuda"))
    shutil.copy(os.path.join(ROOT, "csrc", "checks.h"), os.path.join(directory, "csrc"))
    for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")):
        if f.endswith(".cuh"):
            shutil.copy(os.path.join(ROOT, "csrc", "cuda", f),
                        os.path.join(directory, "csrc", "cuda"))
    source, old, new, *_ = MUTANTS[name]
    path = os.path.join(directory, "csrc", "cuda", source)
    with open(path) as f:
        text = f.read()
    assert text.count(old) == 1, f"mutant {name}: the text to replace is not in {source} once"
    with open(path, "w") as f:
        f.write(text.replace(old, new))
    return directory


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    """The mutants' ops, built two at a time (CI has two cores). The directories are made
    before the threads start: pytest's temporary-directory factory is not thread-safe."""
    directories = {name: str(tmp_path_factory.mktemp(name)) for name in MUTANTS}

    def one(name):
        root = mutant_root(name, os.path.join(directories[name], "src"))
        return build_emulation(f"efficientvit_emul_{name}", root,
                               os.path.join(directories[name], "build"))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(zip(MUTANTS, pool.map(one, MUTANTS)))


def emulated_checks(ops, name):
    """The failures of the emulated runs that must catch mutant ``name`` (test_cga_emul's,
    test_ffn_emul's, test_dwconv_emul_unaligned's cases), in every dtype."""
    failures = []
    for run in MUTANTS[name][4]:
        op, case = run.split()
        for dtype in CHECK_DTYPES:
            try:
                if op == "cga":
                    check(*run_cga(ops, CGA_CASES[case], dtype), dtype)
                elif op == "ffn":
                    check(*run_ffn(ops, FFN_CASES[case], dtype), dtype)
                else:
                    check(*run_dwconv_unaligned(ops, dtype, case), dtype)
            except (AssertionError, RuntimeError) as e:
                failures.append(f"{run} {dtype}: {str(e).splitlines()[0]}")
    return failures


@pytest.mark.parametrize("name", list(MUTANTS))
def test_emul_catches_mutant(mutants, name):
    failures = emulated_checks(mutants[name], name)
    print(f"{name}: " + "; ".join(failures))
    assert failures, f"mutant {name} passed the emulated checks"
    assert all(MUTANTS[name][3] in f for f in failures), failures
