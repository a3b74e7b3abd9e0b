"""Squeeze-excite, ``x * sigmoid(w2 relu(w1 mean_hw(x) + b1) + b2)``, as one Triton kernel.

One program per image: it sums the image's pixels a block of channels at a time, reducing
each block's means into the hidden layer as it goes; then, again a block of channels at a
time, it computes their scales and writes the scaled pixels (a second read of the image, from
cache when the image fits). PatchMerging's images are small (7x7 or 4x4 at 224x224).
"""
import triton
import triton.language as tl

from .. import ops
from ._common import (check_device_dtype, flat_pixels, interpreted, launch_kwargs, padded,
                      pixel_offsets, relu)


@triton.jit(do_not_specialize=["HW", "W"])
def _squeeze_excite_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, C, R, HW, W,
                           sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                           RP: tl.constexpr, BP: tl.constexpr, BC: tl.constexpr,
                           FLAT: tl.constexpr):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, RP)
    rmask = r < R
    x_img = x_ptr + b * sxb
    o_img = out_ptr + b * sob
    hidden = tl.zeros([RP], dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cmask = c < C
        total = tl.zeros([BP, BC], dtype=tl.float32)
        for p0 in range(0, HW, BP):
            p = p0 + tl.arange(0, BP)
            x_pix = x_img + pixel_offsets(p, W, sxh, sxw, FLAT)[:, None]
            total += tl.load(x_pix + c[None, :] * sxc, mask=(p < HW)[:, None] & cmask[None, :],
                             other=0.0).to(tl.float32)
        mean = tl.sum(total, axis=0) / HW
        w1 = tl.load(w1_ptr + r[:, None] * C + c[None, :], mask=rmask[:, None] & cmask[None, :],
                     other=0.0)
        hidden += tl.sum(w1.to(tl.float32) * mean[None, :], axis=1)
    hidden = relu(hidden + tl.load(b1_ptr + r, mask=rmask, other=0.0).to(tl.float32))
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cmask = c < C
        w2 = tl.load(w2_ptr + c[:, None] * R + r[None, :], mask=cmask[:, None] & rmask[None, :],
                     other=0.0)
        gate = tl.sum(w2.to(tl.float32) * hidden[None, :], axis=1)
        gate += tl.load(b2_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        scale = 1.0 / (1.0 + tl.exp(-gate))
        for p0 in range(0, HW, BP):
            p = p0 + tl.arange(0, BP)
            mask = (p < HW)[:, None] & cmask[None, :]
            v = tl.load(x_img + pixel_offsets(p, W, sxh, sxw, FLAT)[:, None] + c[None, :] * sxc,
                        mask=mask, other=0.0)
            o = o_img + pixel_offsets(p, W, soh, sow, True)[:, None] + c[None, :] * soc
            tl.store(o, (v.to(tl.float32) * scale[None, :]).to(DT), mask=mask)


def _blocks(x, R, HW):
    """(pixels, channels) per step, and num_warps: a (hidden x channels) weight tile of at
    most 8K elements (32 registers a thread at 8 warps)."""
    RP = padded(R)
    if interpreted(_squeeze_excite_kernel):  # few, large steps: the interpreter pays per op
        return min(padded(HW), 64), max(16, 8192 // RP), 1
    BC = max(16, 8192 // RP) if x.stride(1) == 1 else 16
    return min(padded(HW), 64), min(BC, 64), 8


def squeeze_excite(x, w1, b1, w2, b2):
    """Triton implementation of :func:`efficientvit_kernels.ops.squeeze_excite` (same
    arguments)."""
    R = ops.check_ffn(x, w1, b1, w2, b2)
    check_device_dtype(x, _squeeze_excite_kernel)
    out = ops.empty_output(x)  # first, so a just-freed block (a test's poison) goes to the output
    if out.numel() == 0:
        return out
    B, C, H, W = x.shape
    BP, BC, num_warps = _blocks(x, R, H * W)
    args = (x, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), out, C, R,
            H * W, W, *x.stride(), *out.stride())
    kwargs = dict(RP=padded(R), BP=BP, BC=BC, FLAT=flat_pixels(x), num_warps=num_warps)
    _squeeze_excite_kernel[(B,)](*args, **launch_kwargs(_squeeze_excite_kernel, args, kwargs))
    return out
