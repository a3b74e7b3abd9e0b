"""Fused kernels for EfficientViT: ``torch.ops.efficientvit.{cga, dwconv, ffn, dwconv_ffn,
patch_embed, conv1x1, squeeze_excite}``.

``convert(model)`` turns a reference, official or timm EfficientViT into a model whose
forward calls the fused ops.
"""
__version__ = "0.2.0"

from . import ops  # noqa: E402  (after __version__, which the build reads without importing)
from .convert import PASSES, convert
from .graphs import cpu_graph, cpu_replay, cuda_graph, export_cpu
from .modules import (BACKENDS, FusedCGA, FusedConv1x1, FusedDWConv, FusedDWConvFFN, FusedFFN,
                      FusedLinear, FusedPatchEmbed, FusedPatchMerging, FusedSqueezeExcite)

__all__ = ["ops", "convert", "cpu_graph", "cpu_replay", "cuda_graph", "export_cpu", "BACKENDS", "PASSES", "FusedCGA", "FusedDWConv",
           "FusedFFN", "FusedDWConvFFN", "FusedConv1x1", "FusedLinear", "FusedPatchEmbed", "FusedPatchMerging",
           "FusedSqueezeExcite"]


def _triton_serves_cuda():
    """Where the CUDA kernels were not built, the Triton kernels implement the ops on CUDA.
    (Triton is imported only then: importing it takes seconds.)"""
    import torch
    if not torch.cuda.is_available() or ops.has_compiled_kernels("cuda"):
        return
    from . import triton as triton_kernels
    if triton_kernels.available():
        for name in ("cga", "dwconv", "ffn"):
            torch.library.register_kernel(f"efficientvit::{name}", "cuda",
                                          getattr(triton_kernels, name))


_triton_serves_cuda()
