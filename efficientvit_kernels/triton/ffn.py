"""Pointwise MLP, ``[x +] w2 relu(w1 x + b1) + b2``, as one Triton kernel; the same kernel
also runs ``dwconv_ffn`` (fp16, bf16), the depthwise convolution an EfficientViT block runs
before each FFN and the FFN, the convolution's output passing through the program's own
output tile in cache instead of a tensor of its own.

Each program takes a tile of tokens (pixels of one image, either layout through strides; in
channels-last, pixels of the whole batch, so that a tile of a small map spans images) with all
C channels (M4's and M5's 384 as two column tiles, 256 + 128, not one of 512), and walks the
hidden width in chunks: the hidden activation never leaves the chip. Each program reads all
the weights: larger token tiles read them less often.
"""
import torch
import triton
import triton.language as tl

from .. import ops
from ._common import (check_device_dtype, dwconv_taps, flat_batch, flat_pixels, interpreted, mm,
                      padded, pixel_offsets, relu)
from .dwconv import dwconv


DW_CHANNELS = tl.constexpr(32)


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
                C: tl.constexpr, M: tl.constexpr, CA: tl.constexpr, CB: tl.constexpr,
                BT: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, K: tl.constexpr,
                FLAT: tl.constexpr, RESIDUAL: tl.constexpr):
    """The output's C channels are one tile of CA (a power of two, at least 16), or two, CA
    and CB, so that a width such as 384 (256 + 128) does not pay for 512 (see _launch)."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BT + tl.arange(0, BT)  # tokens: pixels of one image (or of all)
    token = (p < HW)[:, None]
    x_tok = (x_ptr + b * sxb + pixel_offsets(p, W, sxh, sxw, FLAT))[:, None]
    o_tok = (out_ptr + b * sob + pixel_offsets(p, W, soh, sow, True))[:, None]
    if K > 0:
        # The FFN's input is y = x + dwconv(x) + dw_b (a KxK depthwise convolution),
        # DW_CHANNELS channels at a time (all K*K taps of a wider tile in flight take the
        # widest layers past 128 registers). It is parked in the program's own tile of the
        # output, rounded to the dtype there as the separate dwconv op stores it, and read back
        # like x below (from cache: in registers it would cost the widest layers their second
        # block). A tile may span images (HW: all their pixels): a token's row and column are
        # in its own image.
        q = p % (H * W)
        # over the columns' tiles, masked past C (to C, ptxas spilled the 512-column variants
        # of C=288 and 320 on sm_90)
        for k0 in range(0, CA + CB, DW_CHANNELS):
            k = k0 + tl.arange(0, DW_CHANNELS)
            kmask = k < C
            y = tl.load(dw_b_ptr + k, mask=kmask, other=0.0).to(tl.float32)[None, :]
            y = dwconv_taps(y + tl.zeros([BT, DW_CHANNELS], tl.float32), x_tok + k[None, :] * sxc,
                            q // W, q % W, H, W, sxh, sxw, k, p < HW, kmask, dw_w_ptr, K)
            y += tl.load(x_tok + k[None, :] * sxc, mask=token & kmask[None, :],
                         other=0.0).to(tl.float32)
            tl.store(o_tok + k[None, :] * soc, y.to(DT), mask=token & kmask[None, :])
        tl.debug_barrier()  # every thread's part of y stored before any reads it
        src_tok, ssc = o_tok, soc
    else:
        src_tok, ssc = x_tok, sxc

    ca = tl.arange(0, CA)
    cb = CA + tl.arange(0, max(CB, 16))  # a tile never used where CB is 0
    acc_a = tl.zeros([BT, CA], dtype=tl.float32)
    acc_b = tl.zeros([BT, max(CB, 16)], dtype=tl.float32)
    for m0 in range(0, M, BM):
        m = m0 + tl.arange(0, BM)
        mmask = m < M
        # h = x w1 chunk + b1, reduced over the channels BK at a time (on tensor cores in one
        # step, or with two column tiles in steps of the second's width; fp32 products take
        # whole operand rows into registers); masked rows and columns load zeros.
        h = tl.zeros([BT, BM], dtype=tl.float32)
        for k0 in range(0, C, BK):
            k = k0 + tl.arange(0, BK)
            xk = tl.load(src_tok + k[None, :] * ssc, mask=token & (k < C)[None, :], other=0.0)
            w1 = tl.load(w1_ptr + m[None, :] * C + k[:, None],
                         mask=(k < C)[:, None] & mmask[None, :], other=0.0)
            h += mm(xk, w1, DT)
        h = relu(h + tl.load(b1_ptr + m, mask=mmask, other=0.0).to(tl.float32)[None, :])
        w2 = tl.load(w2_ptr + ca[None, :] * M + m[:, None],
                     mask=mmask[:, None] & (ca < C)[None, :], other=0.0)
        acc_a += mm(h, w2, DT)
        if CB > 0:
            w2 = tl.load(w2_ptr + cb[None, :] * M + m[:, None],
                         mask=mmask[:, None] & (cb < C)[None, :], other=0.0)
            acc_b += mm(h, w2, DT)
    acc_a = _finish_columns(acc_a, ca, ca < C, b2_ptr, src_tok, ssc, token, RESIDUAL)
    if CB > 0:
        acc_b = _finish_columns(acc_b, cb, cb < C, b2_ptr, src_tok, ssc, token, RESIDUAL)
    if K > 0:
        tl.debug_barrier()  # every thread done reading y before any overwrites it
    tl.store(o_tok + ca[None, :] * soc, acc_a.to(DT), mask=token & (ca < C)[None, :])
    if CB > 0:
        tl.store(o_tok + cb[None, :] * soc, acc_b.to(DT), mask=token & (cb < C)[None, :])


def _prune(configs, named_args, **kwargs):
    """Keeps the token tiles whose fp32 accumulator, (BT, CA + CB), takes at most 32 registers
    a thread, and 16 warps only for fp16/bf16: larger tiles, and fp32's on 16 warps, spill
    registers on sm_80 or sm_90 (tests/test_triton_compile.py holds every kept config to that).
    The smallest always stays."""
    fp32 = named_args["x_ptr"].dtype == torch.float32
    kept = [c for c in configs if c.kwargs["BT"] * (kwargs["CA"] + kwargs["CB"])
            <= 32 * 32 * c.num_warps and not (fp32 and c.num_warps > 8)]
    return kept or configs[:1]


# Larger token tiles re-read the weights less: the best is measured per shape, dtype and layout
# (sxc is 1 in channels-last). 16 warps hold twice the tokens of 8 for the widest layers (C
# 384 and up), whose tiles of 8 warps stop at 16 tokens.
# One config in the interpreter (no benchmarking): few, large programs, as it pays per op.
_ffn = triton.autotune(
    configs=[triton.Config({"BT": 128, "BM": 128}, num_warps=1)] if interpreted(_ffn_kernel) else
    [triton.Config({"BT": bt, "BM": bm}, num_warps=warps, num_stages=2)
     for bt, bm, warps in ((16, 16, 8), (32, 32, 8), (64, 32, 8), (128, 32, 8), (32, 32, 16),
                           (64, 32, 16))],
    key=["C", "M", "K", "sxc"], prune_configs_by={"early_config_prune": _prune})(_ffn_kernel)


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
    # The output columns: one tile of padded(C), or in fp16/bf16, where what the largest power
    # of two in C leaves is 128 channels or more (384: 256 + 128), two tiles. Narrower second
    # tiles (192, 240, 288, 320) spilled on 16 warps with their reduction steps: on 8 warps
    # alone their token tiles halve, and restaging the weights for each costs more than the
    # padding saves (M3's and M5's FFN predicted 25-30% slower). fp32's products are not on
    # tensor cores: one tile (split, its C=144 variant spilled on sm_80).
    CA, CB = padded(C), 0
    if x.dtype != torch.float32 and C - (1 << (C.bit_length() - 1)) >= 128:
        CA = 1 << (C.bit_length() - 1)
        CB = padded(C - CA)
    # fp16/bf16: the reduction in steps of the narrower tile (one step without a second)
    BK = 32 if x.dtype == torch.float32 else (CB or CA)
    dw_weight, dw_bias, K = (dw[0].contiguous(), dw[1].contiguous(), dw[2]) if dw else (b1, b1, 0)
    # One map of B*H*W pixels where the layout allows (the batch stride is then never used)
    images, pixels = (1, B * H * W) if flat_batch(x) and flat_batch(out) else (B, H * W)
    _ffn[lambda meta: (images, triton.cdiv(pixels, meta["BT"]))](
        x, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), dw_weight, dw_bias,
        out, pixels, H, W, *x.stride(), *out.stride(), C=C, M=M, CA=CA, CB=CB, BK=BK, K=K,
        FLAT=flat_pixels(x), RESIDUAL=bool(residual))
    return out
