"""EfficientViT M0-M5 in plain PyTorch.

Module names and state-dict keys follow the official code (microsoft/Cream,
``EfficientViT/classification/model/efficientvit.py``) so its checkpoints load with
``strict=True``. Unlike the official code, which asserts the input resolution it was
built for, the window attention pads to whole windows (as timm's port does) so the
model runs at any input size.
"""
import itertools

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Conv2d_BN", "BN_Linear", "SqueezeExcite", "PatchMerging", "Residual", "FFN",
    "CascadedGroupAttention", "LocalWindowAttention", "EfficientViTBlock", "EfficientViT",
    "MODEL_CONFIGS", "efficientvit_m0", "efficientvit_m1", "efficientvit_m2",
    "efficientvit_m3", "efficientvit_m4", "efficientvit_m5", "build",
]


class Conv2d_BN(nn.Sequential):
    """Conv2d (no bias) followed by BatchNorm2d; keys ``c.*`` and ``bn.*``."""

    def __init__(self, a, b, ks=1, stride=1, pad=0, dilation=1, groups=1, bn_weight_init=1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, dilation, groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(b))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.constant_(self.bn.bias, 0)


class BN_Linear(nn.Sequential):
    """BatchNorm1d followed by Linear; keys ``bn.*`` and ``l.*``."""

    def __init__(self, a, b, bias=True, std=0.02):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(a))
        self.add_module("l", nn.Linear(a, b, bias=bias))
        nn.init.trunc_normal_(self.l.weight, std=std)
        if bias:
            nn.init.constant_(self.l.bias, 0)


def _make_divisible(v, divisor=8):
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    """timm's ``SqueezeExcite`` (SEModule) as the official model uses it: keys ``fc1.*``, ``fc2.*``."""

    def __init__(self, channels, rd_ratio=0.25):
        super().__init__()
        rd_channels = _make_divisible(channels * rd_ratio)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1)
        self.bn = nn.Identity()
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        s = self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * self.gate(self.fc2(s))


class PatchMerging(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        hid_dim = int(dim * 4)
        self.conv1 = Conv2d_BN(dim, hid_dim, 1, 1, 0)
        self.act = nn.ReLU()
        self.conv2 = Conv2d_BN(hid_dim, hid_dim, 3, 2, 1, groups=hid_dim)
        self.se = SqueezeExcite(hid_dim, 0.25)
        self.conv3 = Conv2d_BN(hid_dim, out_dim, 1, 1, 0)

    def forward(self, x):
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))


class Residual(nn.Module):
    def __init__(self, m, drop=0.0):
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x):
        if self.training and self.drop > 0:
            keep = torch.rand(x.size(0), 1, 1, 1, device=x.device).ge_(self.drop).div(1 - self.drop)
            return x + self.m(x) * keep.detach()
        return x + self.m(x)


class FFN(nn.Module):
    def __init__(self, ed, h):
        super().__init__()
        self.pw1 = Conv2d_BN(ed, h)
        self.act = nn.ReLU()
        self.pw2 = Conv2d_BN(h, ed, bn_weight_init=0)

    def forward(self, x):
        return self.pw2(self.act(self.pw1(x)))


def attention_bias_index(resolution):
    """(N, N) index into a per-head table of resolution**2 biases: idx = |dy| * resolution + |dx|.

    Enumerating offsets in order of first appearance, as the official code does, gives
    exactly this index.
    """
    points = list(itertools.product(range(resolution), range(resolution)))
    idxs = [abs(p[0] - q[0]) * resolution + abs(p[1] - q[1]) for p in points for q in points]
    return torch.tensor(idxs, dtype=torch.long).view(len(points), len(points))


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention over one window of ``resolution x resolution`` tokens."""

    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4, resolution=14, kernels=(5, 5, 5, 5)):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.key_dim = key_dim
        self.d = int(attn_ratio * key_dim)
        self.attn_ratio = attn_ratio
        self.resolution = resolution
        self.qkvs = nn.ModuleList(
            Conv2d_BN(dim // num_heads, self.key_dim * 2 + self.d) for _ in range(num_heads))
        self.dws = nn.ModuleList(
            Conv2d_BN(self.key_dim, self.key_dim, kernels[i], 1, kernels[i] // 2, groups=self.key_dim)
            for i in range(num_heads))
        self.proj = nn.Sequential(nn.ReLU(), Conv2d_BN(self.d * num_heads, dim, bn_weight_init=0))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", attention_bias_index(resolution))

    def forward(self, x):  # x: (B, C, H, W), one window per batch entry
        B, C, H, W = x.shape
        biases = self.attention_biases[:, self.attention_bias_idxs]
        feats_in = x.chunk(len(self.qkvs), dim=1)
        feats_out = []
        feat = feats_in[0]
        for i, qkv in enumerate(self.qkvs):
            if i > 0:  # the cascade: the previous head's output joins this head's split
                feat = feat + feats_in[i]
            feat = qkv(feat)
            q, k, v = feat.view(B, -1, H, W).split([self.key_dim, self.key_dim, self.d], dim=1)
            q = self.dws[i](q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)
            attn = (q.transpose(-2, -1) @ k) * self.scale + biases[i]
            attn = attn.softmax(dim=-1)
            feat = (v @ attn.transpose(-2, -1)).view(B, self.d, H, W)
            feats_out.append(feat)
        return self.proj(torch.cat(feats_out, 1))


def window_partition(x, ws):
    """(B, C, H, W) -> (B*nH*nW, C, ws, ws), zero-padding bottom/right to whole windows."""
    B, C, H, W = x.shape
    pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
    x = F.pad(x, (0, pad_r, 0, pad_b))
    nH, nW = (H + pad_b) // ws, (W + pad_r) // ws
    x = x.view(B, C, nH, ws, nW, ws).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B * nH * nW, C, ws, ws)


def window_reverse(x, ws, B, H, W):
    """Inverse of :func:`window_partition`: cuts the padding off."""
    C = x.shape[1]
    nH, nW = -(-H // ws), -(-W // ws)
    x = x.view(B, nH, nW, C, ws, ws).permute(0, 3, 1, 4, 2, 5).reshape(B, C, nH * ws, nW * ws)
    return x[:, :, :H, :W].contiguous()


class LocalWindowAttention(nn.Module):
    """Cascaded group attention in ``ws' x ws'`` windows, ``ws' = min(window_resolution, resolution)``.

    A map of exactly ``ws' x ws'`` is one window; any other size is zero-padded at the
    bottom/right to whole windows (padded tokens take part in attention) and cropped after.
    """

    def __init__(self, dim, key_dim, num_heads=8, attn_ratio=4, resolution=14,
                 window_resolution=7, kernels=(5, 5, 5, 5)):
        super().__init__()
        if window_resolution <= 0:
            raise ValueError(f"window_resolution must be positive, got {window_resolution}")
        self.dim = dim
        self.num_heads = num_heads
        self.resolution = resolution
        self.window_resolution = window_resolution
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, attn_ratio=attn_ratio,
                                           resolution=min(window_resolution, resolution), kernels=kernels)

    def forward(self, x):
        B, C, H, W = x.shape
        ws = self.attn.resolution
        if H == ws and W == ws:
            return self.attn(x)
        return window_reverse(self.attn(window_partition(x, ws)), ws, B, H, W)


class EfficientViTBlock(nn.Module):
    """Sandwich block: DW-conv residual, FFN residual, window attention residual, DW-conv, FFN."""

    def __init__(self, type, ed, kd, nh=8, ar=4, resolution=14, window_resolution=7, kernels=(5, 5, 5, 5)):
        super().__init__()
        self.dw0 = Residual(Conv2d_BN(ed, ed, 3, 1, 1, groups=ed, bn_weight_init=0.0))
        self.ffn0 = Residual(FFN(ed, int(ed * 2)))
        if type == "s":
            self.mixer = Residual(LocalWindowAttention(
                ed, kd, nh, attn_ratio=ar, resolution=resolution,
                window_resolution=window_resolution, kernels=kernels))
        else:
            raise ValueError(f"unknown block type {type!r} (only 's', self-attention, exists)")
        self.dw1 = Residual(Conv2d_BN(ed, ed, 3, 1, 1, groups=ed, bn_weight_init=0.0))
        self.ffn1 = Residual(FFN(ed, int(ed * 2)))

    def forward(self, x):
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


def _dw_ffn(ed):
    return nn.Sequential(Residual(Conv2d_BN(ed, ed, 3, 1, 1, groups=ed)), Residual(FFN(ed, int(ed * 2))))


class EfficientViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                 stages=("s", "s", "s"), embed_dim=(64, 128, 192), key_dim=(16, 16, 16),
                 depth=(1, 2, 3), num_heads=(4, 4, 4), window_size=(7, 7, 7),
                 kernels=(5, 5, 5, 5), down_ops=(("subsample", 2), ("subsample", 2), ("",)),
                 distillation=False):
        super().__init__()
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        e0 = embed_dim[0]
        self.patch_embed = nn.Sequential(
            Conv2d_BN(in_chans, e0 // 8, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 8, e0 // 4, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 4, e0 // 2, 3, 2, 1), nn.ReLU(),
            Conv2d_BN(e0 // 2, e0, 3, 2, 1))

        resolution = img_size // patch_size
        attn_ratio = [embed_dim[i] / (key_dim[i] * num_heads[i]) for i in range(len(embed_dim))]
        blocks = [[] for _ in range(len(embed_dim) + 1)]
        for i, (stg, ed, kd, dpth, nh, ar, wd, do) in enumerate(
                zip(stages, embed_dim, key_dim, depth, num_heads, attn_ratio, window_size, down_ops)):
            for _ in range(dpth):
                blocks[i].append(EfficientViTBlock(stg, ed, kd, nh, ar, resolution, wd, kernels))
            if do[0] == "subsample":
                # the subsample block opens the next stage: sandwich around PatchMerging
                blocks[i + 1].append(_dw_ffn(embed_dim[i]))
                blocks[i + 1].append(PatchMerging(embed_dim[i], embed_dim[i + 1]))
                resolution = (resolution - 1) // do[1] + 1
                blocks[i + 1].append(_dw_ffn(embed_dim[i + 1]))
        for i in range(len(embed_dim)):
            self.add_module(f"blocks{i + 1}", nn.Sequential(*blocks[i]))

        self.head = BN_Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.distillation = distillation
        if distillation:
            self.head_dist = BN_Linear(embed_dim[-1], num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        x = self.patch_embed(x)
        x = self.blocks1(x)
        x = self.blocks2(x)
        x = self.blocks3(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x):
        x = self.forward_features(x)
        if self.distillation:
            x = self.head(x), self.head_dist(x)
            if not self.training:
                x = (x[0] + x[1]) / 2
            return x
        return self.head(x)


MODEL_CONFIGS = {
    "m0": dict(embed_dim=(64, 128, 192), depth=(1, 2, 3), num_heads=(4, 4, 4), kernels=(5, 5, 5, 5)),
    "m1": dict(embed_dim=(128, 144, 192), depth=(1, 2, 3), num_heads=(2, 3, 3), kernels=(7, 5, 3, 3)),
    "m2": dict(embed_dim=(128, 192, 224), depth=(1, 2, 3), num_heads=(4, 3, 2), kernels=(7, 5, 3, 3)),
    "m3": dict(embed_dim=(128, 240, 320), depth=(1, 2, 3), num_heads=(4, 3, 4), kernels=(5, 5, 5, 5)),
    "m4": dict(embed_dim=(128, 256, 384), depth=(1, 2, 3), num_heads=(4, 4, 4), kernels=(7, 5, 3, 3)),
    "m5": dict(embed_dim=(192, 288, 384), depth=(1, 3, 4), num_heads=(3, 3, 4), kernels=(7, 5, 3, 3)),
}


def build(name, **kwargs):
    """Builds ``efficientvit_<name>`` (name in m0..m5); kwargs override the config."""
    key = name.lower().removeprefix("efficientvit_")
    if key not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    return EfficientViT(**{**MODEL_CONFIGS[key], **kwargs})


def efficientvit_m0(**kwargs): return build("m0", **kwargs)
def efficientvit_m1(**kwargs): return build("m1", **kwargs)
def efficientvit_m2(**kwargs): return build("m2", **kwargs)
def efficientvit_m3(**kwargs): return build("m3", **kwargs)
def efficientvit_m4(**kwargs): return build("m4", **kwargs)
def efficientvit_m5(**kwargs): return build("m5", **kwargs)
