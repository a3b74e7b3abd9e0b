"""Fused kernels for EfficientViT: ``torch.ops.efficientvit.{cga, dwconv, ffn}``.

``convert(model)`` turns a reference, official or timm EfficientViT into a model whose
forward calls the fused ops.
"""
from . import ops
from .convert import convert
from .modules import BACKENDS, FusedCGA, FusedDWConv, FusedFFN

__all__ = ["ops", "convert", "BACKENDS", "FusedCGA", "FusedDWConv", "FusedFFN"]
