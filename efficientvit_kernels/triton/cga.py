"""Local-window cascaded group attention (DESIGN.md), fused in one Triton kernel.

A program takes whole windows (on a GPU it loops over them: the grid is as many programs as
the device holds at once, so each program's scratch stays in cache). For a window it reads
the ws x ws tokens straight from x through strides (tokens beyond the map load as zeros: the
spec's zero padding, and those tokens take part in attention), runs the heads in cascade
order with every per-head tensor on chip, and writes the window's valid tokens once. Tokens
are the rows of every tile: N = ws*ws is padded to a power of two NP, and those extra
rows/columns are masked out of the softmax.
"""
import torch
import triton
import triton.language as tl

from .. import ops
from ._common import check_device_dtype, empty_like_layout, mm, padded, persistent_grid, relu


@triton.jit
def _cga_kernel(x_ptr, out_ptr, q_scratch_ptr, cat_scratch_ptr, qkv_w_ptr, qkv_b_ptr, dw_w_ptr,
                dw_b_ptr, ab_ptr, proj_w_ptr, proj_b_ptr, H, W, windows_h, windows_w, n_windows,
                scale, sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                HEADS: tl.constexpr, KD: tl.constexpr, D: tl.constexpr, K: tl.constexpr,
                WS: tl.constexpr, NP: tl.constexpr, KDP: tl.constexpr, DP: tl.constexpr,
                BC: tl.constexpr, RESIDUAL: tl.constexpr):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    N: tl.constexpr = WS * WS
    C: tl.constexpr = HEADS * D
    pid = tl.program_id(0)

    n = tl.arange(0, NP)  # token in the window, row-major on the ws x ws grid
    ty = n // WS
    tx = n % WS
    token = n < N
    dc = tl.arange(0, DP)
    dmask = dc < D
    kc = tl.arange(0, KDP)
    kmask = kc < KD
    bc = tl.arange(0, BC)
    # This program's scratch (reused for every window it runs, so it stays in L1/L2):
    # q, for the depthwise conv, whose neighbours live in other threads' registers, and
    # relu(concat(out_i)), the projection's input, so the projection can run in channel
    # blocks instead of holding an (NP, C) accumulator across the heads.
    q_scratch = q_scratch_ptr + pid.to(tl.int64) * (NP * KDP)
    q_tile = q_scratch + n[:, None] * KDP + kc[None, :]
    cat = cat_scratch_ptr + pid.to(tl.int64) * (NP * C) + n[:, None] * C

    for win in range(pid, n_windows, tl.num_programs(0)):
        wx = win % windows_w
        wy = (win // windows_w) % windows_h
        b = (win // (windows_w * windows_h)).to(tl.int64)
        gy = wy * WS + ty
        gx = wx * WS + tx
        inside = token & (gy < H) & (gx < W)  # a real pixel, not window padding
        x_tok = x_ptr + b * sxb + gy * sxh + gx * sxw

        out = tl.zeros([NP, DP], dtype=tl.float32)
        for i in range(HEADS):
            xi = tl.load(x_tok[:, None] + (i * D + dc)[None, :] * sxc,
                         mask=inside[:, None] & dmask[None, :], other=0.0)
            feat = xi.to(tl.float32) + out  # the cascade; out is 0 before head 0

            # qkv_weight[i] is (2KD + D, D): rows q | k | v; load them transposed (D, out).
            w = qkv_w_ptr + i * (2 * KD + D) * D + dc[:, None]
            wk_mask = dmask[:, None] & kmask[None, :]
            bias = qkv_b_ptr + i * (2 * KD + D)
            q = mm(feat, tl.load(w + kc[None, :] * D, mask=wk_mask, other=0.0), DT)
            q += tl.load(bias + kc, mask=kmask, other=0.0).to(tl.float32)[None, :]
            k = mm(feat, tl.load(w + (KD + kc[None, :]) * D, mask=wk_mask, other=0.0), DT)
            k += tl.load(bias + KD + kc, mask=kmask, other=0.0).to(tl.float32)[None, :]
            v = mm(feat, tl.load(w + (2 * KD + dc[None, :]) * D,
                                 mask=dmask[:, None] & dmask[None, :], other=0.0), DT)
            v += tl.load(bias + 2 * KD + dc, mask=dmask, other=0.0).to(tl.float32)[None, :]

            # q = dwconv_KxK(q) + c over the window grid, zero padding at the window edge.
            tl.store(q_tile, q)
            tl.debug_barrier()  # all of q is in scratch before anyone reads neighbours
            qc = tl.zeros([NP, KDP], dtype=tl.float32)
            qc += tl.load(dw_b_ptr + i * KD + kc, mask=kmask, other=0.0).to(tl.float32)[None, :]
            dw = dw_w_ptr + (i * KD + kc) * (K * K)
            for ky in range(K):
                sy = ty + (ky - K // 2)
                for kx in range(K):
                    sx = tx + (kx - K // 2)
                    ok = token & (sy >= 0) & (sy < WS) & (sx >= 0) & (sx < WS)
                    nb = tl.load(q_scratch + (sy * WS + sx)[:, None] * KDP + kc[None, :],
                                 mask=ok[:, None], other=0.0)
                    tap = tl.load(dw + ky * K + kx, mask=kmask, other=0.0).to(tl.float32)
                    qc += nb * tap[None, :]
            tl.debug_barrier()  # neighbour reads are done before q is overwritten

            # Bias for token pair (n, m) sits at (|dy|, |dx|) of the head's (ws, ws) table.
            ab = tl.load(ab_ptr + i * N + tl.abs(ty[:, None] - ty[None, :]) * WS
                         + tl.abs(tx[:, None] - tx[None, :]),
                         mask=token[:, None] & token[None, :], other=0.0)
            s = mm(qc, tl.trans(k), DT) * scale + ab.to(tl.float32)
            s = tl.where(token[None, :], s, float("-inf"))
            p = tl.exp(s - tl.max(s, axis=1)[:, None])
            attn = p / tl.sum(p, axis=1)[:, None]
            out = mm(attn, v, DT)  # (NP, DP), zero in the padded value columns
            tl.store(cat + (i * D + dc)[None, :], relu(out).to(DT), mask=dmask[None, :])
        tl.debug_barrier()  # the whole concatenation is in scratch

        # y = P relu(concat) + p (+ x), in blocks of BC output channels.
        o_tok = out_ptr + b * sob + gy * soh + gx * sow
        for c0 in range(0, C, BC):
            oc = c0 + bc
            ocm = oc < C
            y = tl.zeros([NP, BC], dtype=tl.float32)
            for k0 in range(0, C, BC):
                ic = k0 + bc
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


def cga(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight, proj_bias,
        window_size, scale, residual=True):
    """Triton implementation of :func:`efficientvit_kernels.ops.cga` (same arguments)."""
    heads, kd, d, K = ops.check_cga(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias,
                                    proj_weight, proj_bias, window_size)
    check_device_dtype(x, _cga_kernel)
    B, C, H, W = x.shape
    out = empty_like_layout(x)  # first, so a just-freed block (a test's poison) goes to the output
    ws = window_size
    windows_h, windows_w = triton.cdiv(H, ws), triton.cdiv(W, ws)
    n_windows = B * windows_h * windows_w
    if n_windows == 0:
        return out
    NP = padded(ws * ws)
    meta = dict(HEADS=heads, KD=kd, D=d, K=K, WS=ws, NP=NP, KDP=padded(kd), DP=padded(d),
                BC=32, RESIDUAL=bool(residual), num_warps=4 if NP <= 16 else 8)
    params = [t.contiguous() for t in (qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias,
                                       proj_weight, proj_bias)]

    def args(q_scratch, cat_scratch):
        return (x, out, q_scratch, cat_scratch, *params, H, W, windows_h, windows_w, n_windows,
                float(scale), *x.stride(), *out.stride())

    # The grid depends on the compiled kernel (dtypes stand in for the scratch there), and
    # the scratch on the grid.
    programs = persistent_grid(_cga_kernel, n_windows, args(torch.float32, x.dtype), **meta)
    q_scratch = torch.empty(programs * NP * meta["KDP"], dtype=torch.float32, device=x.device)
    cat_scratch = torch.empty(programs * NP * C, dtype=x.dtype, device=x.device)
    _cga_kernel[(programs,)](*args(q_scratch, cat_scratch), **meta)
    return out
