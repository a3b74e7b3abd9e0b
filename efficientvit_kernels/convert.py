"""``convert(model)``: an inference copy of an EfficientViT whose forward calls the fused ops.

The conversion is a sequence of named passes (``PASSES``, in this order), each switchable with
``convert(model, passes=...)``:

- ``"fuse"``: modules are recognised by structure, not by class, so the reference
  (``python_ref``), the official code (``Conv2d_BN``, ``CascadedGroupAttention``,
  ``LocalWindowAttention``, ``Residual``, ``FFN``) and timm's port (``ConvNorm``,
  ``ResidualDrop``, ``ConvMlp``, ``NormLinear``) convert alike:
  a residual around window attention, a depthwise Conv-BN or an FFN -> one fused op with the
  residual folded in (the same without the residual -> the op without it); a PatchMerging ->
  ``FusedPatchMerging`` (the same math, in a module the converter owns); a squeeze-excite ->
  the same with Linear layers; every other Conv-BN / BN-Linear -> one folded Conv2d / Linear;
  everything else is copied, its children converted.
- ``"patch_ops"`` (backends "auto", "cuda", "triton", and "cpu" on a CPU model; backend
  "cuda" has a kernel for the stem's op only, its PatchMerging ops run their plain-PyTorch
  definition, as PatchMerging itself would): the stem's convolutions and ReLUs (3x3, stride 2, the first from the
  image's few channels, in a plain ``nn.Sequential``) -> one ``FusedPatchEmbed`` with
  channels-last output; PatchMerging's first 1x1 convolution, its depthwise convolution and
  their ReLUs -> one ``FusedConv1x1``, its last 1x1 convolution another, its squeeze-excite
  one ``FusedSqueezeExcite``; every other Linear layer (the classifier, its batch norm folded)
  -> ``FusedLinear`` (on CPU conv1x1 on a 1x1 map, elsewhere torch's linear).
- ``"dwconv_ffn"`` (backend "triton"): after "fuse", each residual depthwise convolution and
  the residual FFN it feeds (an EfficientViT block's ``ffn0(dw0(x))`` and ``ffn1(dw1(x))``,
  and the pairs of a plain ``nn.Sequential``, as the stages' downsampling has them) -> one
  ``FusedDWConvFFN``, one Triton kernel (in the block an ``nn.Identity`` takes the FFN's
  place). The other backends have no kernel that fuses the two: on CPU the op would run its
  two kernels through one more Python call.
- ``"channels_last"`` (backends "auto", "cuda", "triton", and "cpu" on a CPU model): every
  remaining convolution gets channels-last weights, so oneDNN or cuDNN runs it channels-last,
  and the activations stay channels-last through the fused ops, which take either layout (the
  CUDA kernels then move x and out in 16-byte packs). After "patch_ops" no convolution of
  M0-M5 is left.

Nothing is computed in place, so no tensor a user's module may read again is overwritten
(benchmarks/results/cpu_inplace_2026-12-01.md and cpu_passes.md: writing over inputs gained
nothing above the noise). The passes rewrite only what they recognise completely: a module
with a forward of its own (a Sequential subclass, a PatchMerging look-alike) is converted
child by child and runs as written.

The input model is not modified and shares nothing mutable with the copy: nothing is
deep-copied through it (timm caches attention biases as non-leaf tensors, which
``copy.deepcopy`` rejects); every tensor, hook dict and container attribute is new.
"""
import copy

import torch
from torch import nn

import python_ref
from python_ref.fold import bn_linear_parts, conv_bn_parts, fold_bn_linear, fold_conv_bn

from . import graphs
from .modules import (FusedCGA, FusedConv1x1, FusedDWConv, FusedDWConvFFN, FusedFFN, FusedLinear,
                      FusedPatchEmbed, FusedPatchMerging, FusedSqueezeExcite, LinearSqueezeExcite,
                      ResidualAdd, _Fused, backend_ops)

__all__ = ["PASSES", "convert"]

PASSES = ("fuse", "patch_ops", "dwconv_ffn", "channels_last")


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
    # The three codebases' PatchMerging computes conv3(se(act(conv2(act(conv1(x)))))); a class
    # with the same children but a forward of its own may compute anything else.
    return (set(m._modules) == {"conv1", "act", "conv2", "se", "conv3"}
            and type(m.act) is nn.ReLU and type(m).forward.__qualname__ == "PatchMerging.forward")


def _runs_children_in_order(m):
    """An nn.Sequential (or a subclass that keeps its forward): each child applied to the output
    of the one before, and nothing else."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _is_pointwise_conv(m):
    return _is_conv(m, 1, 1, 0) and m.groups == 1


def _is_sigmoid(m):
    """nn.Sigmoid, or a module of no state named Sigmoid that computes it (timm's gate: its
    own Sigmoid class, with an in-place option)."""
    if type(m) is nn.Sigmoid:
        return True
    if type(m).__name__ != "Sigmoid" or m._modules or m._parameters or m._buffers:
        return False
    probe = torch.linspace(-8, 8, 33)
    with torch.no_grad():
        return torch.equal(m(probe.clone()), probe.sigmoid())


def _is_squeeze_excite(m):
    # timm's SqueezeExcite (SEModule) as EfficientViT builds it: no norm, no max-pool branch
    return (set(m._modules) == {"fc1", "bn", "act", "fc2", "gate"} and type(m.bn) is nn.Identity
            and type(m.act) is nn.ReLU and _is_sigmoid(m.gate)
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


def _fused_module(m, residual, backend):
    """The fused module computing ``[x +] m(x)``, or None when no op covers ``m``."""
    if _is_window_attention(m) or _is_cga(m):
        return FusedCGA(**python_ref.cga_params(m.attn if _is_window_attention(m) else m),
                        residual=residual, backend=backend)
    if _is_ffn(m):
        return FusedFFN(*python_ref.ffn_params(m), residual=residual, backend=backend)
    if residual and _is_dwconv(m):  # a bare depthwise conv stays a (folded) Conv2d
        return FusedDWConv(*python_ref.dwconv_params(m), relu=False, residual=True, backend=backend)
    return None


def _bias(layer):
    """A convolution's or Linear layer's bias, zeros where it has none."""
    return layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.weight.shape[0])


def _copy_container(m):
    """A shallow copy of module m with its own dicts, lists and sets (hooks, caches, ...), so
    nothing mutable is shared with m; children, parameters and buffers are set by the caller."""
    new = copy.copy(m)
    for name, value in vars(m).items():
        if isinstance(value, (dict, list, set)):
            new.__dict__[name] = copy.copy(value)
    return new


def _fuse(m, backend):
    """The "fuse" pass: a converted copy of m (see the module docstring)."""
    if isinstance(m, _Fused):  # converting a converted model: the same op, the new backend
        new = copy.deepcopy(m)
        new.backend = backend
        return new
    if _is_residual(m):
        fused = _fused_module(m.m, True, backend)
        return fused if fused is not None else ResidualAdd(_fuse(m.m, backend))
    fused = _fused_module(m, False, backend)
    if fused is not None:
        return fused
    if _is_squeeze_excite(m):
        return LinearSqueezeExcite(_linear(m.fc1), _linear(m.fc2))
    if _is_patch_merging(m):
        return FusedPatchMerging(*(_fuse(getattr(m, n), backend)
                                   for n in ("conv1", "conv2", "se", "conv3")))
    parts = conv_bn_parts(m)
    if parts is not None and parts[1] is not None:
        return fold_conv_bn(m)
    parts = bn_linear_parts(m)
    if parts is not None and parts[0] is not None:
        return fold_bn_linear(m)
    return _copy(m, lambda child: _fuse(child, backend))


def _plain_copy(m):
    return _copy(m, _plain_copy)


def _copy(m, convert_child):
    """m with its own tensors and containers, its children converted by convert_child (a
    leaf, such as a ReLU, Conv2d or Linear, is deep-copied)."""
    if not m._modules:
        return copy.deepcopy(m)
    new = _copy_container(m)
    new._modules = {name: None if child is None else convert_child(child)
                    for name, child in m._modules.items()}
    new._parameters = {k: None if p is None else nn.Parameter(p.detach().clone(), p.requires_grad)
                       for k, p in m._parameters.items()}
    new._buffers = {k: None if b is None else b.detach().clone() for k, b in m._buffers.items()}
    return new


def _is_stem_conv(m):
    """A convolution a patch embedding starts with, from an image's few channels."""
    return _is_conv(m, 3, 2, 1) and m.groups == 1 and m.in_channels <= 4


def _is_next_stem_conv(m, before):
    """A convolution of the patch embedding on the output of ``before``."""
    return _is_conv(m, 3, 2, 1) and m.groups == 1 and m.in_channels == before.out_channels


def _stem_convolutions(model, backend):
    """In a plain Sequential, a stem convolution and its ReLU, and each (convolution [, ReLU]) on
    the output of the one before that follows -> FusedPatchEmbed, in place of the first; the
    modules it took in are removed. The chain ends at a convolution without a ReLU."""
    for seq in model.modules():
        if not _runs_children_in_order(seq):
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
            seq._modules[children[i][0]] = FusedPatchEmbed(
                [c.weight for c in convs], [_bias(c) for c in convs], final_relu=is_relu(end - 1),
                backend=backend)
            for name, _ in children[i + 1:end]:
                del seq._modules[name]
            i = end


def _conv1x1_convolutions(model, backend):
    """PatchMerging's 1x1 convolutions -> FusedConv1x1: the first with its ReLU and, where it is
    a depthwise 3x3 stride-2 convolution, the second convolution and its ReLU."""
    for m in model.modules():
        if not isinstance(m, FusedPatchMerging) or not _is_conv(m.conv1, 1, 1, 0):
            continue
        conv1, conv2, conv3 = m.conv1, m.conv2, m.conv3
        depthwise = ()
        if (_is_conv(conv2, 3, 2, 1)
                and conv2.groups == conv2.in_channels == conv2.out_channels == conv1.out_channels):
            depthwise = (conv2.weight[:, 0], _bias(conv2))
            m.conv2 = m.act2 = None
        m.conv1 = FusedConv1x1(conv1.weight.flatten(1), _bias(conv1), True, *depthwise,
                               backend=backend)
        m.act1 = None
        if _is_conv(m.conv3, 1, 1, 0) and m.conv3.groups == 1:
            m.conv3 = FusedConv1x1(conv3.weight.flatten(1), _bias(conv3), False, backend=backend)


def _squeeze_excites(model, backend):
    """Each squeeze-excite (a LinearSqueezeExcite, after "fuse") -> FusedSqueezeExcite."""
    for m in model.modules():
        for name, child in m._modules.items():
            if isinstance(child, LinearSqueezeExcite):
                m._modules[name] = FusedSqueezeExcite(
                    child.fc1.weight, _bias(child.fc1), child.fc2.weight, _bias(child.fc2),
                    backend=backend)


def _linears(model, backend):
    """Each Linear layer outside a squeeze-excite (the classifiers) -> FusedLinear."""
    for m in model.modules():
        if isinstance(m, LinearSqueezeExcite):  # its forward runs fc1 and fc2 on (B, C) means
            continue
        for name, child in m._modules.items():
            if type(child) is nn.Linear:
                m._modules[name] = FusedLinear(child.weight, _bias(child), backend=backend)


# The forward of an EfficientViT block in the three codebases (the reference's and the official
# EfficientViTBlock, timm's EfficientVitBlock): ffn1(dw1(mixer(ffn0(dw0(x))))).
_BLOCK_FORWARDS = ("EfficientViTBlock.forward", "EfficientVitBlock.forward")


def _dwconv_ffn(dw, ffn, backend):
    """The FusedDWConvFFN of ``ffn(dw(x))``, or None unless dw is a residual depthwise
    convolution without ReLU and ffn a residual FFN on its channels."""
    if not (type(dw) is FusedDWConv and dw.residual and not dw.relu
            and type(ffn) is FusedFFN and ffn.residual
            and dw.weight.shape[0] == ffn.w1.shape[1]):
        return None
    return FusedDWConvFFN(dw.weight, dw.bias, ffn.w1, ffn.b1, ffn.w2, ffn.b2, backend=backend)


def _dwconv_ffn_pairs(model, backend):
    """Each depthwise convolution an FFN follows -> FusedDWConvFFN (the module docstring)."""
    for m in list(model.modules()):
        if _runs_children_in_order(m):
            names = list(m._modules)
            for first, second in zip(names, names[1:]):
                if first not in m._modules:  # the second of a pair fused before
                    continue
                fused = _dwconv_ffn(m._modules[first], m._modules[second], backend)
                if fused is not None:
                    m._modules[first] = fused
                    del m._modules[second]
        elif type(m).forward.__qualname__ in _BLOCK_FORWARDS:
            for dw, ffn in (("dw0", "ffn0"), ("dw1", "ffn1")):
                fused = _dwconv_ffn(m._modules.get(dw), m._modules.get(ffn), backend)
                if fused is not None:
                    m._modules[dw], m._modules[ffn] = fused, nn.Identity()


def _patch_ops(model, backend):
    _stem_convolutions(model, backend)
    _conv1x1_convolutions(model, backend)
    _squeeze_excites(model, backend)
    _linears(model, backend)


def _channels_last(model, backend):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight = nn.Parameter(m.weight.detach().to(memory_format=torch.channels_last),
                                    requires_grad=False)


_PASS_FUNCTIONS = {"patch_ops": _patch_ops, "dwconv_ffn": _dwconv_ffn_pairs,
                   "channels_last": _channels_last}


def _default_passes(model, backend):
    on_cpu = all(t.device.type == "cpu" for t in model.state_dict().values())
    if backend == "triton":
        return PASSES
    if backend in ("auto", "cuda") or (backend == "cpu" and on_cpu):
        return ("fuse", "patch_ops", "channels_last")
    return ("fuse",)


def convert(model, backend="auto", passes=None, cpu_replay=True):
    """Returns an inference copy of ``model`` (eval mode, batch norm folded) using the fused ops.

    ``model``: a whole EfficientViT (``python_ref``, official or timm) or any submodule of one
    (a ``LocalWindowAttention``, a ``Residual`` around it, an ``FFN``, a block, a stage), or a
    model converted before (its fused modules then take the new backend).
    ``backend``: "auto" (on CPU the CPU kernels; on CUDA, per op call, the backend measured
    fastest for it among the CUDA kernels, the Triton kernels and the plain-PyTorch definition:
    see ``efficientvit_kernels.auto_backend``), "cpu", "cuda", "triton" or "reference" (the
    plain-PyTorch decomposition of each op).
    ``passes``: the passes to run (a subset of ``PASSES``, run in that order; see the module
    docstring). Default: all four for backend "triton"; all but "dwconv_ffn" for "auto", "cuda",
    and "cpu" on a CPU model; else "fuse". (A 4-D
    output of the model may be channels-last; its values are the same.)
    ``cpu_replay``: with backend "auto" or "cpu", the copy's calls on CPU replay a C++ program
    of its ops (no Python between them), captured on the second call with an input of the
    same shape, strides and dtype; each call is checked against what the program assumed and
    runs module by module where that differs (hooks, training mode, gradients, tracing, a
    changed model); under ``torch.compile`` a call without gradients is one op that does the
    same. See ``efficientvit_kernels.cpu_replay``.

    The input model is left as it was and shares nothing mutable with the copy. The copy
    pickles, deep-copies and converts again; it runs under ``torch.no_grad()`` or
    ``torch.inference_mode()`` (the fused ops have no backward formula).
    """
    backend_ops(backend)  # fail early on an unknown or unavailable backend
    if passes is None:
        passes = _default_passes(model, backend)
    passes = tuple(passes) if not isinstance(passes, str) else (passes,)
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise ValueError(f"unknown conversion pass(es) {unknown}; choose from {list(PASSES)}")
    # Outside inference mode: the copy's tensors must be ordinary ones (with version counters,
    # usable in either mode); its weights are copies, so no gradient reaches them.
    with torch.inference_mode(False), torch.no_grad():
        out = _fuse(model, backend) if "fuse" in passes else _plain_copy(model)
        for name in PASSES[1:]:
            if name in passes:
                _PASS_FUNCTIONS[name](out, backend)
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    if cpu_replay and backend in ("auto", "cpu"):
        graphs.cpu_replay(out)
    return out
