"""Inference modules holding folded weights (as buffers) that call the fused ops."""
import functools

import torch
from torch import nn

import python_ref.functional

from . import auto_backend, ops

__all__ = ["BACKENDS", "FusedCGA", "FusedDWConv", "FusedFFN", "FusedDWConvFFN", "FusedConv1x1",
           "FusedLinear", "FusedPatchEmbed", "FusedPatchMerging", "FusedSqueezeExcite",
           "LinearSqueezeExcite", "ResidualAdd", "backend_ops"]

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")


@functools.lru_cache(maxsize=None)
def backend_ops(backend):
    """The namespace whose ``cga``, ``dwconv``, ``ffn``, ``dwconv_ffn``, ``conv1x1``,
    ``patch_embed`` and ``squeeze_excite`` implement ``backend``.

    "auto", "cpu" and "cuda" call ``torch.ops.efficientvit`` (the dispatcher picks the
    kernel for the tensors' device; a fused module on "auto" given a CUDA tensor runs each
    call on the backend measured fastest for it instead, see ``auto_backend``); "triton" the
    Triton kernels; "reference" the plain-PyTorch spec.
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


# (backend, op) -> _op_call's answer. A dict, not functools.lru_cache: torch.compile warns of
# possible silent errors when it traces a call through an lru_cache.
_OP_CALLS = {}


def _op_call(backend, op):
    """What a fused module of ``backend`` calls for ``op``: where the dispatcher chooses the
    kernel, the op's overload itself, not the ``ops`` wrapper around it. (At batch 1 the
    eager forward spends a tenth of its time in Python, most of it in the frames around each
    op call: this one and the packet's overload resolution are two of them.)"""
    call = _OP_CALLS.get((backend, op))
    if call is None:
        namespace = backend_ops(backend)
        call = (getattr(torch.ops.efficientvit, op).default if namespace is ops
                else getattr(namespace, op))
        _OP_CALLS[backend, op] = call
    return call


class _Fused(nn.Module):
    """Shared plumbing: the backend, a device check for the compiled backends, and the op call.

    On CPU the op packs the module's weights on its first call and reuses the packing while the
    weight buffers are unchanged (see ``ops.clear_packing_cache``, to call after a write through
    ``.data``). The module holds no packing: copies, pickles, ``.to()``, ``torch.compile``,
    ``torch.export`` and ``torch.jit.trace`` see plain buffers and the public op.
    """

    _op = None          # the op's name in torch.ops.efficientvit
    _weight_names = ()  # the buffers the op reads, in its argument order
    # Attribute sets and hook registrations on any fused module, counted: cpu_replay compares the
    # fused modules' attributes and hooks with what it captured only after one (per call it
    # compares their weights, which torch.func.functional_call swaps without a set).
    changes = 0

    def __init__(self, backend):
        super().__init__()
        _op_call(backend, self._op)  # an unknown or unavailable backend fails here
        self.backend = backend

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        _Fused.changes += 1

    # The memory format of the module's 4-D weights (its others are contiguous).
    _weight_format = torch.contiguous_format

    def _set_weights(self, **weights):
        for name, t in weights.items():
            fmt = self._weight_format if t.dim() == 4 else torch.contiguous_format
            self.register_buffer(name, t.detach().clone(memory_format=fmt))

    def _weights(self):
        return tuple(map(self._buffers.__getitem__, self._weight_names))

    def _flags(self):
        """The op's arguments after the weights."""
        return ()

    def forward(self, x):
        if self.backend == "auto" and x.is_cuda:
            return auto_backend.call(self, self._op, x, self._op_args())
        if self.backend in ("cpu", "cuda") and x.device.type != self.backend:
            raise RuntimeError(f"{type(self).__name__} was converted with backend={self.backend!r} "
                               f"but got a tensor on {x.device}")
        return _op_call(self.backend, self._op)(x, *self._op_args())

    def _op_args(self):
        """The op's arguments after x."""
        return (*self._weights(), *self._flags())

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: fail with a way out, not deep inside the compiler
        raise RuntimeError(f"{type(self).__name__}: TorchScript (torch.jit.script) is not "
                           "supported; use torch.export or torch.compile, or torch.jit.trace")

    def extra_repr(self):
        return f"backend={self.backend!r}"


def _counted(register):
    @functools.wraps(register)
    def counted(self, *args, **kwargs):
        _Fused.changes += 1
        return register(self, *args, **kwargs)
    return counted


for _register in ("register_forward_pre_hook", "register_forward_hook", "register_backward_hook",
                  "register_full_backward_pre_hook", "register_full_backward_hook"):
    setattr(_Fused, _register, _counted(getattr(nn.Module, _register)))


class FusedCGA(_Fused):
    """Local-window cascaded group attention, optionally with its residual, in one op."""

    _op = "cga"
    _weight_names = ("qkv_weight", "qkv_bias", "dw_weight", "dw_bias", "attention_bias",
                     "proj_weight", "proj_bias")

    def __init__(self, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight,
                 proj_bias, window_size, scale, residual, backend="auto"):
        super().__init__(backend)
        self.window_size = int(window_size)
        self.scale = float(scale)
        self.residual = bool(residual)
        self._set_weights(qkv_weight=qkv_weight, qkv_bias=qkv_bias, dw_weight=dw_weight,
                          dw_bias=dw_bias, attention_bias=attention_bias, proj_weight=proj_weight,
                          proj_bias=proj_bias)

    def _flags(self):
        return self.window_size, self.scale, self.residual

    def extra_repr(self):
        heads, kd, K = self.dw_weight.shape[:3]
        return (f"channels={self.proj_weight.shape[0]}, heads={heads}, key_dim={kd}, kernel={K}, "
                f"window_size={self.window_size}, residual={self.residual}, "
                f"{super().extra_repr()}")
class FusedDWConv(_Fused):
    """``[x +] [relu](dwconv_KxK(x) + bias)`` in one op."""

    _op = "dwconv"
    _weight_names = ("weight", "bias")

    def __init__(self, weight, bias, relu, residual, backend="auto"):
        super().__init__(backend)
        self.relu = bool(relu)
        self.residual = bool(residual)
        self._set_weights(weight=weight, bias=bias)

    def _flags(self):
        return self.relu, self.residual

    def extra_repr(self):
        return (f"channels={self.weight.shape[0]}, kernel={self.weight.shape[-1]}, relu={self.relu}, "
                f"residual={self.residual}, {super().extra_repr()}")


class FusedFFN(_Fused):
    """``[x +] w2 relu(w1 x + b1) + b2`` in one op; the hidden activation stays on chip."""

    _op = "ffn"
    _weight_names = ("w1", "b1", "w2", "b2")

    def __init__(self, w1, b1, w2, b2, residual, backend="auto"):
        super().__init__(backend)
        self.residual = bool(residual)
        self._set_weights(w1=w1, b1=b1, w2=w2, b2=b2)

    def _flags(self):
        return (self.residual,)

    def extra_repr(self):
        return (f"channels={self.w1.shape[1]}, hidden={self.w1.shape[0]}, residual={self.residual}, "
                f"{super().extra_repr()}")


class FusedDWConvFFN(_Fused):
    """An EfficientViT block's residual depthwise convolution and the residual FFN after it,
    ``y + ffn(y)`` with ``y = x + dwconv(x)``, in one op (``dwconv_ffn``): one Triton kernel in
    fp16 and bf16, where no tensor of y is written and read back."""

    _op = "dwconv_ffn"
    _weight_names = ("dw_weight", "dw_bias", "w1", "b1", "w2", "b2")

    def __init__(self, dw_weight, dw_bias, w1, b1, w2, b2, backend="auto"):
        super().__init__(backend)
        self._set_weights(dw_weight=dw_weight, dw_bias=dw_bias, w1=w1, b1=b1, w2=w2, b2=b2)

    def extra_repr(self):
        return (f"channels={self.w1.shape[1]}, kernel={self.dw_weight.shape[-1]}, "
                f"hidden={self.w1.shape[0]}, {super().extra_repr()}")


class FusedConv1x1(_Fused):
    """A 1x1 convolution, ``y = [relu](weight x + bias)``, in one op (``conv1x1``); weight
    (Co, C). Given ``dw_weight`` (Co, 3, 3) and ``dw_bias``, also the depthwise 3x3 stride-2
    convolution and ReLU after it, ``relu(dwconv(y) + dw_bias)``, in the same op."""

    _op = "conv1x1"

    def __init__(self, weight, bias, relu, dw_weight=None, dw_bias=None, backend="auto"):
        super().__init__(backend)
        self.relu = bool(relu)
        depthwise = {} if dw_weight is None else {"dw_weight": dw_weight, "dw_bias": dw_bias}
        self._weight_names = ("weight", "bias", *depthwise)
        self._set_weights(weight=weight, bias=bias, **depthwise)

    def _op_args(self):
        weight, bias, *depthwise = self._weights()
        return weight, bias, self.relu, *depthwise

    def extra_repr(self):
        depthwise = ", dwconv3x3_stride2=True" if len(self._weight_names) > 2 else ""
        return (f"in_channels={self.weight.shape[1]}, out_channels={self.weight.shape[0]}, "
                f"relu={self.relu}{depthwise}, {super().extra_repr()}")


class FusedLinear(FusedConv1x1):
    """A Linear layer, ``y = weight x + bias`` over x's last dimension. On CPU, ``conv1x1`` on a
    1x1 map: the classifier's (1000, C) weight comes from memory at every batch-1 forward, which
    conv1x1's packed GEMM prefetches and torch's linear does not (2-3% off M0's and 1-2% off
    M5's batch-1 forward). Elsewhere torch's linear (on a GPU, a cuBLAS GEMM)."""

    def __init__(self, weight, bias, backend="auto"):
        super().__init__(weight, bias, relu=False, backend=backend)

    def forward(self, x):
        if x.device.type != "cpu":
            return nn.functional.linear(x, self.weight, self.bias)
        y = super().forward(x.reshape(-1, x.shape[-1], 1, 1))
        return y.reshape(*x.shape[:-1], y.shape[1])

    def extra_repr(self):
        return (f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, "
                f"backend={self.backend!r}")


class FusedPatchEmbed(_Fused):
    """The patch embedding's chain of 3x3 stride-2 convolutions (padding 1), each with its ReLU
    (the last only with ``final_relu``), in one op (``patch_embed``; channels-last output)."""

    _op = "patch_embed"
    # each tap's input channels adjacent: the Triton kernel loads them as vectors
    _weight_format = torch.channels_last

    def __init__(self, weights, biases, final_relu, backend="auto"):
        super().__init__(backend)
        if not weights or len(weights) != len(biases):
            raise ValueError(f"FusedPatchEmbed takes one or more weights and a bias per weight, "
                             f"got {len(weights)} and {len(biases)}")
        self.final_relu = bool(final_relu)
        tensors = {}
        for i, (w, b) in enumerate(zip(weights, biases)):
            tensors[f"weight{i}"], tensors[f"bias{i}"] = w, b
        self._weight_names = tuple(tensors)
        self._set_weights(**tensors)

    def _op_args(self):
        tensors = self._weights()  # weight0, bias0, weight1, ...
        return list(tensors[::2]), list(tensors[1::2]), self.final_relu

    def extra_repr(self):
        tensors = self._weights()
        channels = [tensors[0].shape[1], *(w.shape[0] for w in tensors[::2])]
        return (f"channels={'->'.join(map(str, channels))}, final_relu={self.final_relu}, "
                f"{super().extra_repr()}")


class FusedSqueezeExcite(_Fused):
    """Squeeze-excite, ``x * sigmoid(w2 relu(w1 mean_hw(x) + b1) + b2)``, in one op
    (``squeeze_excite``); w1 (R, C), w2 (C, R)."""

    _op = "squeeze_excite"
    _weight_names = ("w1", "b1", "w2", "b2")

    def __init__(self, w1, b1, w2, b2, backend="auto"):
        super().__init__(backend)
        self._set_weights(w1=w1, b1=b1, w2=w2, b2=b2)

    def extra_repr(self):
        return (f"channels={self.w1.shape[1]}, reduced={self.w1.shape[0]}, "
                f"{super().extra_repr()}")


class ResidualAdd(nn.Module):
    """``x + m(x)`` for a residual branch no fused op covers."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return x + self.m(x)


class FusedPatchMerging(nn.Module):
    """EfficientViT's PatchMerging, ``conv3(se(relu(conv2(relu(conv1(x))))))`` (1x1 conv,
    depthwise 3x3 stride 2, squeeze-excite, 1x1 conv; batch norm folded), in a module whose
    forward the converter owns, so that its passes may rewrite the parts. A part is None where
    another applies it: a ReLU (``act1``, ``act2``) where the convolution before it does (a
    ``FusedConv1x1``), conv2 where conv1's takes it in. (Not an Identity: a module call costs
    a few microseconds at batch 1.)"""

    _PARTS = ("conv1", "act1", "conv2", "act2", "se", "conv3")  # in the order they apply

    def __init__(self, conv1, conv2, se, conv3):
        super().__init__()
        self.conv1, self.act1, self.conv2 = conv1, nn.ReLU(), conv2
        self.act2, self.se, self.conv3 = nn.ReLU(), se, conv3

    def forward(self, x):
        for name in self._PARTS:
            part = self._modules[name]
            if part is not None:
                x = part(x)
        return x


class LinearSqueezeExcite(nn.Module):
    """Squeeze-excite, ``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))``, with fc1 and fc2 as Linear
    layers on the (B, C) means: the 1x1 convolutions on a 1x1 map they replace run at a small
    fraction of the matrix rate in oneDNN (M4, batch 16: 0.44 ms for 4.2 M multiply-adds)."""

    def __init__(self, fc1, fc2):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))[:, :, None, None]
