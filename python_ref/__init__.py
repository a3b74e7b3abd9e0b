"""Pure-PyTorch reference EfficientViT (M0-M5), checkpoint-compatible with the official code.

Every fused kernel of ``efficientvit_kernels`` is checked against this package.
"""
from . import functional
from .checkpoint import load_checkpoint, timm_to_official
from .flops import count_macs, count_params
from .fold import fold_batchnorm
from .model import (MODEL_CONFIGS, CascadedGroupAttention, EfficientViT, EfficientViTBlock,
                    LocalWindowAttention, build, efficientvit_m0, efficientvit_m1, efficientvit_m2,
                    efficientvit_m3, efficientvit_m4, efficientvit_m5)
from .params import cga_params, dwconv_params, ffn_params

__all__ = [
    "functional", "load_checkpoint", "timm_to_official", "count_macs", "count_params",
    "fold_batchnorm", "MODEL_CONFIGS", "CascadedGroupAttention", "EfficientViT",
    "EfficientViTBlock", "LocalWindowAttention", "build", "efficientvit_m0", "efficientvit_m1",
    "efficientvit_m2", "efficientvit_m3", "efficientvit_m4", "efficientvit_m5",
    "cga_params", "dwconv_params", "ffn_params", "randomize_",
]


def randomize_(model, seed=0, resolution=224):
    """Gives every weight, attention bias and batch-norm statistic random values, in place.

    The default init zeroes whole branches (BN weight 0 at residual branch ends, zero
    attention biases), which would hide wrong kernels. Weights are drawn with std
    1/sqrt(fan-in); the BN statistics are measured on a random batch and then perturbed,
    and the last BN of each residual branch gets a small weight, so activations stay O(1)
    through the depth as in a trained model. Works on any EfficientViT (this package's,
    the official code's, timm's) and on its submodules. Returns ``model`` in eval mode.
    """
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    g = torch.Generator().manual_seed(seed)

    def rand(shape, lo=0.0, hi=1.0):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attention_biases" in name:
                std = 0.5
            elif p.dim() > 1:
                std = p[0].numel() ** -0.5
            else:
                std = 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)
        norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        for m in norms:
            m.weight.copy_(rand(m.weight.shape, 0.5, 1.5))
        for m in model.modules():
            branch = getattr(m, "m", None)
            if isinstance(branch, torch.nn.Module):  # Residual / ResidualDrop
                ends = [n for n in branch.modules() if isinstance(n, _BatchNorm)]
                if ends:
                    ends[-1].weight.copy_(rand(ends[-1].weight.shape, 0.1, 0.3))
        if isinstance(model, torch.nn.Module) and hasattr(model, "patch_embed"):
            # measure the statistics on a random batch, then perturb them
            for m in norms:
                m.reset_running_stats()
                m.momentum = None
            model.train()
            model(torch.randn(2, getattr(model, "in_chans", 3), resolution, resolution, generator=g))
            for m in norms:
                m.momentum = 0.1
        for m in norms:
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.mul_(rand(m.running_var.shape, 0.5, 2.0))
    return model.eval()
