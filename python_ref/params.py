"""Folded parameters of each fusable module, in the layouts the fused ops take.

Found by structure, so a module of the official code, of timm's port or of this
reference gives the same tensors.
"""
import math

import torch

from .fold import conv_bn_parts, folded_conv

__all__ = ["cga_params", "dwconv_params", "ffn_params"]


@torch.no_grad()
def cga_params(attn):
    """Op arguments of a ``CascadedGroupAttention`` (official, timm or reference).

    Returns a dict: qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight,
    proj_bias (tensors) and window_size, scale (numbers).
    """
    heads = len(attn.qkvs)
    key_dim = attn.key_dim
    qkv = [folded_conv(m) for m in attn.qkvs]
    dws = [folded_conv(m) for m in attn.dws]
    K = max(w.shape[-1] for w, _ in dws)
    dw_weight = qkv[0][0].new_zeros(heads, key_dim, K, K)
    for i, (w, _) in enumerate(dws):  # a k x k kernel is a K x K one zero-padded around its centre
        o = (K - w.shape[-1]) // 2
        dw_weight[i, :, o:o + w.shape[-2], o:o + w.shape[-1]] = w[:, 0]
    idxs = attn.attention_bias_idxs
    ws = math.isqrt(idxs.shape[0])
    # row 0 is token (0, 0): its entry for token (dy, dx) is the bias of offset (dy, dx)
    attention_bias = attn.attention_biases[:, idxs[0]].reshape(heads, ws, ws)
    proj = [m for m in attn.proj if conv_bn_parts(m) is not None]
    proj_weight, proj_bias = folded_conv(proj[0])
    return dict(
        qkv_weight=torch.stack([w[:, :, 0, 0] for w, _ in qkv]),
        qkv_bias=torch.stack([b for _, b in qkv]),
        dw_weight=dw_weight,
        dw_bias=torch.stack([b for _, b in dws]),
        attention_bias=attention_bias.clone(),
        proj_weight=proj_weight[:, :, 0, 0].contiguous(),
        proj_bias=proj_bias,
        window_size=ws,
        scale=float(attn.scale),
    )


@torch.no_grad()
def dwconv_params(conv_bn):
    """(weight (C, K, K), bias (C)) of a depthwise Conv-BN."""
    weight, bias = folded_conv(conv_bn)
    return weight[:, 0].contiguous(), bias


@torch.no_grad()
def ffn_params(ffn):
    """(w1, b1, w2, b2) of an FFN (pw1 -> ReLU -> pw2)."""
    w1, b1 = folded_conv(ffn.pw1)
    w2, b2 = folded_conv(ffn.pw2)
    return w1[:, :, 0, 0].contiguous(), b1, w2[:, :, 0, 0].contiguous(), b2
