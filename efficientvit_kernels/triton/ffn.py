"""Pointwise MLP, ``[x +] w2 relu(w1 x + b1) + b2``, as one Triton kernel.

Each program takes a tile of tokens (pixels of one image, either layout through strides; in
channels-last, pixels of the whole batch, so that a tile of a small map spans images) with all
C channels, and walks the hidden width in chunks: the hidden activation never leaves the chip.
Each program reads all the weights: larger token tiles read them less often.
"""
import torch
import triton
import triton.language as tl

from .. import ops
from ._common import (check_device_dtype, flat_batch, flat_pixels, interpreted, mm, padded,
                      pixel_offsets, relu)


# Sizes vary with the input and gain nothing from specialization (equal to 1, multiple of
# 16): one compiled kernel serves every batch and map size of a layer.
@triton.jit(do_not_specialize=["HW", "W"])
def _ffn_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, HW, W,
                sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                C: tl.constexpr, M: tl.constexpr, CP: tl.constexpr, BT: tl.constexpr,
                BM: tl.constexpr, BK: tl.constexpr, FLAT: tl.constexpr,
                RESIDUAL: tl.constexpr):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BT + tl.arange(0, BT)  # tokens: pixels of one image
    c = tl.arange(0, CP)
    cmask = c < C
    io_mask = (p < HW)[:, None] & cmask[None, :]
    x_tok = (x_ptr + b * sxb + pixel_offsets(p, W, sxh, sxw, FLAT))[:, None]
    token = (p < HW)[:, None]

    acc = tl.zeros([BT, CP], dtype=tl.float32)
    for m0 in range(0, M, BM):
        m = m0 + tl.arange(0, BM)
        mmask = m < M
        # h = x w1 chunk + b1, reduced over the channels BK at a time (all CP at once on
        # tensor cores; fp32 products take whole operand rows into registers); masked rows
        # and columns load zeros.
        h = tl.zeros([BT, BM], dtype=tl.float32)
        for k0 in range(0, CP, BK):
            k = k0 + tl.arange(0, BK)
            xk = tl.load(x_tok + k[None, :] * sxc, mask=token & (k < C)[None, :], other=0.0)
            w1 = tl.load(w1_ptr + m[None, :] * C + k[:, None],
                         mask=(k < C)[:, None] & mmask[None, :], other=0.0)
            h += mm(xk, w1, DT)
        h += tl.load(b1_ptr + m, mask=mmask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w2_ptr + c[None, :] * M + m[:, None], mask=mmask[:, None] & cmask[None, :],
                     other=0.0)
        acc += mm(relu(h), w2, DT)
    acc += tl.load(b2_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if RESIDUAL:
        acc += tl.load(x_tok + c[None, :] * sxc, mask=io_mask, other=0.0).to(tl.float32)
    o = out_ptr + b * sob + pixel_offsets(p, W, soh, sow, True)[:, None] + c[None, :] * soc
    tl.store(o, acc.to(DT), mask=io_mask)


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
# (sxc is 1 in channels-last). 16 warps hold twice the tokens of 8 for the widest layers (C
# 384 and up), whose tiles of 8 warps stop at 16 tokens.
# One config in the interpreter (no benchmarking): few, large programs, as it pays per op.
_ffn = triton.autotune(
    configs=[triton.Config({"BT": 128, "BM": 128}, num_warps=1)] if interpreted(_ffn_kernel) else
    [triton.Config({"BT": bt, "BM": bm}, num_warps=warps, num_stages=2)
     for bt, bm, warps in ((16, 16, 8), (32, 32, 8), (64, 32, 8), (128, 32, 8), (32, 32, 16),
                           (64, 32, 16))],
    key=["C", "M", "sxc"], prune_configs_by={"early_config_prune": _prune})(_ffn_kernel)


def ffn(x, w1, b1, w2, b2, residual=True):
    """Triton implementation of :func:`efficientvit_kernels.ops.ffn` (same arguments)."""
    M = ops.check_ffn(x, w1, b1, w2, b2)
    check_device_dtype(x, _ffn_kernel)
    B, C, H, W = x.shape
    out = ops.empty_output(x)  # first, so a just-freed block (a test's poison) goes to the output
    if out.numel() == 0:
        return out
    CP = padded(C)
    # One map of B*H*W pixels where the layout allows (the batch stride is then never used)
    images, pixels = (1, B * H * W) if flat_batch(x) and flat_batch(out) else (B, H * W)
    _ffn[lambda meta: (images, triton.cdiv(pixels, meta["BT"]))](
        x, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), out, pixels, W,
        *x.stride(), *out.stride(), C=C, M=M, CP=CP, BK=32 if x.dtype == torch.float32 else CP,
        FLAT=flat_pixels(x),
        RESIDUAL=bool(residual))
    return out
