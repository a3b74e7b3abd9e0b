"""Python face of the fused ops: ``torch.ops.efficientvit.{cga, dwconv, ffn, pointwise,
stem_conv}``.

The schemas live in ``csrc/efficientvit.cpp``; the compiled library registers the CPU
(and, where built, CUDA) kernels. This module documents each op, checks arguments the
way the C++ side does (for the fake implementation, so ``torch.compile`` and
``torch.export`` reject bad input at trace time, and for the Triton and reference
backends), and registers the fake implementations. The ops are inference-only: they
have no autograd formula.

On CPU, ``cga``, ``ffn``, ``pointwise`` and ``stem_conv`` also come in two halves, so that the
weights are packed once rather than on every call: ``X_pack`` returns the parameters in the
layout the CPU kernel reads, ``X_packed`` computes the op from them (``cga_packed_`` and
``ffn_packed_``: into x itself). ``FusedCGA``, ``FusedFFN``, ``FusedPointwise`` and
``FusedStemConv`` use them. ``pointwise`` (PatchMerging's convolutions) and ``stem_conv`` (the
patch embedding's convolutions) are CPU only.
"""
import torch

from . import _C  # noqa: F401  (loads the op library and its compiled kernels)

__all__ = ["cga", "dwconv", "ffn", "pointwise", "stem_conv", "cga_pack", "cga_packed", "cga_packed_",
           "ffn_pack", "ffn_packed", "ffn_packed_", "pointwise_pack", "pointwise_packed",
           "stem_conv_pack", "stem_conv_packed",
           "check_cga", "check_dwconv", "check_ffn", "check_pointwise", "check_stem_conv",
           "has_compiled_kernels"]


def has_compiled_kernels(device_type):
    """True when the compiled library has kernels for ``device_type`` ("cpu" or "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("efficientvit::cga", key)


def _fail(message):
    raise ValueError(f"efficientvit: {message}")


def _check_input(x):
    if x.dim() != 4:
        _fail(f"x must be 4-D (B, C, H, W), got {x.dim()}-D")
    if not x.dtype.is_floating_point:
        _fail(f"x must be a floating-point tensor, got {x.dtype}")


def _check_params(x, **params):
    for name, t in params.items():
        if t.device != x.device:
            _fail(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            _fail(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}")


def _check_shape(t, expected, name):
    if tuple(t.shape) != tuple(expected):
        _fail(f"{name} must have shape {list(expected)}, got {list(t.shape)}")


def check_cga(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight,
              proj_bias, window_size):
    """Checks cga arguments; returns (heads, key_dim, value_dim, kernel)."""
    _check_input(x)
    C = x.shape[1]
    if qkv_weight.dim() != 3:
        _fail(f"qkv_weight must be 3-D (heads, 2*kd+d, d), got {list(qkv_weight.shape)}")
    if dw_weight.dim() != 4:
        _fail(f"dw_weight must be 4-D (heads, kd, K, K), got {list(dw_weight.shape)}")
    heads = qkv_weight.shape[0]
    if heads <= 0 or C % heads != 0:
        _fail(f"{heads} heads do not divide the {C} channels of x")
    d, kd, K = C // heads, dw_weight.shape[1], dw_weight.shape[3]
    if window_size <= 0:
        _fail(f"window_size must be positive, got {window_size}")
    if K % 2 != 1:
        _fail(f"the query kernel size must be odd, got {K}")
    _check_shape(qkv_weight, (heads, 2 * kd + d, d), "qkv_weight")
    _check_shape(qkv_bias, (heads, 2 * kd + d), "qkv_bias")
    _check_shape(dw_weight, (heads, kd, K, K), "dw_weight")
    _check_shape(dw_bias, (heads, kd), "dw_bias")
    if tuple(attention_bias.shape) != (heads, window_size, window_size):
        _fail(f"attention_bias must have shape (heads, window_size, window_size) = "
              f"{[heads, window_size, window_size]}, got {list(attention_bias.shape)}")
    _check_shape(proj_weight, (C, C), "proj_weight")
    _check_shape(proj_bias, (C,), "proj_bias")
    _check_params(x, qkv_weight=qkv_weight, qkv_bias=qkv_bias, dw_weight=dw_weight,
                  dw_bias=dw_bias, attention_bias=attention_bias, proj_weight=proj_weight,
                  proj_bias=proj_bias)
    return heads, kd, d, K


def check_dwconv(x, weight, bias):
    """Checks dwconv arguments; returns the kernel size."""
    _check_input(x)
    if weight.dim() != 3:
        _fail(f"dwconv weight must be 3-D (C, K, K), got {list(weight.shape)}")
    K = weight.shape[1]
    if K % 2 != 1:
        _fail(f"the dwconv kernel size must be odd, got {K}")
    _check_shape(weight, (x.shape[1], K, K), "weight")
    _check_shape(bias, (x.shape[1],), "bias")
    _check_params(x, weight=weight, bias=bias)
    return K


def check_ffn(x, w1, b1, w2, b2):
    """Checks ffn arguments; returns the hidden width."""
    _check_input(x)
    if w1.dim() != 2:
        _fail(f"w1 must be 2-D (hidden, C), got {list(w1.shape)}")
    C, M = x.shape[1], w1.shape[0]
    _check_shape(w1, (M, C), "w1")
    _check_shape(b1, (M,), "b1")
    _check_shape(w2, (C, M), "w2")
    _check_shape(b2, (C,), "b2")
    _check_params(x, w1=w1, b1=b1, w2=w2, b2=b2)
    return M


def check_stem_conv(x, weights, biases):
    """Checks stem_conv arguments; returns the output's shape."""
    _check_input(x)
    if len(weights) == 0:
        _fail("stem_conv needs at least one convolution")
    if len(weights) != len(biases):
        _fail(f"stem_conv takes a bias per weight, got {len(weights)} weights and {len(biases)} biases")
    B, C, H, W = x.shape
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        if weight.dim() != 4:
            _fail(f"stem_conv weights[{i}] must be 4-D (Co, Ci, 3, 3), got {list(weight.shape)}")
        _check_shape(weight, (weight.shape[0], C, 3, 3), f"weights[{i}]")
        _check_shape(bias, (weight.shape[0],), f"biases[{i}]")
        _check_params(x, **{f"weights[{i}]": weight, f"biases[{i}]": bias})
        C, H, W = weight.shape[0], (H + 1) // 2, (W + 1) // 2
    return B, C, H, W


def check_pointwise(x, weight, bias, dw_weight=None, dw_bias=None):
    """Checks pointwise arguments; returns the output's shape."""
    _check_input(x)
    if weight.dim() != 2:
        _fail(f"pointwise weight must be 2-D (Co, C), got {list(weight.shape)}")
    Co = weight.shape[0]
    _check_shape(weight, (Co, x.shape[1]), "weight")
    _check_shape(bias, (Co,), "bias")
    _check_params(x, weight=weight, bias=bias)
    if (dw_weight is None) != (dw_bias is None):
        _fail("pointwise takes dw_weight and dw_bias together, or neither")
    B, _, H, W = x.shape
    if dw_weight is None:
        return B, Co, H, W
    _check_shape(dw_weight, (Co, 3, 3), "dw_weight")
    _check_shape(dw_bias, (Co,), "dw_bias")
    _check_params(x, dw_weight=dw_weight, dw_bias=dw_bias)
    return B, Co, (H + 1) // 2, (W + 1) // 2


def cga(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight, proj_bias,
        window_size, scale, residual=True):
    """Local-window cascaded group attention, fused (docs/design.md), on folded parameters.

    Args:
        x: (B, C, H, W), contiguous or channels-last; fp32 on CPU.
        qkv_weight: (h, 2*kd + d, d), per-head 1x1 conv with BN folded; d = C / h.
        qkv_bias: (h, 2*kd + d).
        dw_weight: (h, kd, K, K), depthwise conv on q (K odd); a head with a smaller kernel
            holds it zero-padded around the centre.
        dw_bias: (h, kd).
        attention_bias: (h, ws, ws): the learned bias for token offset (|dy|, |dx|).
        proj_weight: (C, C), output 1x1 conv (input channels in head order), BN folded.
        proj_bias: (C,).
        window_size: ws. A map of exactly ws x ws is one window; any other size is
            zero-padded at the bottom/right to whole windows, whose padded tokens take part
            in attention, and cropped after.
        scale: multiplies q.k (kd ** -0.5 in EfficientViT).
        residual: add x to the result.

    Returns:
        (B, C, H, W) in x's memory format.
    """
    return torch.ops.efficientvit.cga(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias,
                                      proj_weight, proj_bias, window_size, scale, residual)


def dwconv(x, weight, bias, relu=False, residual=True):
    """Depthwise KxK conv, zero padding K//2, stride 1: ``[x +] [relu](dwconv(x) + bias)``.

    x (B, C, H, W), weight (C, K, K) with K odd, bias (C,). Returns x's shape and layout.
    """
    return torch.ops.efficientvit.dwconv(x, weight, bias, relu, residual)


def ffn(x, w1, b1, w2, b2, residual=True):
    """Pointwise MLP at every pixel: ``[x +] w2 relu(w1 x + b1) + b2``.

    x (B, C, H, W), w1 (M, C), b1 (M,), w2 (C, M), b2 (C,). The hidden (M-channel)
    activation is never written to memory. Returns x's shape and layout.
    """
    return torch.ops.efficientvit.ffn(x, w1, b1, w2, b2, residual)


def stem_conv(x, weights, biases, final_relu=False):
    """CPU: the patch embedding, a chain of 3x3 stride-2 convolutions (zero padding 1), each
    ``x = relu(conv(x, weights[l]) + biases[l])`` but the last, which has its ReLU only when
    ``final_relu``.

    x (B, Ci, H, W) in any layout (read as contiguous NCHW: an image); weights[l]
    (C_l, C_{l-1}, 3, 3) with C_{-1} = Ci, biases[l] (C_l,). Returns the last convolution's
    output, (B, C_last, H', W') with each convolution halving H and W (rounding up),
    channels-last. The first convolution is made for a few input channels (Ci = 3), where it is
    several times faster than oneDNN's; the others are implicit GEMMs on rows of the one before,
    computed a few rows at a time in cache: no output but the last reaches memory.
    """
    return torch.ops.efficientvit.stem_conv(x, list(weights), list(biases), final_relu)


def pointwise(x, weight, bias, relu=False, dw_weight=None, dw_bias=None):
    """CPU: a 1x1 convolution, ``y = [relu](weight x + bias)``; x (B, C, H, W), weight (Co, C),
    bias (Co,). Returns y (B, Co, H, W) in x's layout (channels-last or contiguous). One GEMM per
    tile of tokens, on weights packed panel-major; PatchMerging's convolutions use it.

    Given dw_weight (Co, 3, 3) and dw_bias (Co,), returns ``relu(dwconv3x3(y) + dw_bias)``
    instead (depthwise, stride 2, zero padding 1; (B, Co, ceil(H/2), ceil(W/2)) in x's layout):
    PatchMerging's first convolution, ReLU, depthwise convolution and ReLU, with y computed a
    band of rows at a time in cache, never written to memory.
    """
    return torch.ops.efficientvit.pointwise(x, weight, bias, relu, dw_weight, dw_bias)


def cga_pack(qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight, proj_bias,
             window_size, scale):
    """CPU: ``cga``'s parameters (as documented there) packed for its CPU kernel.

    Returns a list of tensors in a layout private to the build (transposed, padded to the
    vector width, the scale folded into the query conv, the bias table expanded to every
    key-query pair): pass it to ``cga_packed`` on the same machine, for inputs of the
    weights' dtype. Weights changed afterwards must be packed again.
    """
    return torch.ops.efficientvit.cga_pack(qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias,
                                           proj_weight, proj_bias, window_size, scale)


def cga_packed(x, packed, key_dim, window_size, residual=True):
    """CPU: ``cga`` on weights packed by ``cga_pack``; the same result for the same x.

    ``key_dim`` is kd (dw_weight.shape[1]). The packed tensors are checked against x
    (count, shapes, dtype, device) before use.
    """
    return torch.ops.efficientvit.cga_packed(x, packed, key_dim, window_size, residual)


def cga_packed_(x, packed, key_dim, window_size, residual=True):
    """CPU: ``cga_packed`` written into x itself; returns x. Any x the out-of-place op takes
    (one that is not dense is computed out of place and copied back)."""
    torch.ops.efficientvit.cga_packed_(x, packed, key_dim, window_size, residual)
    return x


def ffn_pack(w1, b1, w2, b2):
    """CPU: ``ffn``'s parameters packed for its CPU kernel (see ``cga_pack``)."""
    return torch.ops.efficientvit.ffn_pack(w1, b1, w2, b2)


def ffn_packed(x, packed, residual=True):
    """CPU: ``ffn`` on weights packed by ``ffn_pack``; the same result for the same x."""
    return torch.ops.efficientvit.ffn_packed(x, packed, residual)


def ffn_packed_(x, packed, residual=True):
    """CPU: ``ffn_packed`` written into x itself; returns x (see ``cga_packed_``; in place
    without a copy where x is channels-last with a whole number of vectors of channels)."""
    torch.ops.efficientvit.ffn_packed_(x, packed, residual)
    return x


def pointwise_pack(weight, bias, dw_weight=None, dw_bias=None):
    """CPU: ``pointwise``'s parameters packed for its CPU kernel (see ``cga_pack``)."""
    return torch.ops.efficientvit.pointwise_pack(weight, bias, dw_weight, dw_bias)


def pointwise_packed(x, packed, out_channels, relu=False):
    """CPU: ``pointwise`` on weights packed by ``pointwise_pack`` (``out_channels``: the
    weight's Co); the same result for the same x, with the depthwise convolution where it was
    packed with one."""
    return torch.ops.efficientvit.pointwise_packed(x, packed, out_channels, relu)


def stem_conv_pack(weights, biases):
    """CPU: ``stem_conv``'s parameters packed for its CPU kernel (see ``cga_pack``)."""
    if len(weights) == 0:  # the dispatcher finds no device to call with no tensor at all
        _fail("stem_conv needs at least one convolution")
    return torch.ops.efficientvit.stem_conv_pack(list(weights), list(biases))


def stem_conv_packed(x, packed, out_channels, final_relu=False):
    """CPU: ``stem_conv`` on weights packed by ``stem_conv_pack`` (``out_channels``: the last
    weight's Co); the same result for the same x."""
    return torch.ops.efficientvit.stem_conv_packed(x, packed, out_channels, final_relu)


@torch.library.register_fake("efficientvit::cga")
def _cga_fake(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight,
              proj_bias, window_size, scale, residual):
    check_cga(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight,
              proj_bias, window_size)
    return torch.empty_like(x)


@torch.library.register_fake("efficientvit::dwconv")
def _dwconv_fake(x, weight, bias, relu, residual):
    check_dwconv(x, weight, bias)
    return torch.empty_like(x)


@torch.library.register_fake("efficientvit::ffn")
def _ffn_fake(x, w1, b1, w2, b2, residual):
    check_ffn(x, w1, b1, w2, b2)
    return torch.empty_like(x)


def _layout_of(x):
    """The memory format of the kernels' output for x: x's own where x is dense, else the one its
    strides suggest (as torch.empty_like picks it)."""
    like = torch.empty_like(x)
    channels_last = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


@torch.library.register_fake("efficientvit::pointwise")
def _pointwise_fake(x, weight, bias, relu, dw_weight=None, dw_bias=None):
    shape = check_pointwise(x, weight, bias, dw_weight, dw_bias)
    return x.new_empty(shape).contiguous(memory_format=_layout_of(x))


@torch.library.register_fake("efficientvit::stem_conv")
def _stem_conv_fake(x, weights, biases, final_relu):
    shape = check_stem_conv(x, weights, biases)
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last)


# The packed variants: the output is shaped like x; the packed tensors are checked by the kernel.
# (The pack ops have no fake: their shapes depend on the build's vector width, and they run once,
# eagerly, at conversion.)
@torch.library.register_fake("efficientvit::cga_packed")
def _cga_packed_fake(x, packed, key_dim, window_size, residual):
    _check_input(x)
    return torch.empty_like(x)


@torch.library.register_fake("efficientvit::ffn_packed")
def _ffn_packed_fake(x, packed, residual):
    _check_input(x)
    return torch.empty_like(x)


@torch.library.register_fake("efficientvit::cga_packed_")
def _cga_packed_inplace_fake(x, packed, key_dim, window_size, residual):
    _check_input(x)


@torch.library.register_fake("efficientvit::ffn_packed_")
def _ffn_packed_inplace_fake(x, packed, residual):
    _check_input(x)


@torch.library.register_fake("efficientvit::pointwise_packed")
def _pointwise_packed_fake(x, packed, out_channels, relu):
    _check_input(x)
    B, _, H, W = x.shape
    if len(packed) == 4:  # packed with the depthwise convolution, stride 2
        H, W = (H + 1) // 2, (W + 1) // 2
    return x.new_empty((B, out_channels, H, W)).contiguous(memory_format=_layout_of(x))


@torch.library.register_fake("efficientvit::stem_conv_packed")
def _stem_conv_packed_fake(x, packed, out_channels, final_relu):
    _check_input(x)
    B, _, H, W = x.shape
    for _ in range(len(packed) // 2):  # each convolution halves H and W, rounding up
        H, W = (H + 1) // 2, (W + 1) // 2
    return x.new_empty((B, out_channels, H, W)).contiguous(memory_format=torch.channels_last)
