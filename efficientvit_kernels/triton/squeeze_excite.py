"""Squeeze-excite, ``x * sigmoid(w2 relu(w1 mean_hw(x) + b1) + b2)``, as three Triton kernels:
the means of each image's channels (fp32), their gates, and x scaled by them.

The gates kernel takes a block of images per program: their means form a matrix whose products
with the two layers' weights are matrix products, so each program reads the weights once for
all its images (M4's second PatchMerging: 1 MB of fp16 weights, read for each 32 KB image
with one image a program). The kernels that read x (twice: the means, then the scaling;
PatchMerging's maps are small, 7x7 and 4x4 at 224x224) spread over the whole batch, tiles of
the scaling spanning images.
"""
import torch
import triton
import triton.language as tl

from .. import ops
from ._common import (check_device_dtype, flat_pixels, interpreted, launch_kwargs, mm, padded,
                      pixel_offsets, relu)

# Images a program of the gates computes: the rows of its matrix products (tl.dot's least).
IMAGES = 16


@triton.jit(do_not_specialize=["HW", "W"])
def _channel_mean_kernel(x_ptr, out_ptr, C, HW, W, sxb, sxc, sxh, sxw,
                         BP: tl.constexpr, BC: tl.constexpr, FLAT: tl.constexpr):
    """out (B, C) fp32: the means over the pixels of image program_id(0), channels BC at a time
    (program_id(1)), pixels BP at a time."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = c < C
    total = tl.zeros([BP, BC], dtype=tl.float32)
    for p0 in range(0, HW, BP):
        p = p0 + tl.arange(0, BP)
        total += tl.load(x_ptr + b * sxb + pixel_offsets(p, W, sxh, sxw, FLAT)[:, None]
                         + c[None, :] * sxc, mask=(p < HW)[:, None] & cmask[None, :],
                         other=0.0).to(tl.float32)
    tl.store(out_ptr + b * C + c, tl.sum(total, axis=0) / HW, mask=cmask)


@triton.jit(do_not_specialize=["B"])
def _squeeze_excite_gate_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, B, C, R,
                                IB: tl.constexpr, RP: tl.constexpr, BC: tl.constexpr):
    """out (B, C) fp32: the gates of the means x (B, C) fp32 of images IB * program_id .. + IB,
    channels BC at a time. The products take operands of the weights' dtype (fp32: IEEE;
    fp16/bf16: the means and the hidden layer rounded to it, as the model's own linear layers
    round them) and sum in fp32."""
    DT: tl.constexpr = w1_ptr.dtype.element_ty
    image = tl.program_id(0) * IB + tl.arange(0, IB)
    imask = image < B
    rows = image.to(tl.int64)[:, None] * C
    r = tl.arange(0, RP)
    rmask = r < R
    hidden = tl.zeros([IB, RP], dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cmask = c < C
        mean = tl.load(x_ptr + rows + c[None, :], mask=imask[:, None] & cmask[None, :], other=0.0)
        w1 = tl.load(w1_ptr + r[None, :] * C + c[:, None], mask=cmask[:, None] & rmask[None, :],
                     other=0.0)
        hidden += mm(mean, w1, DT)
    hidden = relu(hidden + tl.load(b1_ptr + r, mask=rmask, other=0.0).to(tl.float32)[None, :])
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        cmask = c < C
        w2 = tl.load(w2_ptr + c[None, :] * R + r[:, None], mask=rmask[:, None] & cmask[None, :],
                     other=0.0)
        gate = mm(hidden, w2, DT)
        gate += tl.load(b2_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rows + c[None, :], 1.0 / (1.0 + tl.exp(-gate)),
                 mask=imask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["n_pixels", "HW", "W"])
def _channel_scale_kernel(x_ptr, gate_ptr, out_ptr, C, n_pixels, HW, W,
                          sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                          BP: tl.constexpr, BC: tl.constexpr, FLAT: tl.constexpr):
    """out = x * gate[image, channel], a (pixels x channels) tile per program, its pixels
    those of the whole batch (n_pixels), each in its own image."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (p < n_pixels)[:, None] & (c < C)[None, :]
    image = (p // HW).to(tl.int64)
    q = p % HW
    v = tl.load(x_ptr + (image * sxb + pixel_offsets(q, W, sxh, sxw, FLAT))[:, None]
                + c[None, :] * sxc, mask=mask, other=0.0)
    gate = tl.load(gate_ptr + image[:, None] * C + c[None, :], mask=mask, other=0.0)
    o = out_ptr + (image * sob + pixel_offsets(q, W, soh, sow, True))[:, None] + c[None, :] * soc
    tl.store(o, (v.to(tl.float32) * gate).to(x_ptr.dtype.element_ty), mask=mask)


def squeeze_excite(x, w1, b1, w2, b2):
    """Triton implementation of :func:`efficientvit_kernels.ops.squeeze_excite` (same
    arguments)."""
    R = ops.check_ffn(x, w1, b1, w2, b2)
    check_device_dtype(x, _squeeze_excite_gate_kernel)
    out = ops.empty_output(x)  # first, so a just-freed block (a test's poison) goes to the output
    if out.numel() == 0:
        return out
    B, C, H, W = x.shape
    # the interpreter pays per op: few, large steps
    BP, BC = (min(padded(H * W), 64), 64) if interpreted(_channel_mean_kernel) else (16, 64)
    means = torch.empty(B, C, dtype=torch.float32, device=x.device)
    _channel_mean_kernel[(B, triton.cdiv(C, BC))](
        x, means, C, H * W, W, *x.stride(), BP=BP, BC=BC, FLAT=flat_pixels(x), num_warps=4)
    # A program's steps are a chain: each waits on its loads and products (an H200 measured
    # about 3 us a step in fp32). fp32: 16 channels a step, no loads ahead (num_stages=1), as
    # the IEEE products on CUDA cores hold the (channels x hidden) weight tile beside the
    # (images x hidden) result (32 channels took 255 registers and spilled). fp16/bf16: tensor
    # cores, 64 channels a step and the next step's loads in flight: a quarter of the steps.
    RP = padded(R)
    gates = torch.empty_like(means)
    args = (means, w1.contiguous(), b1.contiguous(), w2.contiguous(), b2.contiguous(), gates, B,
            C, R)
    if x.dtype == torch.float32:
        kwargs = dict(IB=IMAGES, RP=RP, BC=16, num_warps=8, num_stages=1)
    else:
        kwargs = dict(IB=IMAGES, RP=RP, BC=64, num_warps=8, num_stages=2)
    _squeeze_excite_gate_kernel[(triton.cdiv(B, IMAGES),)](
        *args, **launch_kwargs(_squeeze_excite_gate_kernel, args, kwargs))
    BP = BC = 64
    _channel_scale_kernel[(triton.cdiv(B * H * W, BP), triton.cdiv(C, BC))](
        x, gates, out, C, B * H * W, H * W, W, *x.stride(), *out.stride(), BP=BP, BC=BC,
        FLAT=flat_pixels(x), num_warps=4)
    return out
