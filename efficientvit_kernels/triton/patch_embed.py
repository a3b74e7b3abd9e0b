"""The patch embedding, a chain of 3x3 stride-2 convolutions each with bias and [ReLU], as one
Triton kernel launched per convolution.

Each launch is an implicit matrix product: a (output pixels x output channels) tile of one
image, reduced over (tap, input channel) pairs, BK at a time, gathered from the input with the
taps' zero padding as masks. A chain of four on an image's 3 channels (M0-M5) reads its
input and writes each convolution's output once: the outputs between convolutions go through
memory (channels-last), unlike the CPU kernel's, which keeps them in cache.
"""
import torch
import triton
import triton.language as tl

from .. import ops
from ._common import (check_device_dtype, interpreted, mm, output_tile, padded,
                      pixel_offsets, relu)


# Map sizes vary with the input and gain nothing from specialization: one compiled kernel
# serves every batch and image size of a convolution.
@triton.jit(do_not_specialize=["H", "W", "OW", "OHW", "pixel_tiles"])
def _conv3x3_stride2_kernel(x_ptr, w_ptr, b_ptr, out_ptr, CI, CO, H, W, OW, OHW, pixel_tiles,
                            sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                            BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            RELU: tl.constexpr):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    b, p, n, pmask, nmask = output_tile(pixel_tiles, OHW, CO, BP, BN)  # p: output pixels
    top = 2 * (p // OW) - 1  # the input row and column of tap (0, 0)
    left = 2 * (p % OW) - 1
    x_img = x_ptr + b * sxb
    acc = tl.zeros([BP, BN], dtype=tl.float32)
    # k = tap * CI + input channel: in channels-last inputs a run of k is a run of channels
    for k0 in range(0, 9 * CI, BK):
        k = k0 + tl.arange(0, BK)
        tap = k // CI
        ci = k - tap * CI
        iy = top[:, None] + (tap // 3)[None, :]
        ix = left[:, None] + (tap % 3)[None, :]
        ok = (pmask[:, None] & (k < 9 * CI)[None, :] & (iy >= 0) & (iy < H)
              & (ix >= 0) & (ix < W))
        xk = tl.load(x_img + iy * sxh + ix * sxw + ci[None, :] * sxc, mask=ok, other=0.0)
        # weight (CO, CI, 3, 3): element (n, ci, tap)
        wk = tl.load(w_ptr + n[None, :] * (9 * CI) + (ci * 9 + tap)[:, None],
                     mask=(k < 9 * CI)[:, None] & nmask[None, :], other=0.0)
        acc += mm(xk, wk, DT)
    acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = relu(acc)
    o = out_ptr + b * sob + pixel_offsets(p, OW, soh, sow, True)[:, None] + n[None, :] * soc
    tl.store(o, acc.to(DT), mask=pmask[:, None] & nmask[None, :])


def _blocks(dtype, CI, CO, OHW):
    """(output pixels, output channels, reduction) per step, and num_warps."""
    if interpreted(_conv3x3_stride2_kernel):  # few, large programs: the interpreter pays per op
        return min(padded(OHW), 128), min(padded(CO), 128), min(padded(9 * CI), 128), 1
    # from an image's 3 channels, all 27 products in one step; fp32 products (on FMAs, operands
    # in registers) on 32 output channels: at 64, 200 bytes a thread spill on sm_80
    if dtype == torch.float32:
        return 64, min(padded(CO), 32), 32, 4
    return 64, min(padded(CO), 64), 32 if CI < 4 else 64, 4


def _conv3x3_stride2(x, weight, bias, relu, out):
    B, CI, H, W = x.shape
    CO, OH, OW = out.shape[1:]
    BP, BN, BK, num_warps = _blocks(x.dtype, CI, CO, OH * OW)
    pixel_tiles = triton.cdiv(OH * OW, BP)
    _conv3x3_stride2_kernel[(B * pixel_tiles, triton.cdiv(CO, BN))](
        x, weight.contiguous(), bias.contiguous(), out, CI, CO, H, W, OW, OH * OW, pixel_tiles,
        *x.stride(), *out.stride(), BP=BP, BN=BN, BK=BK, RELU=bool(relu), num_warps=num_warps)


def patch_embed(x, weights, biases, final_relu=False):
    """Triton implementation of :func:`efficientvit_kernels.ops.patch_embed` (same arguments;
    x in any layout)."""
    shape = ops.check_patch_embed(x, weights, biases)
    check_device_dtype(x, _conv3x3_stride2_kernel)
    # first, so a just-freed block (a test's poison) goes to the output
    out = ops.empty_output(x, shape, torch.channels_last)
    if out.numel() == 0:
        return out
    last = len(weights) - 1
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        B, _, H, W = x.shape
        y = out if i == last else ops.empty_output(
            x, (B, weight.shape[0], (H + 1) // 2, (W + 1) // 2), torch.channels_last)
        _conv3x3_stride2(x, weight, bias, final_relu or i < last, y)
        x = y
    return out
