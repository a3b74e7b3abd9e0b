"""1x1 convolution, ``y = [relu](weight x + bias)``, optionally followed by PatchMerging's
depthwise 3x3 stride-2 convolution and ReLU, as one Triton kernel.

Each program computes a (pixels x output channels) tile as a matrix product over the input
channels. With the depthwise convolution the tile is of output pixels: y is computed at each of
the 9 input pixels a tap reads (2.25x the products of y computed once), so y, four times x's
channels at x's resolution in PatchMerging, never reaches memory. PatchMerging's maps are small
(7x7 and 4x4 outputs at 224x224): a tile runs over the pixels of the whole batch, so that it
spans images instead of leaving rows empty (a 4x4 image fills a quarter of a 64-pixel tile) and
each weight tile serves 64 pixels (without the depthwise convolution, where the batch continues
the pixel axis, as in channels-last; else one image a tile).
"""
import torch
import triton
import triton.language as tl

from .. import ops
from ._common import (check_device_dtype, flat_batch, flat_pixels, interpreted, launch_kwargs,
                      mm, output_tile, padded, pixel_offsets, relu)


@triton.jit
def _pixels_by_weight(x_pix, ok, w_ptr, n, nmask, C, sxc, BP: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, DT: tl.constexpr):
    """(BP, BN) fp32: rows x_pix (where ok; else zero) times weight columns n, over C."""
    acc = tl.zeros([BP, BN], dtype=tl.float32)
    for k0 in range(0, C, BK):
        k = k0 + tl.arange(0, BK)
        kmask = k < C
        xk = tl.load(x_pix[:, None] + k[None, :] * sxc, mask=ok[:, None] & kmask[None, :],
                     other=0.0)
        wk = tl.load(w_ptr + n[None, :] * C + k[:, None], mask=kmask[:, None] & nmask[None, :],
                     other=0.0)
        acc += mm(xk, wk, DT)
    return acc


# Map sizes vary with the input and gain nothing from specialization: one compiled kernel
# serves every batch and map size of a layer.
@triton.jit(do_not_specialize=["H", "W", "OW", "OHW", "n_pixels", "pixel_tiles"])
def _conv1x1_kernel(x_ptr, w_ptr, b_ptr, dw_w_ptr, dw_b_ptr, out_ptr, C, CO, H, W, OW, OHW,
                    n_pixels, pixel_tiles, sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                    BP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RELU: tl.constexpr,
                    DEPTHWISE: tl.constexpr, FLAT: tl.constexpr):
    """The tiles run over n_pixels output pixels: with the depthwise convolution the whole
    batch's (each row finds its image), else one image's (grid axis 0: images x tiles)."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    b, p, n, pmask, nmask = output_tile(pixel_tiles, n_pixels, CO, BP, BN)
    bias = tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if DEPTHWISE:
        image = (p // OHW).to(tl.int64)
        oy = p % OHW // OW
        ox = p % OW
        x_img = x_ptr + image * sxb
        acc = tl.zeros([BP, BN], dtype=tl.float32)
        acc += tl.load(dw_b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        for tap in range(9):  # not unrolled: nine copies of the product loop spill registers
            iy = 2 * oy + (tap // 3 - 1)
            ix = 2 * ox + (tap % 3 - 1)
            ok = pmask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            y = _pixels_by_weight(x_img + iy * sxh + ix * sxw, ok, w_ptr, n, nmask, C, sxc,
                                  BP, BN, BK, DT) + bias
            if RELU:
                y = relu(y)
            # y is zero-padded: a tap outside the map adds nothing (not relu(bias))
            y = tl.where(ok[:, None], y, 0.0)
            tap_weight = tl.load(dw_w_ptr + n * 9 + tap, mask=nmask, other=0.0).to(tl.float32)
            acc += y * tap_weight[None, :]
        acc = relu(acc)
        o = out_ptr + (image * sob + oy * soh + ox * sow)[:, None]
    else:
        acc = _pixels_by_weight(x_ptr + b * sxb + pixel_offsets(p, W, sxh, sxw, FLAT), pmask,
                                w_ptr, n, nmask, C, sxc, BP, BN, BK, DT) + bias
        if RELU:
            acc = relu(acc)
        o = out_ptr + b * sob + pixel_offsets(p, OW, soh, sow, True)[:, None]
    tl.store(o + n[None, :] * soc, acc.to(DT), mask=pmask[:, None] & nmask[None, :])


def _blocks(x, CO, OHW, depthwise):
    """(pixels, output channels, input channels) per step, and num_warps: 8 with the
    depthwise convolution, whose two fp32 tiles (y and the sum) spill at 4 in fp32."""
    if interpreted(_conv1x1_kernel):  # few, large programs: the interpreter pays per op
        return min(padded(OHW), 128), min(padded(CO), 128), 64, 1
    return 64, min(padded(CO), 64), 32 if x.dtype == torch.float32 else 64, 8 if depthwise else 4


def conv1x1(x, weight, bias, relu=False, dw_weight=None, dw_bias=None):
    """Triton implementation of :func:`efficientvit_kernels.ops.conv1x1` (same arguments)."""
    B, CO, OH, OW = ops.check_conv1x1(x, weight, bias, dw_weight, dw_bias)
    check_device_dtype(x, _conv1x1_kernel)
    out = ops.empty_output(x, (B, CO, OH, OW))  # first: a just-freed block (a test's poison)
    if out.numel() == 0:
        return out
    _, C, H, W = x.shape
    depthwise = dw_weight is not None
    BP, BN, BK, num_warps = _blocks(x, CO, OH * OW, depthwise)
    # one image a tile, or (see the module docstring) the whole batch's pixels: with the
    # depthwise convolution in the kernel, without it here, as one image of B*H*W pixels
    images, pixels = B, OH * OW
    if depthwise:
        images, pixels = 1, B * OH * OW
    elif flat_batch(x) and flat_batch(out):
        images, pixels = 1, B * H * W
    pixel_tiles = triton.cdiv(pixels, BP)
    # without the depthwise convolution its pointers are never read: any tensor serves
    if depthwise:
        dw_weight, dw_bias = dw_weight.contiguous(), dw_bias.contiguous()
    else:
        dw_weight = dw_bias = bias
    args = (x, weight.contiguous(), bias.contiguous(), dw_weight, dw_bias, out, C, CO, H, W, OW,
            OH * OW, pixels, pixel_tiles, *x.stride(), *out.stride())
    kwargs = dict(BP=BP, BN=BN, BK=BK, RELU=bool(relu), DEPTHWISE=depthwise, FLAT=flat_pixels(x),
                  num_warps=num_warps)
    _conv1x1_kernel[(images * pixel_tiles, triton.cdiv(CO, BN))](
        *args, **launch_kwargs(_conv1x1_kernel, args, kwargs))
    return out
