"""Depthwise KxK convolution, ``[x +] [relu](dwconv(x) + bias)``, as one Triton kernel.

Each program computes a (pixels x channels) tile of one image; both memory layouts go
through strides, and the K*K neighbour loads of a tile hit cache after the first.
"""
import triton
import triton.language as tl

from .. import ops
from ._common import (check_device_dtype, dwconv_taps, flat_pixels, interpreted, padded,
                      pixel_offsets, relu)


# Map sizes vary with the input and gain nothing from specialization (equal to 1, multiple of
# 16): one compiled kernel serves every batch and map size of a layer. C is a layer's and is
# specialized: knowing it a multiple of 16 lets the channel masks of channels-last tiles cover
# whole 16-byte vectors, so those loads and stores are 128 bits wide (32 or 16 without).
@triton.jit(do_not_specialize=["H", "W", "pixel_tiles"])
def _dwconv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, C, H, W, pixel_tiles,
                   sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                   K: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr, FLAT: tl.constexpr,
                   RELU: tl.constexpr, RESIDUAL: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // pixel_tiles).to(tl.int64)
    p = (pid % pixel_tiles) * BP + tl.arange(0, BP)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    y = p // W
    x = p % W
    pmask = p < H * W
    cmask = c < C
    x_img = x_ptr + b * sxb + c[None, :] * sxc
    x_pix = pixel_offsets(p, W, sxh, sxw, FLAT)

    acc = tl.zeros([BP, BC], dtype=tl.float32)
    acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc = dwconv_taps(acc, x_img + x_pix[:, None], y, x, H, W, sxh, sxw, c, pmask, cmask, w_ptr, K)
    if RELU:
        acc = relu(acc)
    io_mask = pmask[:, None] & cmask[None, :]
    if RESIDUAL:
        acc += tl.load(x_img + x_pix[:, None], mask=io_mask, other=0.0).to(tl.float32)
    o = out_ptr + b * sob + c[None, :] * soc + pixel_offsets(p, W, soh, sow, True)[:, None]
    tl.store(o, acc.to(out_ptr.dtype.element_ty), mask=io_mask)


def _blocks(x, C, HW):
    """(pixels, channels) per tile and num_warps."""
    if interpreted(_dwconv_kernel):  # few, large programs: the interpreter pays per op
        BC = min(padded(C), 64)
        return min(padded(HW), 8192 // BC), BC, 1
    # The unit-stride axis gets the long side, so a warp's loads are contiguous.
    if x.stride(1) == 1:
        return 16, min(padded(C), 128), 4
    return min(padded(HW), 128), 16, 4


def dwconv(x, weight, bias, relu=False, residual=True):
    """Triton implementation of :func:`efficientvit_kernels.ops.dwconv` (same arguments)."""
    K = ops.check_dwconv(x, weight, bias)
    check_device_dtype(x, _dwconv_kernel)
    B, C, H, W = x.shape
    out = ops.empty_output(x)  # first, so a just-freed block (a test's poison) goes to the output
    if out.numel() == 0:
        return out
    BP, BC, num_warps = _blocks(x, C, H * W)
    pixel_tiles = triton.cdiv(H * W, BP)
    grid = (B * pixel_tiles, triton.cdiv(C, BC))
    _dwconv_kernel[grid](x, weight.contiguous(), bias.contiguous(), out, C, H, W, pixel_tiles,
                         *x.stride(), *out.stride(), K=K, BP=BP, BC=BC, FLAT=flat_pixels(x),
                         RELU=bool(relu), RESIDUAL=bool(residual), num_warps=num_warps)
    return out
