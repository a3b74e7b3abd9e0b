"""Batch-norm folding: Conv-BN -> Conv2d with bias, BN-Linear -> Linear.

Works by structure (a Sequential holding a Conv2d then a BatchNorm2d, or a BatchNorm1d
then a Linear), so the official ``Conv2d_BN``/``BN_Linear`` and timm's
``ConvNorm``/``NormLinear`` fold the same way.
"""
import copy

import torch
from torch import nn

__all__ = ["conv_bn_parts", "bn_linear_parts", "folded_conv", "folded_linear",
           "fold_conv_bn", "fold_bn_linear", "fold_batchnorm"]


def _children(m):
    return [c for c in m.children() if not isinstance(c, (nn.Identity, nn.Dropout))]


def _pair(m, first, second):
    """The two layers of a Sequential holding a ``first`` then a ``second`` (dropout aside)."""
    if isinstance(m, nn.Sequential):
        parts = _children(m)
        if len(parts) == 2 and isinstance(parts[0], first) and isinstance(parts[1], second):
            return parts[0], parts[1]
    return None


def conv_bn_parts(m):
    """(conv, bn) of a Conv-BN Sequential, (conv, None) of a plain Conv2d, else None."""
    return (m, None) if isinstance(m, nn.Conv2d) else _pair(m, nn.Conv2d, nn.BatchNorm2d)


def bn_linear_parts(m):
    """(bn, linear) of a BN-Linear Sequential, (None, linear) of a plain Linear, else None."""
    return (None, m) if isinstance(m, nn.Linear) else _pair(m, nn.BatchNorm1d, nn.Linear)


def _bn_scale_shift(bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _weight_and_bias(layer):
    w = layer.weight
    b = layer.bias if layer.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return w.detach().clone(), b.detach().clone()


@torch.no_grad()
def folded_conv(m):
    """(weight, bias) of a Conv-BN (or plain Conv2d) with the batch norm folded in."""
    parts = conv_bn_parts(m)
    if parts is None:
        raise TypeError(f"expected a Conv2d or a Conv2d-BatchNorm2d pair, got {type(m).__name__}")
    conv, bn = parts
    weight, bias = _weight_and_bias(conv)
    if bn is None:
        return weight, bias
    scale, shift = _bn_scale_shift(bn)  # bn(conv(x)) = scale * conv(x) + shift, per channel
    return weight * scale[:, None, None, None], bias * scale + shift


@torch.no_grad()
def folded_linear(m):
    """(weight, bias) of a BN-Linear (or plain Linear) with the batch norm folded in."""
    parts = bn_linear_parts(m)
    if parts is None:
        raise TypeError(f"expected a Linear or a BatchNorm1d-Linear pair, got {type(m).__name__}")
    bn, linear = parts
    weight, bias = _weight_and_bias(linear)
    if bn is None:
        return weight, bias
    scale, shift = _bn_scale_shift(bn)  # linear(scale * x + shift)
    return weight * scale[None, :], weight @ shift + bias


def fold_conv_bn(m):
    """A plain ``nn.Conv2d`` computing what the Conv-BN ``m`` computes in eval mode."""
    conv, _ = conv_bn_parts(m)
    weight, bias = folded_conv(m)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    out.bias.data.copy_(bias)
    return out


def fold_bn_linear(m):
    """A plain ``nn.Linear`` computing what the BN-Linear ``m`` computes in eval mode."""
    weight, bias = folded_linear(m)
    out = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    out.bias.data.copy_(bias)
    return out


def _fold_children(module):
    for name, child in module.named_children():
        parts = conv_bn_parts(child)
        if parts is not None and parts[1] is not None:
            setattr(module, name, fold_conv_bn(child))
            continue
        parts = bn_linear_parts(child)
        if parts is not None and parts[0] is not None:
            setattr(module, name, fold_bn_linear(child))
            continue
        _fold_children(child)


def fold_batchnorm(model, inplace=False):
    """Returns ``model`` in eval mode with every Conv-BN and BN-Linear folded into one layer."""
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    _fold_children(model)
    return model
