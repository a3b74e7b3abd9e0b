"""Local-window cascaded group attention (docs/design.md), fused in one Triton kernel.

A program takes whole windows (on a GPU it loops over them: the grid is as many programs as
the device holds at once, so each program's scratch stays in cache); windows up to 4x4 go
8 at a time, stacked into the rows of its tiles. For a window it reads the ws x ws tokens
straight from x through strides (tokens beyond the map load as zeros: the spec's zero padding,
and those tokens take part in attention), runs the heads in cascade order with every per-head
tensor on chip (the query's depthwise convolution of a lone window with only the taps of each
head's own kernel: M4's heads of 7x7, 5x5, 3x3 and 3x3 run 92 taps a token, not 4 x 49), and
writes the window's valid tokens once. Tokens are the rows of every tile:
N = ws*ws is padded to a power of two NP, and those extra rows/columns are masked out of the
softmax.
"""
import functools

import torch
import triton
import triton.language as tl

from .. import ops
from ._common import check_device_dtype, launch_kwargs, mm, padded, persistent_grid, relu


# Sizes vary with the input and gain nothing from specialization (equal to 1, multiple of 16):
# one compiled kernel serves every batch and map size of a layer.
@triton.jit(do_not_specialize=["H", "W", "windows_h", "windows_w", "n_windows"])
def _cga_kernel(x_ptr, out_ptr, scratch_ptr, cat_scratch_ptr,
                qkv_w_ptr, qkv_b_ptr, dw_w_ptr, dw_b_ptr, ab_ptr, proj_w_ptr, proj_b_ptr,
                H, W, windows_h, windows_w, n_windows, scale,
                sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                HEADS: tl.constexpr, KD: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
                WS: tl.constexpr, NP: tl.constexpr, WPB: tl.constexpr, KDP: tl.constexpr,
                DP: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
                BK: tl.constexpr, RESIDUAL: tl.constexpr, HP: tl.constexpr, KKP: tl.constexpr):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    N: tl.constexpr = WS * WS
    C: tl.constexpr = HEADS * D
    R: tl.constexpr = WPB * NP  # rows of a tile: WPB windows of NP tokens, stacked
    pid = tl.program_id(0)

    r = tl.arange(0, R)
    n = r % NP  # token in its window, row-major on the ws x ws grid
    ty = n // WS
    tx = n % WS
    token = n < N
    kc = tl.arange(0, KDP)
    kmask = kc < KD
    bd = tl.arange(0, BD)
    bv = tl.arange(0, BV)
    bc = tl.arange(0, BC)
    bk = tl.arange(0, BK)
    b16 = tl.arange(0, 16)
    # 3-D views (window, token, channel) for the products within each window
    w3 = tl.arange(0, WPB)[:, None, None]
    t3 = tl.arange(0, NP)[None, :, None]
    pair = t3 * NP + tl.arange(0, NP)[None, None, :]  # token pair (n, m) of the scores
    # This program's scratch, reused for every group of windows it runs (so it stays in L1/L2).
    # Every product over the value dim or the tokens runs in chunks read back from it, so the
    # registers a program holds do not grow with them (an fp32 product takes whole rows of its
    # operands into registers):
    #   feat  (R, DP)       fp32: feat_i = x_i + out_{i-1}
    #   prev  (R, DP)       fp32: out_i, for the next head's cascade
    #   attn  (WPB, NP, NP) fp32: the attention weights of each window (fp32 inputs only)
    #   v     (R, BD)       fp32: BD channels of v (fp32 inputs only)
    #   cat   (R, C)        DT:   relu(concat(out_i)), the output projection's input
    feat_scratch = scratch_ptr + pid.to(tl.int64) * (R * (2 * DP + NP + BD))
    feat = feat_scratch + r[:, None] * DP
    prev = feat + R * DP
    prev3 = feat_scratch + R * DP + (w3 * NP + t3) * DP
    attn_scratch = feat_scratch + R * 2 * DP + w3 * (NP * NP)
    v_scratch = feat_scratch + R * (2 * DP + NP)
    cat_rows = cat_scratch_ptr + pid.to(tl.int64) * (R * C)
    cat = cat_rows + r[:, None] * C
    cat3 = cat_rows + (w3 * NP + t3) * C
    # Each head's query kernel without its all-zero border rings (a head's smaller kernel comes
    # zero-padded to K x K; a NaN weight counts as nonzero): its radius, so that only its own
    # taps run. (HP, KDP, KKP): heads, key channels, taps, each padded to a power of two.
    # Stacked small windows run all K x K taps: with a loop bound read from these, Triton 3.6
    # holds them in 192-197 registers (one block a multiprocessor) or spills at 128, and M0's
    # 5x5 heads have no border rings to skip.
    hh = tl.arange(0, HP)
    tap3 = tl.arange(0, KKP)[None, None, :]
    dw_all = tl.load(dw_w_ptr + (hh[:, None, None] * KD + kc[None, :, None]) * (K * K) + tap3,
                     mask=(hh < HEADS)[:, None, None] & kmask[None, :, None] & (tap3 < K * K),
                     other=0.0)
    ring = tl.maximum(tl.abs(tap3 // K - K // 2), tl.abs(tap3 % K - K // 2))
    radii = tl.max(tl.max(tl.where(dw_all != 0, ring, 0), axis=2), axis=1)

    for first in range(pid * WPB, n_windows, tl.num_programs(0) * WPB):
        win = first + r // NP
        wx = win % windows_w
        wy = (win // windows_w) % windows_h
        b = (win // (windows_w * windows_h)).to(tl.int64)
        gy = wy * WS + ty
        gx = wx * WS + tx
        inside = token & (win < n_windows) & (gy < H) & (gx < W)  # a real pixel
        x_tok = x_ptr + b * sxb + gy * sxh + gx * sxw

        for i in range(HEADS):
            # feat_i = x_i + out_{i-1} (the cascade), into scratch
            for c0 in range(0, DP, BD):
                c = c0 + bd
                f = tl.load(x_tok[:, None] + (i * D + c)[None, :] * sxc,
                            mask=inside[:, None] & (c < D)[None, :], other=0.0).to(tl.float32)
                if i > 0:
                    f += tl.load(prev + c[None, :])
                tl.store(feat + c[None, :], f)
            tl.debug_barrier()  # feat_i is whole before anyone reads it (and prev is free)

            # qkv_weight[i] is (2KD + D, D): rows q | k | v; chunks are loaded transposed.
            w = qkv_w_ptr + i * (2 * KD + D) * D
            bias = qkv_b_ptr + i * (2 * KD + D)
            q = tl.zeros([R, KDP], dtype=tl.float32)
            k = tl.zeros([R, KDP], dtype=tl.float32)
            for c0 in range(0, DP, BD):
                c = c0 + bd
                f = tl.load(feat + c[None, :])
                wmask = (c < D)[:, None] & kmask[None, :]
                wq = tl.load(w + kc[None, :] * D + c[:, None], mask=wmask, other=0.0)
                wk = tl.load(w + (KD + kc[None, :]) * D + c[:, None], mask=wmask, other=0.0)
                q += mm(f, wq, DT)
                k += mm(f, wk, DT)
            q += tl.load(bias + kc, mask=kmask, other=0.0).to(tl.float32)[None, :]
            k += tl.load(bias + KD + kc, mask=kmask, other=0.0).to(tl.float32)[None, :]

            # q = dwconv_KxK(q) + c over each window's grid, zero padding at the window edge. A
            # tap gathers its neighbours' rows of q from the registers of the threads holding
            # them (on chip: no scratch, no barrier).
            qc = tl.zeros([R, KDP], dtype=tl.float32)
            qc += tl.load(dw_b_ptr + i * KD + kc, mask=kmask, other=0.0).to(tl.float32)[None, :]
            dw = dw_w_ptr + (i * KD + kc) * (K * K)
            if WPB == 1:
                radius = tl.max(tl.where(hh == i, radii, 0))
            else:
                radius: tl.constexpr = K // 2
            for ky in range(K // 2 - radius, K // 2 + radius + 1):
                for kx in range(K // 2 - radius, K // 2 + radius + 1):
                    qc = _q_tap(q, qc, dw, ky, kx, r, n, ty, tx, token, kmask, K, WS)

            # Scores within each window: a product batched over the windows (a lone window's
            # is 2-D, whose layouts take fewer registers: one 7x7 variant keeps its second
            # block). The bias table is laid out as the scores, -inf in the padded key columns.
            if WPB == 1:
                s = tl.expand_dims(mm(qc, tl.trans(k), DT), 0)
            else:
                k3 = tl.reshape(k, (WPB, NP, KDP))
                s = mm(tl.reshape(qc, (WPB, NP, KDP)), tl.trans(k3, (0, 2, 1)), DT)
            s = s * scale + tl.load(ab_ptr + i * NP * NP + pair)
            p = tl.exp(s - tl.max(s, axis=2)[:, :, None])
            attn = p / tl.sum(p, axis=2)[:, :, None]
            # fp16/bf16: the weights stay in registers, the product's operand for every value
            # chunk (8 registers a thread for a 64x64 window). fp32's product would hold whole
            # rows of them in each thread: they go through scratch, 16 key tokens at a time.
            if DT == tl.float32:
                tl.store(attn_scratch + pair, attn)
            else:
                attn = attn.to(DT)

            # out_i = attn v, BV value channels at a time; v's chunk reduces feat in chunks.
            for j0 in range(0, DP, BV):
                j = j0 + bv
                jmask = j < D
                v = tl.zeros([R, BV], dtype=tl.float32)
                for c0 in range(0, DP, BD):
                    c = c0 + bd
                    wv = tl.load(w + (2 * KD + j[None, :]) * D + c[:, None],
                                 mask=(c < D)[:, None] & jmask[None, :], other=0.0)
                    v += mm(tl.load(feat + c[None, :]), wv, DT)
                v += tl.load(bias + 2 * KD + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
                # out = attn v per window (zero in padded value columns)
                if DT != tl.float32:
                    if WPB == 1:
                        out = tl.expand_dims(mm(tl.reshape(attn, (NP, NP)), v, DT), 0)
                    else:
                        out = mm(attn, tl.reshape(v, (WPB, NP, BV)), DT)
                else:  # reduced over the window's tokens 16 at a time, through scratch (BV = BD)
                    tl.store(v_scratch + r[:, None] * BD + bd[None, :], v)
                    tl.debug_barrier()  # v's chunk is whole before other tokens' rows are read
                    out = tl.zeros([WPB, NP, BD], dtype=tl.float32)
                    for m0 in range(0, NP, 16):
                        m = m0 + b16
                        vm = tl.load(v_scratch + (w3 * NP + m[None, :, None]) * BD
                                     + bd[None, None, :])
                        out += mm(tl.load(attn_scratch + t3 * NP + m[None, None, :]), vm, DT)
                    tl.debug_barrier()  # v's chunk is read before the next one overwrites it
                tl.store(prev3 + j[None, None, :], out, mask=(j < DP)[None, None, :])
                tl.store(cat3 + (i * D + j)[None, None, :], relu(out).to(DT),
                         mask=jmask[None, None, :])
            tl.debug_barrier()  # out_i is whole before the next head reads it as prev

        # y = P relu(concat) + p (+ x), in blocks of BC output channels, BK input channels a step.
        o_tok = out_ptr + b * sob + gy * soh + gx * sow
        for c0 in range(0, C, BC):
            oc = c0 + bc
            ocm = oc < C
            y = tl.zeros([R, BC], dtype=tl.float32)
            for k0 in range(0, C, BK):
                ic = k0 + bk
                icm = ic < C
                a = tl.load(cat + ic[None, :], mask=icm[None, :], other=0.0)
                pw = tl.load(proj_w_ptr + oc[None, :] * C + ic[:, None],
                             mask=icm[:, None] & ocm[None, :], other=0.0)
                y += mm(a, pw, DT)
            y += tl.load(proj_b_ptr + oc, mask=ocm, other=0.0).to(tl.float32)[None, :]
            io_mask = inside[:, None] & ocm[None, :]
            if RESIDUAL:
                y += tl.load(x_tok[:, None] + oc[None, :] * sxc, mask=io_mask,
                             other=0.0).to(tl.float32)
            tl.store(o_tok[:, None] + oc[None, :] * soc, y.to(DT), mask=io_mask)


@triton.jit
def _q_tap(q, qc, dw, ky, kx, r, n, ty, tx, token, kmask, K: tl.constexpr, WS: tl.constexpr):
    """qc + tap (ky, kx) of the query's depthwise convolution: each token's neighbour at that
    tap, gathered from the registers of the threads holding its row of q (zero past the
    window's edge), times the tap's weight per channel (dw: the head's weights, K x K each)."""
    ny = ty + ky - K // 2
    nx = tx + kx - K // 2
    within = token & (ny >= 0) & (ny < WS) & (nx >= 0) & (nx < WS)
    src = tl.where(within, r - n + ny * WS + nx, 0)
    nb = tl.gather(q, tl.broadcast_to(src[:, None], q.shape), 0)
    tap = tl.load(dw + ky * K + kx, mask=kmask, other=0.0).to(tl.float32)
    return qc + tl.where(within[:, None], nb, 0.0) * tap[None, :]


# Windows of at most 16 tokens (4x4 and smaller) are stacked this many to a program, so its
# products have 128 rows (tensor-core tiles take 16 rows a warp) and 8 windows share each load
# of the weights. A 7x7 window alone (64 padded rows, 64x64 scores) holds 8 warps at 128
# registers; two stacked take 255 (one block a multiprocessor).
SMALL_WINDOWS_STACKED = 8


@functools.lru_cache(maxsize=None)
def _token_pairs(ws, NP, device):
    """(pair, padding): for token pair (n, m) of an NP-padded window, the index of its
    |dy| * ws + |dx| in a head's bias table (0 for padding tokens), and which key columns are
    padding. Built once per window size and device, not on every call."""
    t = torch.arange(NP, device=device)
    token = t < ws * ws
    ty, tx = t // ws, t % ws
    pair = (ty[:, None] - ty[None, :]).abs() * ws + (tx[:, None] - tx[None, :]).abs()
    return pair.where(token[:, None] & token[None, :], 0), ~token


def _score_bias(attention_bias, ws, NP):
    """(heads, NP, NP) fp32: what each head adds to its scores, the bias of token pair (n, m)
    (attention_bias[i, |dy|, |dx|]), and -inf in the key columns of the padding to NP, which
    then take no part in the softmax."""
    pair, padding = _token_pairs(ws, NP, attention_bias.device)
    return attention_bias.float().flatten(1)[:, pair].masked_fill_(padding, float("-inf"))


def cga(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight, proj_bias,
        window_size, scale, residual=True):
    """Triton implementation of :func:`efficientvit_kernels.ops.cga` (same arguments)."""
    heads, kd, d, K = ops.check_cga(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias,
                                    proj_weight, proj_bias, window_size)
    check_device_dtype(x, _cga_kernel)
    B, C, H, W = x.shape
    out = ops.empty_output(x)  # first, so a just-freed block (a test's poison) goes to the output
    ws = window_size
    windows_h, windows_w = triton.cdiv(H, ws), triton.cdiv(W, ws)
    n_windows = B * windows_h * windows_w
    if n_windows == 0:
        return out
    NP = padded(ws * ws)
    WPB = SMALL_WINDOWS_STACKED if NP == 16 else 1
    # Value and output channels go 16 at a time (wider chunks spill these 64- and 128-row
    # tiles); DP is d padded to them. The projection reduces over 64 input channels a step in
    # fp16/bf16 (rows of 128 bytes from the concat; 4x fewer steps), 16 in fp32, whose
    # product would hold whole rows in each thread.
    DP = triton.cdiv(d, 16) * 16
    # fp16/bf16 lone windows take v 32 channels a pass (a pass reads all of feat: d = 32 reads
    # it once); stacked windows and fp32 16.
    BV = min(32, padded(DP)) if x.dtype != torch.float32 and WPB == 1 else 16
    meta = dict(HEADS=heads, KD=kd, D=d, K=K, WS=ws, NP=NP, WPB=WPB, KDP=padded(kd), DP=DP,
                BD=16, BV=BV, BC=16, BK=16 if x.dtype == torch.float32 else 64,
                RESIDUAL=bool(residual), HP=triton.next_power_of_2(heads),
                KKP=triton.next_power_of_2(K * K), num_warps=8)
    params = [t.contiguous() for t in (qkv_weight, qkv_bias, dw_weight, dw_bias)]
    params += [_score_bias(attention_bias, ws, NP), proj_weight.contiguous(),
               proj_bias.contiguous()]

    def args(*scratch):
        return (x, out, *scratch, *params, H, W, windows_h, windows_w, n_windows,
                float(scale), *x.stride(), *out.stride())

    # The grid depends on the compiled kernel (dtypes stand in for the scratch there), and
    # the scratch on the grid.
    scratch_dtypes = (torch.float32, x.dtype)
    meta = launch_kwargs(_cga_kernel, args(*scratch_dtypes), meta)
    programs = persistent_grid(_cga_kernel, triton.cdiv(n_windows, WPB), args(*scratch_dtypes),
                               **meta)
    rows = WPB * NP
    per_program = (rows * (2 * DP + NP + meta["BD"]), rows * C)  # see the kernel
    scratch = [torch.empty(programs * size, dtype=dtype, device=x.device)
               for size, dtype in zip(per_program, scratch_dtypes)]
    _cga_kernel[(programs,)](*args(*scratch), **meta)
    return out
