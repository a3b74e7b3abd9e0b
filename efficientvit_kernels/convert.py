"""``convert(model)``: an inference copy of an EfficientViT whose forward calls the fused ops.

Modules are recognised by structure, not by class, so the reference (``python_ref``), the
official code (``Conv2d_BN``, ``CascadedGroupAttention``, ``LocalWindowAttention``,
``Residual``, ``FFN``) and timm's port (``ConvNorm``, ``ResidualDrop``, ``ConvMlp``,
``NormLinear``) convert alike:
- a residual around window attention, a depthwise Conv-BN or an FFN -> one fused op with
  the residual folded in; the same without the residual -> the op without it;
- a PatchMerging (conv1, ReLU act, conv2, se, conv3) -> the same with its ReLUs in place;
- a squeeze-excite (fc1, ReLU, fc2, Sigmoid on the mean of x) -> the same with Linear fc1, fc2;
- every other Conv-BN / BN-Linear -> one folded Conv2d / Linear; in a Sequential, a ReLU
  right after a convolution works in place (it owns the conv's fresh output);
- everything else is copied, its children converted;
- a fused attention or FFN whose input is the output of the fused op (or residual sum) before
  it, in a Sequential or an EfficientViT block (dw0, ffn0, mixer, dw1, ffn1), writes its
  result over that input on CPU (``inplace``): nothing else reads it.
On CPU the stem's convolutions and their ReLUs (3x3, stride 2, the first from the image's few
channels) become one ``stem_conv`` op with channels-last output; PatchMerging's first 1x1
convolution, its depthwise convolution and their ReLUs one ``pointwise`` op, its last 1x1
convolution another; any other convolution gets channels-last weights, so oneDNN runs it
channels-last, and the activations stay channels-last through the fused ops, which take either
layout.
The input model is not modified: nothing is deep-copied through it (timm caches attention
biases as non-leaf tensors, which ``copy.deepcopy`` rejects); every tensor is new.
"""
import copy

import torch
from torch import nn

import python_ref
from python_ref.fold import bn_linear_parts, conv_bn_parts, fold_bn_linear, fold_conv_bn

from .modules import (FusedCGA, FusedDWConv, FusedFFN, FusedPointwise, FusedStemConv,
                      InPlacePatchMerging, LinearSqueezeExcite, ResidualAdd, backend_ops)

__all__ = ["convert"]


def _is_cga(m):
    return all(hasattr(m, a) for a in ("qkvs", "dws", "proj", "attention_biases", "attention_bias_idxs"))


def _is_window_attention(m):
    return hasattr(m, "attn") and _is_cga(m.attn) and hasattr(m, "window_resolution")


def _is_ffn(m):
    return (hasattr(m, "pw1") and hasattr(m, "pw2") and isinstance(getattr(m, "act", None), nn.ReLU)
            and conv_bn_parts(m.pw1) is not None and conv_bn_parts(m.pw2) is not None)


def _is_conv(m, kernel, stride, padding):
    """A Conv2d with a square kernel, equal strides and zero padding on all sides, no dilation."""
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (kernel, kernel)
            and m.stride == (stride, stride) and m.padding == (padding, padding)
            and m.dilation == (1, 1) and m.padding_mode == "zeros")


def _is_dwconv(m):
    parts = conv_bn_parts(m)
    if parts is None:
        return False
    conv = parts[0]
    k = conv.kernel_size[0]
    return (conv.groups == conv.in_channels == conv.out_channels and k % 2 == 1
            and _is_conv(conv, k, 1, k // 2))


def _is_patch_merging(m):
    return (set(m._modules) == {"conv1", "act", "conv2", "se", "conv3"}
            and type(m.act) is nn.ReLU)


def _is_pointwise_conv(m):
    return _is_conv(m, 1, 1, 0) and m.groups == 1


def _is_squeeze_excite(m):
    # timm's SqueezeExcite (SEModule) as EfficientViT builds it: no norm, no max-pool branch
    return (set(m._modules) == {"fc1", "bn", "act", "fc2", "gate"} and type(m.bn) is nn.Identity
            and type(m.act) is nn.ReLU and type(m.gate) is nn.Sigmoid
            and _is_pointwise_conv(m.fc1) and _is_pointwise_conv(m.fc2)
            and not getattr(m, "add_maxpool", False))


def _linear(conv):
    """A 1x1 convolution as the Linear layer it is on a (B, C) input."""
    linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
    linear.weight = nn.Parameter(conv.weight.detach().flatten(1).clone())
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach().clone())
    return linear.to(conv.weight.device)


def _is_residual(m):
    # Residual (official) / ResidualDrop (timm): x + m(x), with drop path only in training
    return isinstance(getattr(m, "m", None), nn.Module) and isinstance(getattr(m, "drop", None), (int, float))


def _fuse(m, residual, backend):
    """The fused module computing ``[x +] m(x)``, or None when no op covers ``m``."""
    if _is_window_attention(m) or _is_cga(m):
        return FusedCGA(**python_ref.cga_params(m.attn if _is_window_attention(m) else m),
                        residual=residual, backend=backend)
    if _is_ffn(m):
        return FusedFFN(*python_ref.ffn_params(m), residual=residual, backend=backend)
    if residual and _is_dwconv(m):  # a bare depthwise conv stays a (folded) Conv2d
        return FusedDWConv(*python_ref.dwconv_params(m), relu=False, residual=True, backend=backend)
    return None


def _bias(conv):
    return conv.bias if conv.bias is not None else torch.zeros_like(conv.weight[:, 0, 0, 0])


def _relus_in_place(sequential):
    """In a Sequential, a ReLU whose input is a convolution's output (a new tensor that nothing
    else reads) may overwrite it."""
    children = list(sequential._modules.items())
    for (_, before), (name, m) in zip(children, children[1:]):
        if type(m) is nn.ReLU and isinstance(before, nn.Conv2d):
            sequential._modules[name] = nn.ReLU(inplace=True)


# An EfficientViT block's children (official, timm and python_ref alike), in the order its
# forward applies them, each to the output of the one before.
_BLOCK_CHAIN = ("dw0", "ffn0", "mixer", "dw1", "ffn1")


def _fused_ops_in_place(model):
    """A FusedCGA or FusedFFN applied to the output of a fused module or ResidualAdd (a new
    tensor that nothing else reads), the one before it in a Sequential or an EfficientViT block,
    writes its result over that output."""
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            chain = list(m)
        elif tuple(m._modules) == _BLOCK_CHAIN:
            chain = [m._modules[name] for name in _BLOCK_CHAIN]
        else:
            continue
        for before, module in zip(chain, chain[1:]):
            if (isinstance(module, (FusedCGA, FusedFFN))
                    and isinstance(before, (FusedCGA, FusedDWConv, FusedFFN, ResidualAdd))):
                module.inplace = True


def _convert(m, backend):
    if _is_residual(m):
        fused = _fuse(m.m, True, backend)
        return fused if fused is not None else ResidualAdd(_convert(m.m, backend))
    fused = _fuse(m, False, backend)
    if fused is not None:
        return fused
    if _is_squeeze_excite(m):
        return LinearSqueezeExcite(_linear(m.fc1), _linear(m.fc2))
    if _is_patch_merging(m):
        return InPlacePatchMerging(*(_convert(getattr(m, n), backend)
                                     for n in ("conv1", "conv2", "se", "conv3")))
    parts = conv_bn_parts(m)
    if parts is not None and parts[1] is not None:
        return fold_conv_bn(m)
    parts = bn_linear_parts(m)
    if parts is not None and parts[0] is not None:
        return fold_bn_linear(m)
    if not m._modules:
        return copy.deepcopy(m)  # a leaf: ReLU, Conv2d, Linear, pooling, ...
    new = copy.copy(m)  # keeps attributes (config, forward) but gets its own children and tensors
    new._modules = {name: None if child is None else _convert(child, backend)
                    for name, child in m._modules.items()}
    new._parameters = {k: None if p is None else nn.Parameter(p.detach().clone(), p.requires_grad)
                       for k, p in m._parameters.items()}
    new._buffers = {k: None if b is None else b.detach().clone() for k, b in m._buffers.items()}
    if isinstance(new, nn.Sequential):
        _relus_in_place(new)
    return new


def _is_stem_conv(m):
    """A convolution ``stem_conv`` starts with, from an image's few channels."""
    return _is_conv(m, 3, 2, 1) and m.groups == 1 and m.in_channels <= 4


def _is_next_stem_conv(m, before):
    """A convolution ``stem_conv`` computes on the output of ``before``."""
    return _is_conv(m, 3, 2, 1) and m.groups == 1 and m.in_channels == before.out_channels


def _stem_convolutions(model, backend):
    """In a Sequential, a stem convolution and its ReLU, and each (convolution [, ReLU]) on the
    output of the one before that follows -> FusedStemConv, then Identity for each module it
    took in. The chain ends at a convolution without a ReLU."""
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq._modules.items())
        module = lambda i: children[i][1] if i < len(children) else None
        is_relu = lambda i: type(module(i)) is nn.ReLU
        i = 0
        while i < len(children):
            if not (_is_stem_conv(module(i)) and is_relu(i + 1)):
                i += 1
                continue
            convs, end = [module(i)], i + 2
            while is_relu(end - 1) and _is_next_stem_conv(module(end), convs[-1]):
                convs.append(module(end))
                end += 2 if is_relu(end + 1) else 1
            seq._modules[children[i][0]] = FusedStemConv(
                [c.weight for c in convs], [_bias(c) for c in convs], final_relu=is_relu(end - 1),
                backend=backend)
            for name, _ in children[i + 1:end]:
                seq._modules[name] = nn.Identity()
            i = end


def _pointwise_convolutions(model, backend):
    """PatchMerging's 1x1 convolutions -> FusedPointwise: the first with its ReLU and, where it is
    a depthwise 3x3 stride-2 convolution, the second convolution and its ReLU."""
    for m in model.modules():
        if not isinstance(m, InPlacePatchMerging):
            continue
        conv1, conv2, conv3 = m.conv1, m.conv2, m.conv3
        depthwise = ()
        if (_is_conv(conv2, 3, 2, 1)
                and conv2.groups == conv2.in_channels == conv2.out_channels == conv1.out_channels):
            depthwise = (conv2.weight[:, 0], _bias(conv2))
            m.conv2, m.act2 = nn.Identity(), nn.Identity()
        m.conv1 = FusedPointwise(conv1.weight.flatten(1), _bias(conv1), True, *depthwise,
                                 backend=backend)
        m.act1 = nn.Identity()
        m.conv3 = FusedPointwise(conv3.weight.flatten(1), _bias(conv3), False, backend=backend)


def _channels_last_convolutions(model):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight = nn.Parameter(m.weight.detach().to(memory_format=torch.channels_last),
                                    requires_grad=False)


@torch.no_grad()
def convert(model, backend="auto"):
    """Returns an inference copy of ``model`` (eval mode, batch norm folded) using the fused ops.

    ``model``: a whole EfficientViT (``python_ref``, official or timm) or any submodule of one
    (a ``LocalWindowAttention``, a ``Residual`` around it, an ``FFN``, a block, a stage).
    ``backend``: "auto" (the compiled kernels for the tensors' device, Triton on CUDA where
    the CUDA kernels were not built), "cpu", "cuda", "triton" or "reference" (the
    plain-PyTorch decomposition of each op). The input model is left as it was. For the CPU
    kernels ("auto" or "cpu" on a CPU model), the stem's convolutions and ReLUs become a
    ``FusedStemConv``, PatchMerging's convolutions ``FusedPointwise`` modules, and the other
    convolution weights are made channels-last: a 4-D output of the model may then be
    channels-last; its values are the same. A fused attention or FFN that follows another
    fused op in a block or Sequential writes over that op's output (``inplace``), so a block
    or Sequential of the copy may overwrite the intermediate results it makes, never its input.
    """
    backend_ops(backend)  # fail early on an unknown or unavailable backend
    out = _convert(model, backend)
    _fused_ops_in_place(out)
    if backend in ("auto", "cpu") and all(t.device.type == "cpu" for t in out.state_dict().values()):
        _stem_convolutions(out, backend)
        _pointwise_convolutions(out, backend)
        _channels_last_convolutions(out)
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out
