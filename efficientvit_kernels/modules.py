"""Inference modules holding folded weights (as buffers) that call the fused ops."""
import torch
from torch import nn

import python_ref.functional

from . import ops

__all__ = ["BACKENDS", "FusedCGA", "FusedDWConv", "FusedFFN", "ResidualAdd", "backend_ops"]

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


class _Fused(nn.Module):
    """Shared plumbing: the backend, and a device check for the compiled backends."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self._ops = backend_ops(backend)

    def _check_device(self, x):
        if self.backend in ("cpu", "cuda") and x.device.type != self.backend:
            raise RuntimeError(f"{type(self).__name__} was converted with backend={self.backend!r} "
                               f"but got a tensor on {x.device}")

    def extra_repr(self):
        return f"backend={self.backend!r}"


class FusedCGA(_Fused):
    """Local-window cascaded group attention, optionally with its residual, in one op."""

    def __init__(self, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight,
                 proj_bias, window_size, scale, residual, backend="auto"):
        super().__init__(backend)
        for name, t in dict(qkv_weight=qkv_weight, qkv_bias=qkv_bias, dw_weight=dw_weight,
                            dw_bias=dw_bias, attention_bias=attention_bias,
                            proj_weight=proj_weight, proj_bias=proj_bias).items():
            self.register_buffer(name, t.detach().clone().contiguous())
        self.window_size = int(window_size)
        self.scale = float(scale)
        self.residual = bool(residual)

    def forward(self, x):
        self._check_device(x)
        return self._ops.cga(x, self.qkv_weight, self.qkv_bias, self.dw_weight, self.dw_bias,
                             self.attention_bias, self.proj_weight, self.proj_bias,
                             self.window_size, self.scale, self.residual)

    def extra_repr(self):
        heads, kd, K = self.dw_weight.shape[:3]
        return (f"channels={self.proj_weight.shape[0]}, heads={heads}, key_dim={kd}, kernel={K}, "
                f"window_size={self.window_size}, residual={self.residual}, {super().extra_repr()}")


class FusedDWConv(_Fused):
    """``[x +] [relu](dwconv_KxK(x) + bias)`` in one op."""

    def __init__(self, weight, bias, relu, residual, backend="auto"):
        super().__init__(backend)
        self.register_buffer("weight", weight.detach().clone().contiguous())
        self.register_buffer("bias", bias.detach().clone().contiguous())
        self.relu = bool(relu)
        self.residual = bool(residual)

    def forward(self, x):
        self._check_device(x)
        return self._ops.dwconv(x, self.weight, self.bias, self.relu, self.residual)

    def extra_repr(self):
        return (f"channels={self.weight.shape[0]}, kernel={self.weight.shape[-1]}, relu={self.relu}, "
                f"residual={self.residual}, {super().extra_repr()}")


class FusedFFN(_Fused):
    """``[x +] w2 relu(w1 x + b1) + b2`` in one op; the hidden activation stays on chip."""

    def __init__(self, w1, b1, w2, b2, residual, backend="auto"):
        super().__init__(backend)
        for name, t in dict(w1=w1, b1=b1, w2=w2, b2=b2).items():
            self.register_buffer(name, t.detach().clone().contiguous())
        self.residual = bool(residual)

    def forward(self, x):
        self._check_device(x)
        return self._ops.ffn(x, self.w1, self.b1, self.w2, self.b2, self.residual)

    def extra_repr(self):
        return (f"channels={self.w1.shape[1]}, hidden={self.w1.shape[0]}, residual={self.residual}, "
                f"{super().extra_repr()}")


class ResidualAdd(nn.Module):
    """``x + m(x)`` for a residual branch no fused op covers."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return x + self.m(x)
