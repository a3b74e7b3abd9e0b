"""Inference modules holding folded weights (as buffers) that call the fused ops."""
import operator
from typing import NamedTuple

import torch
from torch import nn

import python_ref.functional

from . import ops

__all__ = ["BACKENDS", "FusedCGA", "FusedDWConv", "FusedFFN", "FusedPointwise", "FusedStemConv",
           "InPlacePatchMerging", "LinearSqueezeExcite", "ResidualAdd", "backend_ops"]

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")


def backend_ops(backend):
    """The namespace whose ``cga``, ``dwconv`` and ``ffn`` implement ``backend``.

    "auto", "cpu" and "cuda" call ``torch.ops.efficientvit`` (the dispatcher picks the
    kernel for the tensors' device); "triton" the Triton kernels; "reference" the
    plain-PyTorch spec.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return python_ref.functional
    if backend == "triton":
        from . import triton as triton_backend
        if not triton_backend.available():
            raise RuntimeError("backend='triton' needs the triton package, which is not importable")
        return triton_backend
    if backend == "cuda" and not ops.has_compiled_kernels("cuda"):
        raise RuntimeError("backend='cuda': the CUDA kernels were not built (the build adds them "
                           "where torch has CUDA and nvcc is found); use backend='triton' or rebuild")
    return ops


class _Packing(NamedTuple):
    """A module's packed weights and what they were packed from."""
    packed: list        # the pack op's tensors
    weights: tuple      # the buffers packed
    versions: list      # their version counters then
    dtype: torch.dtype  # their dtype


class _Fused(nn.Module):
    """Shared plumbing: the backend, a device check for the compiled backends, and the weights
    packed for the CPU kernel where the module has a pack op.

    Packing happens at construction (in ``convert``) for weights on CPU, and again before a
    CPU call whenever a weight buffer was replaced (``.to()``, assignment) or changed in
    place since (its version counter moved, as ``load_state_dict`` and in-place ops do). A
    write through ``.data`` moves no version counter: call ``repack()`` after one. Under
    ``torch.compile``/``torch.export`` the module calls the op on the unpacked weights, so
    a traced graph never holds a stale packing.

    FusedCGA's and FusedFFN's ``inplace``: the CPU call on packed weights writes its result into
    x and returns x, as ``nn.ReLU(inplace=True)`` does: for an x nothing else reads, this
    saves an activation-sized allocation and writes lines still in cache. Elsewhere (other
    devices or backends, under ``torch.compile``) x is left as it was; so only pass x that
    is not read again. ``convert`` sets it where x is the fresh output of the module before.
    """

    _weight_names = ()  # the buffers the op reads, in its argument order
    _pack_op = None     # ops.X_pack, for a module whose CPU kernel reads packed weights

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self._ops = backend_ops(backend)
        self._packed = None

    def _set_weights(self, **weights):
        for name, t in weights.items():
            self.register_buffer(name, t.detach().clone().contiguous())
        if self._packs() and all(t.device.type == "cpu" for t in self._weights()):
            self.repack()

    def _weights(self):
        return tuple(self._buffers[name] for name in self._weight_names)

    def _packs(self):
        return self._pack_op is not None and self.backend in ("auto", "cpu")

    def _pack_args(self):
        """The pack op's arguments after the weights."""
        return ()

    def repack(self):
        """Packs the weights for the CPU kernel now (see the class docstring for when)."""
        weights = self._weights()
        self._packed = _Packing(self._pack_op(*weights, *self._pack_args()), weights,
                                [t._version for t in weights], weights[0].dtype)

    def _cpu_packed(self, x):
        """The packed weights when the CPU kernel on packed weights serves x, else None."""
        if x.device.type != "cpu" or not self._packs() or torch.compiler.is_compiling():
            return None
        weights = self._weights()
        packing = self._packed
        # The common case first, in few Python steps (it runs before every op): the same
        # buffers, unchanged, packed for x's dtype (so all on CPU).
        if (packing is not None and packing.dtype == x.dtype
                and all(map(operator.is_, weights, packing.weights))
                and [t._version for t in weights] == packing.versions):
            return packing.packed
        if any(t.device.type != "cpu" or t.dtype != x.dtype for t in weights):
            return None  # the plain op reports the mismatch
        self.repack()
        return self._packed.packed

    def _apply(self, fn, recurse=True):
        self._packed = None  # the buffers are replaced; repacked at the next CPU call
        return super()._apply(fn, recurse)

    def _check_device(self, x):
        if self.backend in ("cpu", "cuda") and x.device.type != self.backend:
            raise RuntimeError(f"{type(self).__name__} was converted with backend={self.backend!r} "
                               f"but got a tensor on {x.device}")

    def extra_repr(self):
        return f"backend={self.backend!r}"


class FusedCGA(_Fused):
    """Local-window cascaded group attention, optionally with its residual, in one op. With
    ``inplace``, the CPU kernel on packed weights writes the result into x (see ``_Fused``)."""

    _weight_names = ("qkv_weight", "qkv_bias", "dw_weight", "dw_bias", "attention_bias",
                     "proj_weight", "proj_bias")
    _pack_op = staticmethod(ops.cga_pack)

    def __init__(self, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight,
                 proj_bias, window_size, scale, residual, backend="auto", inplace=False):
        super().__init__(backend)
        self.inplace = bool(inplace)
        self.window_size = int(window_size)
        self.scale = float(scale)
        self.residual = bool(residual)
        self._set_weights(qkv_weight=qkv_weight, qkv_bias=qkv_bias, dw_weight=dw_weight,
                          dw_bias=dw_bias, attention_bias=attention_bias, proj_weight=proj_weight,
                          proj_bias=proj_bias)

    def _pack_args(self):
        return self.window_size, self.scale

    def forward(self, x):
        self._check_device(x)
        packed = self._cpu_packed(x)
        if packed is not None:
            op = ops.cga_packed_ if self.inplace else ops.cga_packed
            return op(x, packed, self.dw_weight.shape[1], self.window_size, self.residual)
        return self._ops.cga(x, *self._weights(), self.window_size, self.scale, self.residual)

    def extra_repr(self):
        heads, kd, K = self.dw_weight.shape[:3]
        return (f"channels={self.proj_weight.shape[0]}, heads={heads}, key_dim={kd}, kernel={K}, "
                f"window_size={self.window_size}, residual={self.residual}"
                f"{', inplace=True' if self.inplace else ''}, "
                f"{super().extra_repr()}")


class FusedDWConv(_Fused):
    """``[x +] [relu](dwconv_KxK(x) + bias)`` in one op."""

    _weight_names = ("weight", "bias")

    def __init__(self, weight, bias, relu, residual, backend="auto"):
        super().__init__(backend)
        self.relu = bool(relu)
        self.residual = bool(residual)
        self._set_weights(weight=weight, bias=bias)

    def forward(self, x):
        self._check_device(x)
        return self._ops.dwconv(x, self.weight, self.bias, self.relu, self.residual)

    def extra_repr(self):
        return (f"channels={self.weight.shape[0]}, kernel={self.weight.shape[-1]}, relu={self.relu}, "
                f"residual={self.residual}, {super().extra_repr()}")


class FusedFFN(_Fused):
    """``[x +] w2 relu(w1 x + b1) + b2`` in one op; the hidden activation stays on chip. With
    ``inplace``, the CPU kernel on packed weights writes the result into x (see ``_Fused``)."""

    _weight_names = ("w1", "b1", "w2", "b2")
    _pack_op = staticmethod(ops.ffn_pack)

    def __init__(self, w1, b1, w2, b2, residual, backend="auto", inplace=False):
        super().__init__(backend)
        self.inplace = bool(inplace)
        self.residual = bool(residual)
        self._set_weights(w1=w1, b1=b1, w2=w2, b2=b2)

    def forward(self, x):
        self._check_device(x)
        packed = self._cpu_packed(x)
        if packed is not None:
            return (ops.ffn_packed_ if self.inplace else ops.ffn_packed)(x, packed, self.residual)
        return self._ops.ffn(x, *self._weights(), self.residual)

    def extra_repr(self):
        return (f"channels={self.w1.shape[1]}, hidden={self.w1.shape[0]}, residual={self.residual}"
                f"{', inplace=True' if self.inplace else ''}, {super().extra_repr()}")


class FusedPointwise(_Fused):
    """A 1x1 convolution, ``y = [relu](weight x + bias)``, on CPU in one op (``pointwise``) on
    packed weights; weight (Co, C). Given ``dw_weight`` (Co, 3, 3) and ``dw_bias``, also the
    depthwise 3x3 stride-2 convolution and ReLU after it, ``relu(dwconv(y) + dw_bias)``, in the
    same op. The op is CPU only: on other devices the module runs the spec."""

    _pack_op = staticmethod(ops.pointwise_pack)

    def __init__(self, weight, bias, relu, dw_weight=None, dw_bias=None, backend="auto"):
        super().__init__(backend)
        self.relu = bool(relu)
        depthwise = {} if dw_weight is None else {"dw_weight": dw_weight, "dw_bias": dw_bias}
        self._weight_names = ("weight", "bias", *depthwise)
        self._set_weights(weight=weight, bias=bias, **depthwise)

    def forward(self, x):
        self._check_device(x)
        packed = self._cpu_packed(x)
        if packed is not None:
            return ops.pointwise_packed(x, packed, self.weight.shape[0], self.relu)
        weight, bias, *depthwise = self._weights()
        if x.device.type == "cpu" and self.backend in ("auto", "cpu"):
            return ops.pointwise(x, weight, bias, self.relu, *depthwise)
        return python_ref.functional.pointwise(x, weight, bias, self.relu, *depthwise)

    def extra_repr(self):
        depthwise = ", dwconv3x3_stride2=True" if len(self._weight_names) > 2 else ""
        return (f"in_channels={self.weight.shape[1]}, out_channels={self.weight.shape[0]}, "
                f"relu={self.relu}{depthwise}, {super().extra_repr()}")


class FusedStemConv(_Fused):
    """The patch embedding's chain of 3x3 stride-2 convolutions (padding 1), each with its ReLU
    (the last only with ``final_relu``), on CPU in one op (``stem_conv``, on packed weights;
    channels-last output). The op is CPU only: on other devices the module runs the spec
    (``conv2d`` and ``relu``)."""

    @staticmethod
    def _pack_op(*tensors):  # weight0, bias0, weight1, ...: the buffers in their order
        return ops.stem_conv_pack(tensors[::2], tensors[1::2])

    def __init__(self, weights, biases, final_relu, backend="auto"):
        super().__init__(backend)
        if not weights or len(weights) != len(biases):
            raise ValueError(f"FusedStemConv takes one or more weights and a bias per weight, got "
                             f"{len(weights)} and {len(biases)}")
        self.final_relu = bool(final_relu)
        self.out_channels = weights[-1].shape[0]
        tensors = {}
        for i, (w, b) in enumerate(zip(weights, biases)):
            tensors[f"weight{i}"], tensors[f"bias{i}"] = w, b
        self._weight_names = tuple(tensors)
        self._set_weights(**tensors)

    def forward(self, x):
        self._check_device(x)
        packed = self._cpu_packed(x)
        if packed is not None:
            return ops.stem_conv_packed(x, packed, self.out_channels, self.final_relu)
        tensors = self._weights()
        args = (x, tensors[::2], tensors[1::2], self.final_relu)
        if x.device.type == "cpu" and self.backend in ("auto", "cpu"):
            return ops.stem_conv(*args)
        return python_ref.functional.stem_conv(*args)

    def extra_repr(self):
        tensors = self._weights()
        channels = [tensors[0].shape[1], *(w.shape[0] for w in tensors[::2])]
        return (f"channels={'->'.join(map(str, channels))}, final_relu={self.final_relu}, "
                f"{super().extra_repr()}")


class ResidualAdd(nn.Module):
    """``x + m(x)`` for a residual branch no fused op covers."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return x + self.m(x)


class InPlacePatchMerging(nn.Module):
    """EfficientViT's PatchMerging, ``conv3(se(relu(conv2(relu(conv1(x))))))`` (1x1 conv,
    depthwise 3x3 stride 2, squeeze-excite, 1x1 conv; batch norm folded), with each ReLU
    applied in place to its convolution's fresh output, and the squeeze-excite (a
    ``LinearSqueezeExcite``) scaling that output in place: three activation-sized allocations
    fewer per call, which on CPU are fresh pages (page faults) or lines no longer in cache. A
    ReLU (``act1``, ``act2``) is an Identity where the convolution before it applies it itself
    (a ``FusedPointwise``; conv2 too is an Identity where conv1's takes it in)."""

    def __init__(self, conv1, conv2, se, conv3):
        super().__init__()
        self.conv1, self.conv2, self.se, self.conv3 = conv1, conv2, se, conv3
        if isinstance(se, LinearSqueezeExcite):
            se.inplace = True  # its input is conv2's output, which nothing else reads
        self.act1 = nn.ReLU(inplace=True)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.conv3(self.se(self.act2(self.conv2(self.act1(self.conv1(x))))))


class LinearSqueezeExcite(nn.Module):
    """Squeeze-excite, ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``, with fc1 and fc2 as Linear
    layers on the (B, C) means: the 1x1 convolutions on a 1x1 map they replace run at a small
    fraction of the matrix rate in oneDNN (M4, batch 16: 0.44 ms for 4.2 M multiply-adds).
    With ``inplace``, the product overwrites x."""

    def __init__(self, fc1, fc2, inplace=False):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.inplace = inplace

    def forward(self, x):
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))[:, :, None, None]
        return x.mul_(gate) if self.inplace else x * gate

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""
