"""Random inputs and parameters for the fused ops, shared by every backend's tests."""
import torch

from python_ref import MODEL_CONFIGS, functional

KEY_DIM = 16


def stage_shapes():
    """(name, channels, heads, kernels, window) of every attention stage of M0-M5 at 224^2."""
    shapes = {}
    for name, cfg in MODEL_CONFIGS.items():
        for stage, (C, h) in enumerate(zip(cfg["embed_dim"], cfg["num_heads"])):
            window = min(7, (14, 7, 4)[stage])
            key = (C, h, tuple(cfg["kernels"][:h]), window)
            shapes.setdefault(key, f"{name}.stage{stage + 1}")
    return [(n, *k) for k, n in shapes.items()]


def relative_error(out, ref):
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out gives inf."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def random_cga_params(C, heads, kernels, window, key_dim=KEY_DIM, seed=0, dtype=torch.float64):
    """Op arguments of a cga layer with random folded weights and attention biases."""
    g = torch.Generator().manual_seed(seed)
    d, K = C // heads, max(kernels)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    dw_weight = torch.zeros(heads, key_dim, K, K, dtype=torch.float64)
    for i, k in enumerate(kernels):
        o = (K - k) // 2
        dw_weight[i, :, o:o + k, o:o + k] = randn(key_dim, k, k, std=k ** -1).double()
    return dict(
        qkv_weight=randn(heads, 2 * key_dim + d, d, std=d ** -0.5),
        qkv_bias=randn(heads, 2 * key_dim + d, std=0.1),
        dw_weight=dw_weight.to(dtype),
        dw_bias=randn(heads, key_dim, std=0.1),
        attention_bias=randn(heads, window, window, std=0.5),
        proj_weight=randn(C, C, std=C ** -0.5),
        proj_bias=randn(C, std=0.1),
        window_size=window,
        scale=key_dim ** -0.5,
    )


def random_dwconv_params(C, K=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(C, K, K, generator=g, dtype=torch.float64).div(K).to(dtype),
            torch.randn(C, generator=g, dtype=torch.float64).mul(0.1).to(dtype))


def random_ffn_params(C, M, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    return randn(M, C, std=C ** -0.5), randn(M, std=0.1), randn(C, M, std=M ** -0.5), randn(C, std=0.1)


def random_input(B, C, H, W, seed=1, dtype=torch.float64, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


CGA_ARGS = ("qkv_weight", "qkv_bias", "dw_weight", "dw_bias", "attention_bias", "proj_weight",
            "proj_bias", "window_size", "scale")


def cga_args(params):
    """cga's arguments after x and before residual, in the op's order, from random_cga_params."""
    return [params[k] for k in CGA_ARGS]


def cast(params, dtype, device="cpu"):
    return {k: v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v
            for k, v in params.items()}


def reference_cga(x, params, residual=True):
    """The spec, evaluated in float64."""
    return functional.cga(x.double(), **cast(params, torch.float64), residual=residual)
