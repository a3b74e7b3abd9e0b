"""The unfused math of each fused op, on folded parameters: the executable spec.

Every fused kernel is tested against these functions. Parameter layouts are the ones the
ops in ``torch.ops.efficientvit`` take (see ``efficientvit_kernels/ops.py``):

``cga``: x (B, C, H, W); h heads, key dim kd, value dim d = C / h, query kernel K (odd);
    qkv_weight (h, 2*kd + d, d), qkv_bias (h, 2*kd + d)  -- per head 1x1 conv, BN folded
    dw_weight (h, kd, K, K), dw_bias (h, kd)             -- depthwise conv on q; a head with a
                                                            smaller kernel is zero-padded to K
    attention_bias (h, ws, ws)                           -- bias for token offset (|dy|, |dx|)
    proj_weight (C, h*d), proj_bias (C)                  -- output 1x1 conv, BN folded
``dwconv``: x (B, C, H, W), weight (C, K, K), bias (C): ``[x +] act(dwconv_KxK(x) + bias)``
``ffn``: x (B, C, H, W), w1 (M, C), b1 (M), w2 (C, M), b2 (C): ``[x +] w2 relu(w1 x + b1) + b2``
``dwconv_ffn``: dwconv's weight and bias, then ffn's: ``y + ffn(y)``, ``y = x + dwconv(x)``
``conv1x1``: x (B, C, H, W), weight (Co, C), bias (Co) [, dw_weight (Co, 3, 3), dw_bias (Co)]
``patch_embed``: x (B, Ci, H, W), weights[l] (C_l, C_{l-1}, 3, 3), biases[l] (C_l):
    ``x = [relu](conv3x3_stride2(x, weights[l]) + biases[l])`` for each l
``squeeze_excite``: x (B, C, H, W), w1 (R, C), b1 (R), w2 (C, R), b2 (C):
    ``x * sigmoid(w2 relu(w1 mean_hw(x) + b1) + b2)``
"""
import torch
from torch.nn import functional as F

from .model import attention_bias_index, window_partition, window_reverse

__all__ = ["cga", "conv1x1", "dwconv", "dwconv_ffn", "ffn", "patch_embed", "squeeze_excite"]


def cga(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight, proj_bias,
        window_size, scale, residual):
    """Local-window cascaded group attention (docs/design.md), optionally plus the residual
    ``x``."""
    B, C, H, W = x.shape
    heads, kd, K = dw_weight.shape[0], dw_weight.shape[1], dw_weight.shape[-1]
    d = C // heads
    ws = window_size
    windows = window_partition(x, ws)  # (Bw, C, ws, ws)
    Bw = windows.shape[0]
    bias_index = attention_bias_index(ws).to(x.device)
    splits = windows.flatten(2).chunk(heads, dim=1)  # h x (Bw, d, N)
    outs = []
    feat = splits[0]
    for i in range(heads):
        if i > 0:
            feat = outs[-1] + splits[i]
        qkv = torch.einsum("oc,bcn->bon", qkv_weight[i], feat) + qkv_bias[i][None, :, None]
        q, k, v = qkv.split([kd, kd, d], dim=1)
        q = F.conv2d(q.reshape(Bw, kd, ws, ws), dw_weight[i][:, None], dw_bias[i],
                     padding=K // 2, groups=kd).flatten(2)
        ab = attention_bias[i].flatten()[bias_index]
        attn = (scale * (q.transpose(-2, -1) @ k) + ab).softmax(dim=-1)  # (Bw, N, N)
        outs.append(v @ attn.transpose(-2, -1))  # (Bw, d, N)
    y = torch.relu(torch.cat(outs, dim=1))
    y = torch.einsum("oc,bcn->bon", proj_weight, y) + proj_bias[None, :, None]
    y = window_reverse(y.reshape(Bw, C, ws, ws), ws, B, H, W)
    return x + y if residual else y


def dwconv(x, weight, bias, relu, residual):
    """``[x +] [relu](dwconv_KxK(x, zero padding K//2) + bias)``; weight (C, K, K)."""
    y = F.conv2d(x, weight[:, None], bias, padding=weight.shape[-1] // 2, groups=x.shape[1])
    if relu:
        y = torch.relu(y)
    return x + y if residual else y


def ffn(x, w1, b1, w2, b2, residual):
    """``[x +] w2 relu(w1 x + b1) + b2`` over channels at every pixel."""
    hidden = torch.relu(torch.einsum("mc,bchw->bmhw", w1, x) + b1[None, :, None, None])
    y = torch.einsum("cm,bmhw->bchw", w2, hidden) + b2[None, :, None, None]
    return x + y if residual else y


def dwconv_ffn(x, dw_weight, dw_bias, w1, b1, w2, b2):
    """An EfficientViT block's residual depthwise convolution, then its residual FFN:
    ``y + ffn(y)`` with ``y = x + dwconv(x)``."""
    y = dwconv(x, dw_weight, dw_bias, False, True)
    return ffn(y, w1, b1, w2, b2, True)


def conv1x1(x, weight, bias, relu, dw_weight=None, dw_bias=None):
    """A 1x1 convolution: ``y = [relu](weight x + bias)`` over channels at every pixel; given
    ``dw_weight`` (Co, 3, 3) and ``dw_bias``, ``relu(dwconv3x3(y) + dw_bias)`` after it,
    depthwise, stride 2, zero padding 1 (PatchMerging's conv1, ReLU, conv2, ReLU)."""
    y = torch.einsum("oc,bchw->bohw", weight, x) + bias[None, :, None, None]
    y = torch.relu(y) if relu else y
    if dw_weight is not None:
        y = torch.relu(F.conv2d(y, dw_weight[:, None], dw_bias, stride=2, padding=1,
                                groups=dw_weight.shape[0]))
    return y


def patch_embed(x, weights, biases, final_relu):
    """The patch embedding: a chain of convolutions, ``x = relu(conv3x3(x, w) + b)``, stride 2,
    zero padding 1, for each weight w and bias b; the last without its ReLU unless
    ``final_relu``."""
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, w, b, stride=2, padding=1)
        if final_relu or i + 1 < len(weights):
            x = torch.relu(x)
    return x


def squeeze_excite(x, w1, b1, w2, b2):
    """Squeeze-excite: each image's channels scaled by ``sigmoid(w2 relu(w1 m + b1) + b2)``,
    m the image's mean over its pixels (PatchMerging's, with its 1x1 convolutions as matrices)."""
    hidden = torch.relu(x.mean((2, 3)) @ w1.t() + b1)
    return x * torch.sigmoid(hidden @ w2.t() + b2)[:, :, None, None]
