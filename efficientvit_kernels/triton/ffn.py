"""Pointwise MLP, ``[x +] w2 relu(w1 x + b1) + b2``, as one Triton kernel; the same kernels
also run ``dwconv_ffn`` (fp16, bf16), the depthwise convolution an EfficientViT block runs
before each FFN and the FFN, the convolution's output passing through the program's own
output tile in cache instead of a tensor of its own.

Each program takes a tile of tokens (pixels of one image, either layout through strides; in
channels-last, pixels of the whole batch, so that a tile of a small map spans images) and
reads all the weights: larger token tiles read them less often. The hidden activation never
goes to memory. Two kernels:
- ``_ffn_kernel`` (fp32, and fp16/bf16 up to 256 channels) holds the tile's whole output,
  (tokens, C) in fp32, in registers, and walks the hidden width in chunks, each chunk's
  activation passing from one product to the next in registers; the widest layers' tiles
  would then shrink to 16-32 tokens;
- ``_ffn_staged_kernel`` (fp16/bf16 past 256 channels) computes the tile's whole hidden
  activation first, into the program's scratch rows (in cache: the grid is as many programs
  as the device holds at once, each looping over tiles), then the output in column tiles, so
  that its token tiles stay at 64 or 128 rows (on wgmma on Hopper) at any width.
"""
import functools

import torch
import triton
import triton.language as tl

from .. import ops
from ._common import (check_device_dtype, dwconv_taps, flat_batch, flat_pixels, interpreted,
                      launch_kwargs, mm, padded, persistent_grid, pixel_offsets, relu,
                      run_fastest)
from .dwconv import dwconv


DW_CHANNELS = tl.constexpr(32)


@triton.jit
def _dwconv_into_output(x_tok, o_tok, p, HW, H, W, sxh, sxw, sxc, soc, dw_w_ptr, dw_b_ptr,
                        C: tl.constexpr, CT: tl.constexpr, BT: tl.constexpr, K: tl.constexpr):
    """y = x + dwconv_KxK(x) + dw_b at the tile's tokens p, parked in the program's own tile of
    the output (o_tok), rounded to the dtype there as the separate dwconv op stores it, to be
    read back as the FFN's input (from cache: in registers it would cost the widest layers
    their second block). DW_CHANNELS channels at a time (all K*K taps of a wider tile in
    flight take the widest layers past 128 registers), over CT channels (a multiple of them)
    masked past C. A tile may span images (HW: all their pixels): a token's row and column are
    in its own image."""
    DT: tl.constexpr = o_tok.dtype.element_ty
    token = (p < HW)[:, None]
    q = p % (H * W)
    for k0 in range(0, CT, DW_CHANNELS):
        k = k0 + tl.arange(0, DW_CHANNELS)
        kmask = k < C
        y = tl.load(dw_b_ptr + k, mask=kmask, other=0.0).to(tl.float32)[None, :]
        y = dwconv_taps(y + tl.zeros([BT, DW_CHANNELS], tl.float32), x_tok + k[None, :] * sxc,
                        q // W, q % W, H, W, sxh, sxw, k, p < HW, kmask, dw_w_ptr, K)
        y += tl.load(x_tok + k[None, :] * sxc, mask=token & kmask[None, :],
                     other=0.0).to(tl.float32)
        tl.store(o_tok + k[None, :] * soc, y.to(DT), mask=token & kmask[None, :])
    tl.debug_barrier()  # every thread's part of y stored before any reads it


@triton.jit
def _hidden_chunk(src_tok, ssc, token, w1_ptr, b1_ptr, m, mmask, C: tl.constexpr,
                  BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr):
    """relu(x w1 + b1) at the hidden units m of the tile's tokens, fp32, reduced over the
    channels BK at a time (fp32 products take whole operand rows into registers); masked rows
    and columns load zeros."""
    h = tl.zeros([BT, BM], dtype=tl.float32)
    for k0 in range(0, C, BK):
        k = k0 + tl.arange(0, BK)
        xk = tl.load(src_tok + k[None, :] * ssc, mask=token & (k < C)[None, :], other=0.0)
        w1 = tl.load(w1_ptr + m[None, :] * C + k[:, None],
                     mask=(k < C)[:, None] & mmask[None, :], other=0.0)
        h += mm(xk, w1, DT)
    return relu(h + tl.load(b1_ptr + m, mask=mmask, other=0.0).to(tl.float32)[None, :])


@triton.jit
def _finish_columns(acc, c, cmask, b2_ptr, src_tok, ssc, token, RESIDUAL: tl.constexpr):
    """An output tile's columns c: acc + b2 [+ the FFN's input]."""
    acc += tl.load(b2_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if RESIDUAL:
        acc += tl.load(src_tok + c[None, :] * ssc, mask=token & cmask[None, :],
                       other=0.0).to(tl.float32)
    return acc


# Sizes vary with the input and gain nothing from specialization (equal to 1, multiple of
# 16): one compiled kernel serves every batch and map size of a layer.
@triton.jit(do_not_specialize=["HW", "H", "W"])
def _ffn_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, dw_w_ptr, dw_b_ptr, out_ptr, HW, H, W,
                sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                C: tl.constexpr, M: tl.constexpr, CP: tl.constexpr, BT: tl.constexpr,
                BM: tl.constexpr, BK: tl.constexpr, K: tl.constexpr, FLAT: tl.constexpr,
                RESIDUAL: tl.constexpr):
    """The output's C channels are one tile of CP (C padded to a power of two), in registers;
    the hidden width goes BM at a time, each chunk's activation straight into the second
    product. K > 0: the input is x + dwconv_KxK(x) + dw_b (dwconv_ffn)."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BT + tl.arange(0, BT)  # tokens: pixels of one image (or of all)
    token = (p < HW)[:, None]
    x_tok = (x_ptr + b * sxb + pixel_offsets(p, W, sxh, sxw, FLAT))[:, None]
    o_tok = (out_ptr + b * sob + pixel_offsets(p, W, soh, sow, True))[:, None]
    if K > 0:
        _dwconv_into_output(x_tok, o_tok, p, HW, H, W, sxh, sxw, sxc, soc, dw_w_ptr, dw_b_ptr,
                            C, CP, BT, K)
        src_tok, ssc = o_tok, soc
    else:
        src_tok, ssc = x_tok, sxc

    c = tl.arange(0, CP)
    acc = tl.zeros([BT, CP], dtype=tl.float32)
    for m0 in range(0, M, BM):
        m = m0 + tl.arange(0, BM)
        mmask = m < M
        h = _hidden_chunk(src_tok, ssc, token, w1_ptr, b1_ptr, m, mmask, C, BT, BM, BK, DT)
        w2 = tl.load(w2_ptr + c[None, :] * M + m[:, None],
                     mask=mmask[:, None] & (c < C)[None, :], other=0.0)
        acc += mm(h, w2, DT)
    acc = _finish_columns(acc, c, c < C, b2_ptr, src_tok, ssc, token, RESIDUAL)
    if K > 0:
        tl.debug_barrier()  # every thread done reading y before any overwrites it
    tl.store(o_tok + c[None, :] * soc, acc.to(DT), mask=token & (c < C)[None, :])


@triton.jit(do_not_specialize=["HW", "H", "W", "images"])
def _ffn_staged_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, dw_w_ptr, dw_b_ptr, out_ptr,
                       hidden_ptr, HW, H, W, images, sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                       C: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, BT: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, K: tl.constexpr,
                       FLAT: tl.constexpr, RESIDUAL: tl.constexpr):
    """Token tiles ``tile`` = image * tiles-per-image + tile of its HW pixels, each program
    looping over them. Per tile: the hidden activation, (BT, MP) in the input dtype (the
    second product's operand rounds it so anyway), into the program's scratch rows, BM units
    at a time; then the output BN columns at a time, reduced over those rows."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    rows = tl.arange(0, BT)
    hidden = hidden_ptr + tl.program_id(0).to(tl.int64) * (BT * MP) + rows[:, None] * MP
    per_image = tl.cdiv(HW, BT)
    for tile in range(tl.program_id(0), images * per_image, tl.num_programs(0)):
        b = (tile // per_image).to(tl.int64)
        p = (tile % per_image) * BT + rows
        token = (p < HW)[:, None]
        x_tok = (x_ptr + b * sxb + pixel_offsets(p, W, sxh, sxw, FLAT))[:, None]
        o_tok = (out_ptr + b * sob + pixel_offsets(p, W, soh, sow, True))[:, None]
        if K > 0:
            _dwconv_into_output(x_tok, o_tok, p, HW, H, W, sxh, sxw, sxc, soc, dw_w_ptr,
                                dw_b_ptr, C, tl.cdiv(C, DW_CHANNELS) * DW_CHANNELS, BT, K)
            src_tok, ssc = o_tok, soc
        else:
            src_tok, ssc = x_tok, sxc
        for m0 in range(0, MP, BM):  # units past M: relu(0 + 0), and w2's rows there load 0
            m = m0 + tl.arange(0, BM)
            mmask = m < M
            h = _hidden_chunk(src_tok, ssc, token, w1_ptr, b1_ptr, m, mmask, C, BT, BM, BK, DT)
            tl.store(hidden + m[None, :], h.to(DT))
        tl.debug_barrier()  # the tile's hidden rows are whole before any thread reads them
        for n0 in range(0, C, BN):
            n = n0 + tl.arange(0, BN)
            nmask = n < C
            acc = tl.zeros([BT, BN], dtype=tl.float32)
            for m0 in range(0, MP, BM):
                m = m0 + tl.arange(0, BM)
                w2 = tl.load(w2_ptr + n[None, :] * M + m[:, None],
                             mask=(m < M)[:, None] & nmask[None, :], other=0.0)
                acc += mm(tl.load(hidden + m[None, :]), w2, DT)
            acc = _finish_columns(acc, n, nmask, b2_ptr, src_tok, ssc, token, RESIDUAL)
            if K > 0:
                tl.debug_barrier()  # every thread done reading these columns of y
            tl.store(o_tok + n[None, :] * soc, acc.to(DT), mask=token & nmask[None, :])
        tl.debug_barrier()  # the hidden rows are read before the next tile overwrites them


def _prune(configs, named_args, **kwargs):
    """Keeps the token tiles whose fp32 accumulator, (BT, CP), takes at most 32 registers a
    thread, and 16 warps only for fp16/bf16: larger tiles, and fp32's on 16 warps, spill
    registers on sm_80 or sm_90 (tests/test_triton_compile.py holds every kept config to that).
    The smallest always stays."""
    fp32 = named_args["x_ptr"].dtype == torch.float32
    kept = [c for c in configs if c.kwargs["BT"] * kwargs["CP"] <= 32 * 32 * c.num_warps
            and not (fp32 and c.num_warps > 8)]
    return kept or configs[:1]


# Larger token tiles re-read the weights less: the best is measured per shape, dtype and layout
# (sxc is 1 in channels-last). 16 warps (one block a multiprocessor, as many warps as two of 8)
# hold 64 tokens of 256 channels, where 8 warps stop at 32, and 128 of 128.
# One config in the interpreter (no benchmarking): few, large programs, as it pays per op.
_ffn = triton.autotune(
    configs=[triton.Config({"BT": 128, "BM": 128}, num_warps=1)] if interpreted(_ffn_kernel) else
    [triton.Config({"BT": bt, "BM": bm}, num_warps=warps, num_stages=2)
     for bt, bm, warps in ((16, 16, 8), (32, 32, 8), (64, 32, 8), (128, 32, 8), (32, 32, 16),
                           (64, 32, 16), (128, 16, 16))],
    key=["C", "M", "K", "sxc"], prune_configs_by={"early_config_prune": _prune})(_ffn_kernel)

# fp16/bf16 past STAGED_FROM channels run the staged kernel: in registers, their output would
# take tiles of 32 tokens (on mma.sync, each program's weights serving half the tokens of a
# 64-token tile), or padded to 512 columns (288, 320). Its tilings, the faster measured per
# layer (run_fastest): 64 tokens (one wgmma's rows) on 8 warps, two blocks a multiprocessor
# (one's barriers overlap the other's products), output columns 128 at a time (256 take
# 180-215 registers; 64, more passes over the hidden rows); or 128 tokens on 16 warps, one
# block, each weight tile serving twice the tokens (half the weights' traffic through L2),
# output columns 64 at a time (128 spill 24-32 bytes a thread on sm_80; 128 tokens on 8 warps
# take 223-237 registers). Hidden units and channels 64 at a time.
STAGED_FROM = 256
STAGED_TILINGS = (dict(BT=64, BM=64, BK=64, BN=128, num_warps=8),
                  dict(BT=128, BM=64, BK=64, BN=64, num_warps=16))


def ffn(x, w1, b1, w2, b2, residual=True):
    """Triton implementation of :func:`efficientvit_kernels.ops.ffn` (same arguments)."""
    M = ops.check_ffn(x, w1, b1, w2, b2)
    check_device_dtype(x, _ffn_kernel)
    return _launch(x, w1, b1, w2, b2, residual, M)


def dwconv_ffn(x, dw_weight, dw_bias, w1, b1, w2, b2):
    """Triton implementation of :func:`efficientvit_kernels.ops.dwconv_ffn` (same arguments):
    the ffn kernel, which first computes the depthwise convolution of its tile of tokens, in
    fp16 and bf16. fp32 runs the dwconv kernel, then the ffn kernel: fused, its variants took
    up to 200 registers (one block a multiprocessor) and some spilled."""
    K, M = ops.check_dwconv_ffn(x, dw_weight, dw_bias, w1, b1, w2, b2)
    check_device_dtype(x, _ffn_kernel)
    if x.dtype == torch.float32:
        return _launch(dwconv(x, dw_weight, dw_bias, False, True), w1, b1, w2, b2, True, M)
    return _launch(x, w1, b1, w2, b2, True, M, (dw_weight, dw_bias, K))


def _launch(x, w1, b1, w2, b2, residual, M, dw=None):
    """The kernel's launch on checked arguments; ``dw``: (weight, bias, K) of the depthwise
    convolution before the FFN, or None."""
    B, C, H, W = x.shape
    out = ops.empty_output(x)  # first, so a just-freed block (a test's poison) goes to the output
    if out.numel() == 0:
        return out
    dw_weight, dw_bias, K = (dw[0].contiguous(), dw[1].contiguous(), dw[2]) if dw else (b1, b1, 0)
    # One map of B*H*W pixels where the layout allows (the batch stride is then never used)
    images, pixels = (1, B * H * W) if flat_batch(x) and flat_batch(out) else (B, H * W)
    weights = (w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), dw_weight,
               dw_bias)
    consts = dict(C=C, M=M, K=K, FLAT=flat_pixels(x), RESIDUAL=bool(residual))
    if x.dtype != torch.float32 and C > STAGED_FROM:
        _launch_staged(x, weights, out, images, pixels, H, W, consts)
        return out
    # fp16/bf16: the reduction in one step; fp32's products are not on tensor cores and take
    # whole operand rows into registers: 32 channels a step
    CP = padded(C)
    _ffn[lambda meta: (images, triton.cdiv(pixels, meta["BT"]))](
        x, *weights, out, pixels, H, W, *x.stride(), *out.stride(), CP=CP,
        BK=32 if x.dtype == torch.float32 else CP, **consts)
    return out


def _launch_staged(x, weights, out, images, pixels, H, W, consts):
    """_ffn_staged_kernel's launch in the faster of its tilings (the interpreter: the first):
    as many programs as the device holds at once, each with its scratch rows of the hidden
    activation (one buffer, sized for the tiling that takes the most)."""
    tilings = STAGED_TILINGS[:1] if interpreted(_ffn_staged_kernel) else STAGED_TILINGS

    def args(hidden):
        return (x, *weights, out, hidden, pixels, H, W, images, *x.stride(), *out.stride())

    # the grid depends on the compiled kernel (a dtype stands in for the scratch there)
    probe = args(x.dtype)
    plans = []
    for tiling in tilings:
        meta = dict(consts, MP=triton.cdiv(consts["M"], tiling["BM"]) * tiling["BM"], **tiling)
        rows = meta["BT"] * meta["MP"]
        meta = launch_kwargs(_ffn_staged_kernel, probe, meta)
        programs = persistent_grid(_ffn_staged_kernel, images * triton.cdiv(pixels, meta["BT"]),
                                   probe, scratch=rows * x.element_size(), **meta)
        plans.append((programs, rows, meta))
    hidden = torch.empty(max(programs * rows for programs, rows, _ in plans), dtype=x.dtype,
                         device=x.device)
    arguments = args(hidden)  # one tuple: the recorder tells a launch's tilings by it
    run_fastest(("ffn_staged", x.device, x.dtype, x.stride(1) == 1, *consts.items()),
                [functools.partial(_ffn_staged_kernel[(p,)], *arguments, **meta)
                 for p, _, meta in plans])
