"""Python face of the fused ops: ``torch.ops.efficientvit.{cga, dwconv, ffn, dwconv_ffn,
patch_embed, conv1x1, squeeze_excite}``.

The schemas live in ``csrc/efficientvit.cpp``; the compiled library registers the CPU
(and, where built, CUDA) kernels. This module documents each op, holds the ops' contract for
Python (argument checks with the messages of ``csrc/checks.h``, and the output layout rule,
``output_memory_format``), and registers the fake implementations, so ``torch.compile`` and
``torch.export`` reject bad input at trace time and see the strides the kernels return. The
Triton kernels use the same checks and layout rule.

The ops are for inference: they have no backward formula, and a call with grad mode on and
an input that requires grad fails (convert a model with ``backend="reference"`` to train).
"""
import torch

import python_ref.functional

from . import _C  # noqa: F401  (loads the op library and its compiled kernels)

__all__ = ["cga", "dwconv", "ffn", "dwconv_ffn", "patch_embed", "conv1x1", "squeeze_excite",
           "check_cga", "check_dwconv", "check_ffn", "check_dwconv_ffn", "check_patch_embed",
           "check_conv1x1",
           "output_memory_format", "empty_output", "has_compiled_kernels"]


def cpu_isa():
    """The instruction-set level the CPU kernels run at: "baseline" (SSE2), "avx2" (x86-64-v3:
    AVX2, FMA) or "avx512" (x86-64-v4), the best this CPU has among those built, unless the
    environment variable EFFICIENTVIT_CPU_ISA named a lower one when the library loaded;
    "native" in a build for the build machine only (EFFICIENTVIT_NATIVE=1).
    Raises ValueError where that variable names a level this CPU or build lacks."""
    return torch.ops.efficientvit_cpu.isa()


def built_isas():
    """The instruction-set levels the CPU kernels were compiled for: ["baseline", "avx2",
    "avx512"] (x86-64), ["baseline"], or ["native"] (built with EFFICIENTVIT_NATIVE=1 for the
    build machine's CPU only)."""
    return list(torch.ops.efficientvit_cpu.built_isas())


def clear_packing_cache():
    """Drops the CPU kernels' packed weights. An op called with plain weights on CPU packs them
    on its first call and reuses the packing while each weight keeps its storage, sizes, strides
    and version counter; a change through ``.data`` bumps no version counter: call this after
    one. (The fused modules call the ops: the same holds for their weight buffers, and for a
    converted model's replay, ``cpu_replay``, whose programs pack again after this.)"""
    torch.ops.efficientvit_cpu.clear_packing_cache()


cpu_isa()  # an EFFICIENTVIT_CPU_ISA the library could not honour fails the import, not later


def has_compiled_kernels(device_type):
    """True when the compiled library has kernels for ``device_type`` ("cpu" or "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("efficientvit::cga", key)


def _fail(message):
    raise ValueError(f"efficientvit: {message}")


def output_memory_format(x):
    """The memory format of each op's output (``patch_embed``'s excepted: always channels-last):
    channels-last where x is channels-last and not also contiguous (C == 1 or H == W == 1 make
    it both), else contiguous. ``csrc/checks.h`` holds the same rule for the C++ kernels."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_output(x, shape=None, memory_format=None):
    """An uninitialized output for x: ``shape`` (default x's), on x's device and dtype, in
    ``memory_format`` (default ``output_memory_format(x)``)."""
    return torch.empty(x.shape if shape is None else shape, dtype=x.dtype, device=x.device,
                       memory_format=memory_format or output_memory_format(x))


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
    if kd <= 0:
        _fail(f"the key dim (dw_weight.shape[1]) must be positive, got {kd}")
    if K % 2 != 1:
        _fail(f"the query kernel size must be odd, got {K}")
    _check_shape(qkv_weight, (heads, 2 * kd + d, d), "qkv_weight")
    _check_shape(qkv_bias, (heads, 2 * kd + d), "qkv_bias")
    _check_shape(dw_weight, (heads, kd, K, K), "dw_weight")
    _check_shape(dw_bias, (heads, kd), "dw_bias")
    if tuple(attention_bias.shape) != (heads, window_size, window_size):
        _fail(f"attention_bias must have shape (heads, window_size, window_size) = "
              f"({heads}, {window_size}, {window_size}), got {list(attention_bias.shape)}")
    _check_shape(proj_weight, (C, C), "proj_weight")
    _check_shape(proj_bias, (C,), "proj_bias")
    _check_params(x, qkv_weight=qkv_weight, qkv_bias=qkv_bias, dw_weight=dw_weight,
                  dw_bias=dw_bias, attention_bias=attention_bias, proj_weight=proj_weight,
                  proj_bias=proj_bias)
    return heads, kd, d, K


def check_dwconv(x, weight, bias, names=("weight", "bias")):
    """Checks dwconv arguments (``names``: the weight's and bias's, in messages); returns the
    kernel size."""
    _check_input(x)
    if weight.dim() != 3:
        _fail(f"dwconv {names[0]} must be 3-D (C, K, K), got {list(weight.shape)}")
    K = weight.shape[1]
    if K % 2 != 1:
        _fail(f"the dwconv kernel size must be odd, got {K}")
    _check_shape(weight, (x.shape[1], K, K), names[0])
    _check_shape(bias, (x.shape[1],), names[1])
    _check_params(x, **dict(zip(names, (weight, bias))))
    return K


def check_ffn(x, w1, b1, w2, b2):
    """Checks ffn arguments (and squeeze_excite's: the same two layers); returns the hidden
    width."""
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


def check_dwconv_ffn(x, dw_weight, dw_bias, w1, b1, w2, b2):
    """Checks dwconv_ffn arguments; returns (the dwconv kernel size, the hidden width)."""
    return (check_dwconv(x, dw_weight, dw_bias, ("dw_weight", "dw_bias")),
            check_ffn(x, w1, b1, w2, b2))


def check_patch_embed(x, weights, biases):
    """Checks patch_embed arguments; returns the output's shape."""
    _check_input(x)
    if len(weights) == 0:
        _fail("patch_embed needs at least one convolution")
    if len(weights) != len(biases):
        _fail(f"patch_embed takes a bias per weight, got {len(weights)} weights and {len(biases)} biases")
    B, C, H, W = x.shape
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        if weight.dim() != 4:
            _fail(f"patch_embed weights[{i}] must be 4-D (Co, Ci, 3, 3), got {list(weight.shape)}")
        _check_shape(weight, (weight.shape[0], C, 3, 3), f"weights[{i}]")
        _check_shape(bias, (weight.shape[0],), f"biases[{i}]")
        _check_params(x, **{f"weights[{i}]": weight, f"biases[{i}]": bias})
        C, H, W = weight.shape[0], (H + 1) // 2, (W + 1) // 2
    return B, C, H, W


def check_conv1x1(x, weight, bias, dw_weight=None, dw_bias=None):
    """Checks conv1x1 arguments; returns the output's shape."""
    _check_input(x)
    if weight.dim() != 2:
        _fail(f"conv1x1 weight must be 2-D (Co, C), got {list(weight.shape)}")
    Co = weight.shape[0]
    _check_shape(weight, (Co, x.shape[1]), "weight")
    _check_shape(bias, (Co,), "bias")
    _check_params(x, weight=weight, bias=bias)
    if (dw_weight is None) != (dw_bias is None):
        _fail("conv1x1 takes dw_weight and dw_bias together, or neither")
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
        (B, C, H, W), in ``output_memory_format(x)``.
    """
    return torch.ops.efficientvit.cga(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias,
                                      proj_weight, proj_bias, window_size, scale, residual)


def dwconv(x, weight, bias, relu=False, residual=True):
    """Depthwise KxK conv, zero padding K//2, stride 1: ``[x +] [relu](dwconv(x) + bias)``.

    x (B, C, H, W), weight (C, K, K) with K odd, bias (C,). Returns x's shape, in
    ``output_memory_format(x)``.
    """
    return torch.ops.efficientvit.dwconv(x, weight, bias, relu, residual)


def ffn(x, w1, b1, w2, b2, residual=True):
    """Pointwise MLP at every pixel: ``[x +] w2 relu(w1 x + b1) + b2``.

    x (B, C, H, W), w1 (M, C), b1 (M,), w2 (C, M), b2 (C,). The hidden (M-channel)
    activation is never written to memory. Returns x's shape, in ``output_memory_format(x)``.
    """
    return torch.ops.efficientvit.ffn(x, w1, b1, w2, b2, residual)


def dwconv_ffn(x, dw_weight, dw_bias, w1, b1, w2, b2):
    """An EfficientViT block's residual depthwise convolution, then its residual FFN:
    ``y + ffn(y)`` with ``y = x + dwconv(x)`` (``dwconv``'s and ``ffn``'s arguments, both
    residual, no ReLU on the convolution). Returns x's shape, in ``output_memory_format(x)``.
    The Triton backend runs it as one kernel in fp16 and bf16 (each program parks its tile of
    y in its tile of the output, read back from cache and overwritten with the result: no
    tensor of y is written and read back); fp32 there, and CPU and CUDA, run the dwconv and
    ffn kernels one after the other.
    """
    return torch.ops.efficientvit.dwconv_ffn(x, dw_weight, dw_bias, w1, b1, w2, b2)


def patch_embed(x, weights, biases, final_relu=False):
    """The patch embedding, a chain of 3x3 stride-2 convolutions (zero padding 1), each
    ``x = relu(conv(x, weights[l]) + biases[l])`` but the last, which has its ReLU only when
    ``final_relu``.

    x (B, Ci, H, W) in any layout (read as contiguous NCHW: an image); weights[l]
    (C_l, C_{l-1}, 3, 3) with C_{-1} = Ci, in any layout (the Triton kernel reads channels-last
    ones, as ``FusedPatchEmbed`` holds them, as vectors), biases[l] (C_l,). Returns the last
    convolution's output, (B, C_last, H', W') with each convolution halving H and W (rounding up),
    channels-last. On CPU the first convolution is made for a few input channels (Ci = 3), where it is
    several times faster than oneDNN's; the others are implicit GEMMs on rows of the one before,
    computed a few rows at a time in cache: no output but the last reaches memory. On CUDA:
    cuDNN's convolutions, each without its bias, then the bias and the ReLU in one pass of this
    library's kernel (its PyTorch definition in a build without the CUDA kernels); the Triton
    backend's kernel
    (``efficientvit_kernels.triton.patch_embed``) is an implicit GEMM per convolution.
    """
    return torch.ops.efficientvit.patch_embed(x, list(weights), list(biases), final_relu)


def conv1x1(x, weight, bias, relu=False, dw_weight=None, dw_bias=None):
    """A 1x1 convolution, ``y = [relu](weight x + bias)``; x (B, C, H, W), weight (Co, C),
    bias (Co,). Returns y (B, Co, H, W). One GEMM per tile of tokens, on weights packed
    panel-major; PatchMerging's convolutions use it.

    Given dw_weight (Co, 3, 3) and dw_bias (Co,), returns ``relu(dwconv3x3(y) + dw_bias)``
    instead (depthwise, stride 2, zero padding 1; (B, Co, ceil(H/2), ceil(W/2))):
    PatchMerging's first convolution, ReLU, depthwise convolution and ReLU, with y computed a
    band of rows at a time in cache, never written to memory. On CUDA: its PyTorch definition;
    the Triton backend's kernel computes y at each tap of each output tile instead.
    """
    return torch.ops.efficientvit.conv1x1(x, weight, bias, relu, dw_weight, dw_bias)


def squeeze_excite(x, w1, b1, w2, b2):
    """Squeeze-excite, ``x * sigmoid(w2 relu(w1 mean_hw(x) + b1) + b2)``, one scale per
    image and channel: PatchMerging's, its 1x1 convolutions on the 1x1 map as matrices.

    x (B, C, H, W), w1 (R, C), b1 (R,), w2 (C, R), b2 (C,) (the arguments ffn takes). Returns
    x's shape, in ``output_memory_format(x)``. The mean, both layers and the scaling in one op:
    as separate ops they cost several times their arithmetic at batch 1. On CUDA: its PyTorch
    definition; the Triton backend has a kernel (one program per image).
    """
    return torch.ops.efficientvit.squeeze_excite(x, w1, b1, w2, b2)


@torch.library.register_fake("efficientvit::cga")
def _cga_fake(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight,
              proj_bias, window_size, scale, residual):
    check_cga(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight,
              proj_bias, window_size)
    return empty_output(x)


@torch.library.register_fake("efficientvit::dwconv")
def _dwconv_fake(x, weight, bias, relu, residual):
    check_dwconv(x, weight, bias)
    return empty_output(x)


@torch.library.register_fake("efficientvit::ffn")
def _ffn_fake(x, w1, b1, w2, b2, residual):
    check_ffn(x, w1, b1, w2, b2)
    return empty_output(x)


@torch.library.register_fake("efficientvit::dwconv_ffn")
def _dwconv_ffn_fake(x, dw_weight, dw_bias, w1, b1, w2, b2):
    check_dwconv_ffn(x, dw_weight, dw_bias, w1, b1, w2, b2)
    return empty_output(x)


@torch.library.register_fake("efficientvit::conv1x1")
def _conv1x1_fake(x, weight, bias, relu, dw_weight=None, dw_bias=None):
    return empty_output(x, check_conv1x1(x, weight, bias, dw_weight, dw_bias))


@torch.library.register_fake("efficientvit::squeeze_excite")
def _squeeze_excite_fake(x, w1, b1, w2, b2):
    check_ffn(x, w1, b1, w2, b2)
    return empty_output(x)


@torch.library.register_fake("efficientvit::patch_embed")
def _patch_embed_fake(x, weights, biases, final_relu):
    return empty_output(x, check_patch_embed(x, weights, biases), torch.channels_last)


# conv1x1 and squeeze_excite have no CUDA kernels (their Triton kernels serve backend
# "triton"), nor patch_embed in a build without the CUDA kernels; on CUDA the dispatcher runs
# their plain-PyTorch definition (python_ref), checked and laid out as the contract says, so a
# model converted on CPU still runs after .to("cuda"). (Registered after their definitions, not
# by decorator, which would leave their names None: the tests call them on CPU tensors.)
def conv1x1_composite(x, weight, bias, relu, dw_weight=None, dw_bias=None):
    check_conv1x1(x, weight, bias, dw_weight, dw_bias)
    y = python_ref.functional.conv1x1(x, weight, bias, relu, dw_weight, dw_bias)
    return y.contiguous(memory_format=output_memory_format(x))


def patch_embed_composite(x, weights, biases, final_relu):
    check_patch_embed(x, weights, biases)
    y = python_ref.functional.patch_embed(x, weights, biases, final_relu)
    return y.contiguous(memory_format=torch.channels_last)


def squeeze_excite_composite(x, w1, b1, w2, b2):
    check_ffn(x, w1, b1, w2, b2)
    y = python_ref.functional.squeeze_excite(x, w1, b1, w2, b2)
    return y.contiguous(memory_format=output_memory_format(x))


# dwconv_ffn on CPU and CUDA: their dwconv and ffn kernels in turn (its fused kernel is
# Triton's). The arguments are checked first, so that errors name dw_weight and dw_bias as the
# fake's do, not the dwconv kernel's weight and bias.
def dwconv_ffn_composite(x, dw_weight, dw_bias, w1, b1, w2, b2):
    check_dwconv_ffn(x, dw_weight, dw_bias, w1, b1, w2, b2)
    y = torch.ops.efficientvit.dwconv.default(x, dw_weight, dw_bias, False, True)
    return torch.ops.efficientvit.ffn.default(y, w1, b1, w2, b2, True)


torch.library.register_kernel("efficientvit::dwconv_ffn", ("cpu", "cuda"), dwconv_ffn_composite)
torch.library.register_kernel("efficientvit::conv1x1", "cuda", conv1x1_composite)
# A build with the CUDA kernels has patch_embed's (csrc/cuda/patch_embed.cu); one without runs
# the op's plain-PyTorch definition on CUDA tensors.
if not has_compiled_kernels("cuda"):
    torch.library.register_kernel("efficientvit::patch_embed", "cuda", patch_embed_composite)
torch.library.register_kernel("efficientvit::squeeze_excite", "cuda", squeeze_excite_composite)
