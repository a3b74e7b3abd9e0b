"""The patch embedding, a chain of 3x3 stride-2 convolutions each with bias and [ReLU], as one
Triton kernel launched per convolution.

Each launch is an implicit matrix product: a (output pixels x output channels) tile of one
image, reduced over taps and input channels (_conv3x3_taps: tap by tap, or over (tap,
channel) pairs from the image's few channels), gathered from the input with the taps' zero
padding as masks. The weights may come in any layout; channels-last ones (as FusedPatchEmbed
holds them) have a tap's input channels adjacent, like a channels-last input's, so both load
as vectors. The outputs between launches go through memory (channels-last),
unlike the CPU kernel's, which keeps them in cache; but a narrow convolution and the one
after it run as one launch (the pair kernel), so the chain's largest activation, the first
convolution's output (M4: 16 channels at 112x112, half of the stem's traffic between
launches), never reaches memory.
"""
import math

import torch
import triton
import triton.language as tl

from .. import ops
from ._common import (check_device_dtype, interpreted, launch_kwargs, mm, multiple, output_tile,
                      padded, pixel_offsets, relu)


# Fewer input channels than this (an image's 3): _conv3x3_taps reduces over (tap, channel)
# pairs, BK a step, rather than tap by tap, where each tap's few channels would fill a step of
# at least 16 (tl.dot's least) with padding: 27 products of 32 rather than 27 of 144.
SMALL_CI = tl.constexpr(16)


def _reduction_step(CI, most):
    """BK of _conv3x3_taps for CI input channels: what a step reduces over, (tap, channel) pairs
    or channels, as a power of two of at least 16 and at most ``most``."""
    return min(padded(9 * CI if CI < SMALL_CI.value else CI), most)


@triton.jit
def _conv3x3_taps(acc, x_img, top, left, rows_ok, H, W, sxc, sxh, sxw, w_cols, cmask, swi,
                  swh, sww, CI: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr):
    """acc plus a 3x3 convolution, zero padding, for rows whose tap (0, 0) reads input (top,
    left) (rows_ok: the rows computed) into the output channels whose weights w_cols point at
    (cmask: those that exist). CI is a constant (a compilation per width; the models have a
    few), so a step's taps come from constant divisions, none where one step holds all CI."""
    if CI < SMALL_CI:
        # (tap, channel) pairs k = tap * CI + channel, BK a step
        for k0 in range(0, 9 * CI, BK):
            k = k0 + tl.arange(0, BK)
            t = k // CI
            ci = k - t * CI
            iy = top[:, None] + (t // 3)[None, :]
            ix = left[:, None] + (t % 3)[None, :]
            ok = (rows_ok[:, None] & (k < 9 * CI)[None, :] & (iy >= 0) & (iy < H) & (ix >= 0)
                  & (ix < W))
            xk = tl.load(x_img + iy * sxh + ix * sxw + ci[None, :] * sxc, mask=ok, other=0.0)
            wk = tl.load(w_cols[None, :] + ((t // 3) * swh + (t % 3) * sww + ci * swi)[:, None],
                         mask=(k < 9 * CI)[:, None] & cmask[None, :], other=0.0)
            acc += mm(xk, wk, DT)
    else:
        # Tap by tap, BK channels a step, in one loop (which the compiler pipelines): a row's
        # position and mask change once a step, not per element, and its channels, unit-stride
        # in channels-last x and weights, load as vectors.
        steps: tl.constexpr = (CI + BK - 1) // BK  # steps a tap
        for s in range(9 * steps):
            t = s // steps
            ci = (s - t * steps) * BK + tl.arange(0, BK)
            iy = top + t // 3
            ix = left + t % 3
            ok = rows_ok & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            xk = tl.load((x_img + iy * sxh + ix * sxw)[:, None] + ci[None, :] * sxc,
                         mask=ok[:, None] & (ci < CI)[None, :], other=0.0)
            wk = tl.load(w_cols[None, :] + (t // 3) * swh + (t % 3) * sww + ci[:, None] * swi,
                         mask=(ci < CI)[:, None] & cmask[None, :], other=0.0)
            acc += mm(xk, wk, DT)
    return acc


# Map sizes vary with the input and gain nothing from specialization: one compiled kernel
# serves every batch and image size of a convolution.
@triton.jit(do_not_specialize=["H", "W", "OW", "OHW", "pixel_tiles"])
def _conv3x3_stride2_kernel(x_ptr, w_ptr, b_ptr, out_ptr, CO, H, W, OW, OHW, pixel_tiles,
                            sxb, sxc, sxh, sxw, swo, swi, swh, sww, sob, soc, soh, sow,
                            CI: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                            BK: tl.constexpr, RELU: tl.constexpr, XV: tl.constexpr,
                            WV: tl.constexpr, OV: tl.constexpr):
    """XV, WV, OV: what the launcher found the pixel strides of x, of the weights (per output
    channel and tap) and of the output (with CO) to be multiples of (_vector): their channels
    then move as vectors of that many where Triton's own specialization (multiples of 16) does
    not see it, as at M5's 24 and 48 channels."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    sxb, sxh, sxw = multiple(sxb, XV), multiple(sxh, XV), multiple(sxw, XV)
    swo, swh, sww = multiple(swo, WV), multiple(swh, WV), multiple(sww, WV)
    sob, soh, sow, CO = multiple(sob, OV), multiple(soh, OV), multiple(sow, OV), multiple(CO, OV)
    b, p, n, pmask, nmask = output_tile(pixel_tiles, OHW, CO, BP, BN)  # p: output pixels
    acc = _conv3x3_taps(tl.zeros([BP, BN], dtype=tl.float32), x_ptr + b * sxb,
                        2 * (p // OW) - 1, 2 * (p % OW) - 1, pmask, H, W, sxc, sxh, sxw,
                        w_ptr + n * swo, nmask, swi, swh, sww, CI, BK, DT)
    acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = relu(acc)
    o = out_ptr + b * sob + pixel_offsets(p, OW, soh, sow, True)[:, None] + n[None, :] * soc
    tl.store(o, acc.to(DT), mask=pmask[:, None] & nmask[None, :])


# Output pixels a pair program computes: TILE x TILE. It computes the first convolution on the
# (2 TILE + 1)^2 positions the second's taps read (225 of REGION rows: 15% more than the
# outputs need, for the halo), and each tap of the second gathers its rows from them on chip.
PAIR_TILE = 7
PAIR_REGION = 256
# The first convolution's widths (padded) a pair takes, and its program's warps: the region's
# rows stay in registers. On sm_90, fp16: at 16 channels 73-90 registers a thread on 8 warps
# (two or three blocks a multiprocessor); at 32, 138 on 8 warps (one block), 76-85 on 16 (one
# block of as many warps; 5x5 tiles on 8 warps took 104, two blocks, but each program reads
# the weights of both convolutions, 22 KB at M5's widths, for half the outputs). Wider, a
# chain runs convolution by convolution. At 32: M5's first convolution (24 channels) and
# M0's third (32).
PAIR_WARPS = {16: 8, 32: 16}
PAIR_MAX_OUT = 64


@triton.jit
def _region_conv(x_img, w1_ptr, b1_ptr, C1, H, W, H1, W1, sxc, sxh, sxw, sw1o, sw1i, sw1h, sw1w,
                 oy0, ox0, r0, CI: tl.constexpr, SIDE: tl.constexpr, HALF: tl.constexpr,
                 BK: tl.constexpr, C1P: tl.constexpr, DT: tl.constexpr):
    """relu(conv1(x) + b1) on region rows r0 .. r0 + HALF: conv1 outputs (2 oy0 - 1 + r //
    SIDE, 2 ox0 - 1 + r % SIDE), rounded to DT as the unfused chain stores them; zero outside
    conv1's map (conv2's padding) and in the padded channels (where an infinite input would
    leave inf * 0 = NaN, which the zero weights of conv2 would spread)."""
    r = r0 + tl.arange(0, HALF)
    y1 = 2 * oy0 - 1 + r // SIDE
    x1 = 2 * ox0 - 1 + r % SIDE
    inside = (r < SIDE * SIDE) & (y1 >= 0) & (y1 < H1) & (x1 >= 0) & (x1 < W1)
    m = tl.arange(0, C1P)
    acc = _conv3x3_taps(tl.zeros([HALF, C1P], dtype=tl.float32), x_img, 2 * y1 - 1, 2 * x1 - 1,
                        inside, H, W, sxc, sxh, sxw, w1_ptr + m * sw1o, m < C1, sw1i, sw1h, sw1w,
                        CI, BK, DT)
    acc += tl.load(b1_ptr + m, mask=m < C1, other=0.0).to(tl.float32)[None, :]
    return tl.where(inside[:, None] & (m < C1)[None, :], relu(acc), 0.0).to(DT)


@triton.jit(do_not_specialize=["H", "W", "H1", "W1", "OH", "OW", "tiles_w", "tiles"])
def _conv3x3_stride2_pair_kernel(x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, C1, CO,
                                 H, W, H1, W1, OH, OW, tiles_w, tiles,
                                 sxb, sxc, sxh, sxw, sw1o, sw1i, sw1h, sw1w,
                                 sw2o, sw2i, sw2h, sw2w, sob, soc, soh, sow, CI: tl.constexpr,
                                 TILE: tl.constexpr, REGION: tl.constexpr, BP: tl.constexpr,
                                 BK: tl.constexpr, C1P: tl.constexpr, BN: tl.constexpr,
                                 RELU: tl.constexpr):
    """relu(conv1(x)) then conv2 of that, [relu]: both 3x3 stride 2; one program per TILE x
    TILE outputs of one image (all CO channels)."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    SIDE: tl.constexpr = 2 * TILE + 1  # the region's side, in conv1 outputs
    tl.static_assert(SIDE * SIDE <= REGION, "the region must hold every row the taps read")
    HALF: tl.constexpr = REGION // 2
    pid = tl.program_id(0)
    b = (pid // tiles).to(tl.int64)
    oy0 = (pid % tiles) // tiles_w * TILE
    ox0 = (pid % tiles) % tiles_w * TILE
    # The region in two halves, each computed alone: half the registers of its input tiles.
    x_img = x_ptr + b * sxb
    low = _region_conv(x_img, w1_ptr, b1_ptr, C1, H, W, H1, W1, sxc, sxh, sxw, sw1o, sw1i, sw1h,
                       sw1w, oy0, ox0, 0, CI, SIDE, HALF, BK, C1P, DT)
    high = _region_conv(x_img, w1_ptr, b1_ptr, C1, H, W, H1, W1, sxc, sxh, sxw, sw1o, sw1i, sw1h,
                        sw1w, oy0, ox0, HALF, CI, SIDE, HALF, BK, C1P, DT)

    p = tl.arange(0, BP)
    py = p // TILE
    px = p % TILE
    pmask = (p < TILE * TILE) & (oy0 + py < OH) & (ox0 + px < OW)
    m = tl.arange(0, C1P)
    n = tl.arange(0, BN)
    nmask = n < CO
    acc = tl.zeros([BP, BN], dtype=tl.float32)
    # Unrolled, the taps share their index arithmetic (a third fewer instructions at 16
    # channels); at 32 that spills on 16 warps, where the loop takes 76-85 registers.
    for t in tl.range(0, 9, loop_unroll_factor=9 if C1P <= 16 else 1):
        # tap (t // 3, t % 3) of output (oy, ox) reads conv1 output (2 oy - 1 + t // 3, ...):
        # region row 2 py + t // 3, column 2 px + t % 3, in one of the halves
        src = tl.where(p < TILE * TILE, (2 * py + t // 3) * SIDE + 2 * px + t % 3, 0)
        in_low = (src < HALF)[:, None]
        a = tl.where(in_low,
                     tl.gather(low, tl.broadcast_to(tl.where(src < HALF, src, 0)[:, None],
                                                    (BP, C1P)), 0),
                     tl.gather(high, tl.broadcast_to(tl.where(src < HALF, 0, src - HALF)[:, None],
                                                     (BP, C1P)), 0))
        wt = tl.load(w2_ptr + n[None, :] * sw2o + m[:, None] * sw2i + (t // 3) * sw2h
                     + (t % 3) * sw2w, mask=(m < C1)[:, None] & nmask[None, :], other=0.0)
        acc += mm(a, wt, DT)
    acc += tl.load(b2_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = relu(acc)
    o = (out_ptr + b * sob + ((oy0 + py) * soh + (ox0 + px) * sow)[:, None]
         + n[None, :] * soc)
    tl.store(o, acc.to(DT), mask=pmask[:, None] & nmask[None, :])


def _blocks(dtype, CI, CO, OHW):
    """(output pixels, output channels, reduction) per step, and num_warps."""
    if interpreted(_conv3x3_stride2_kernel):  # few, large programs: the interpreter pays per op
        return min(padded(OHW), 128), min(padded(CO), 128), _reduction_step(CI, 128), 1
    # fp32 products (on FMAs, operands in registers) on 32 output channels: at 64, 200 bytes a
    # thread spill on sm_80
    if dtype == torch.float32:
        return 64, min(padded(CO), 32), _reduction_step(CI, 32), 4
    # fp16/bf16: 128 pixels on 8 warps (74-110 registers on sm_90, two to four blocks), each
    # program's weight tile serving twice the pixels of 64 on 4
    return 128, min(padded(CO), 64), _reduction_step(CI, 64), 8


def _vector(t):
    """The most elements, up to 16 bytes' worth, that every stride of ``t`` but its channels'
    (batch, row, column; output channel, tap row and column of weights) is a multiple of,
    where its channels (dim 1) are unit-stride; else 1."""
    if t.stride(1) != 1:
        return 1
    v = 16 // t.element_size()
    while v > 1 and any(t.stride(d) % v for d in (0, 2, 3)):
        v //= 2
    return v


def _conv3x3_stride2(x, weight, bias, relu, out):
    B, CI, H, W = x.shape
    CO, OH, OW = out.shape[1:]
    BP, BN, BK, num_warps = _blocks(x.dtype, CI, CO, OH * OW)
    pixel_tiles = triton.cdiv(OH * OW, BP)
    _conv3x3_stride2_kernel[(B * pixel_tiles, triton.cdiv(CO, BN))](
        x, weight, bias.contiguous(), out, CO, H, W, OW, OH * OW, pixel_tiles, *x.stride(),
        *weight.stride(), *out.stride(), CI=CI, BP=BP, BN=BN, BK=BK, RELU=bool(relu),
        XV=_vector(x), WV=_vector(weight), OV=math.gcd(_vector(out), CO), num_warps=num_warps)


def _conv3x3_stride2_pair(x, weights, biases, relu, out):
    B, CI, H, W = x.shape
    C1, CO = weights[0].shape[0], weights[1].shape[0]
    tiles_w = triton.cdiv(out.shape[3], PAIR_TILE)
    tiles = triton.cdiv(out.shape[2], PAIR_TILE) * tiles_w
    args = (x, weights[0], biases[0].contiguous(), weights[1], biases[1].contiguous(), out, C1,
            CO, H, W, (H + 1) // 2, (W + 1) // 2, *out.shape[2:], tiles_w, tiles, *x.stride(),
            *weights[0].stride(), *weights[1].stride(), *out.stride())
    # fp32 reduces 16 a step: 32 (FMA operands in registers) spills on sm_80
    BK = _reduction_step(CI, 16 if x.dtype == torch.float32 else 32)
    kwargs = dict(CI=CI, TILE=PAIR_TILE, REGION=PAIR_REGION, BP=padded(PAIR_TILE * PAIR_TILE),
                  BK=BK, C1P=padded(C1), BN=padded(CO), RELU=bool(relu),
                  num_warps=PAIR_WARPS[padded(C1)])
    _conv3x3_stride2_pair_kernel[(B * tiles,)](
        *args, **launch_kwargs(_conv3x3_stride2_pair_kernel, args, kwargs))


def patch_embed(x, weights, biases, final_relu=False):
    """Triton implementation of :func:`efficientvit_kernels.ops.patch_embed` (same arguments;
    x in any layout)."""
    shape = ops.check_patch_embed(x, weights, biases)
    check_device_dtype(x, _conv3x3_stride2_kernel)
    # first, so a just-freed block (a test's poison) goes to the output
    out = ops.empty_output(x, shape, torch.channels_last)
    if out.numel() == 0:
        return out
    B, _, H, W = x.shape
    maps = []  # each convolution's output map
    for _ in weights:
        H, W = (H + 1) // 2, (W + 1) // 2
        maps.append((H, W))
    last = len(weights) - 1
    i = 0
    while i <= last:
        # two convolutions at once where the first's output fits a pair program's registers
        pair = (i < last and padded(weights[i].shape[0]) <= max(PAIR_WARPS)
                and weights[i + 1].shape[0] <= PAIR_MAX_OUT)
        j = i + 1 if pair else i  # the last convolution of this launch
        y = out if j == last else ops.empty_output(
            x, (B, weights[j].shape[0], *maps[j]), torch.channels_last)
        relu = final_relu or j < last
        if pair:
            _conv3x3_stride2_pair(x, weights[i:j + 1], biases[i:j + 1], relu, y)
        else:
            _conv3x3_stride2(x, weights[i], biases[i], relu, y)
        x, i = y, j + 1
    return out
