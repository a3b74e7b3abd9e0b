"""What the tests and benchmarks share: tolerances, the error metrics and an assert helper,
the models' layer shapes, and random cases (inputs, folded weights with random batch-norm
statistics, attention biases).

Errors are measured against the reference evaluated in float64 on the same inputs
(docs/design.md, Numerics): the relative L2 error ``||out - ref|| / ||ref||`` within
``TOLERANCE[dtype]``, and the largest elementwise error ``max |out - ref| / max |ref|`` within
``MAX_ERROR_FACTOR`` times that, so one wrong element among thousands fails too. NaN or inf in
the output always fails.
"""
import contextlib

import torch

from python_ref import MODEL_CONFIGS, functional

__all__ = ["DTYPES", "TOLERANCE", "MAX_ERROR_FACTOR", "tolerance", "errors", "relative_error",
           "assert_close", "assert_layout", "call_poisoned", "layer_shapes", "stage_shapes", "random_cga_params", "random_dwconv_params",
           "random_ffn_params", "random_patch_embed_params", "random_input", "in_layout", "LAYOUTS", "cga_args", "cast", "reference_cga", "KEY_DIM",
           "CGA_ARGS", "packings", "profiled_calls"]

# The dtypes the tests run, by the names their ids use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# Relative L2 error of a fused result against the float64 reference, per input dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
# The largest elementwise error, relative to the largest reference magnitude, may be this many
# times the L2 tolerance: an error spread evenly gives max/L2 ratios of ~2-4.
MAX_ERROR_FACTOR = 10

KEY_DIM = 16


def tolerance(dtype):
    """The relative L2 tolerance for results computed in ``dtype``."""
    return TOLERANCE[dtype]


def errors(out, ref):
    """(relative L2 error, largest elementwise error relative to max |ref|) of out against ref,
    in float64; both inf where out holds NaN or inf, or the shapes differ."""
    if out.shape != ref.shape:
        return float("inf"), float("inf")
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf"), float("inf")
    diff = out - ref
    l2 = (diff.norm() / ref.norm().clamp_min(1e-30)).item()
    largest = (diff.abs().max() / ref.abs().max().clamp_min(1e-30)).item() if diff.numel() else 0.0
    return l2, largest


def call_poisoned(op, x, *args, output_first=False):
    """op(x, *args); on a GPU with its output poisoned: a NaN-filled block of x's size is freed
    right before the call, in a fresh memory pool (where torch has them) so that the caching
    allocator can only hand that block to the output: an element the kernel misses stays NaN.
    ``output_first``: the op allocates its output before anything else; then check that the
    poisoned block became the output. (On CPU the outputs are fresh allocations; the tests
    compare every element.)"""
    if not x.is_cuda:
        return op(x, *args)
    pool = torch.cuda.MemPool() if hasattr(torch.cuda, "MemPool") else None
    with torch.cuda.use_mem_pool(pool) if pool is not None else contextlib.nullcontext():
        poison = torch.full((x.numel(),), float("nan"), dtype=x.dtype, device=x.device)
        address = poison.data_ptr()
        del poison
        out = op(x, *args)
    if pool is not None and output_first and out.numel() > 0:
        assert out.data_ptr() == address, "the poisoned block did not become the output"
    return out


def assert_layout(out, x):
    """out has the strides the op contract gives an output of its shape for input x (the fakes'
    too): ``ops.output_memory_format(x)``."""
    from . import ops
    expected = ops.empty_output(x, out.shape).stride()
    # the strides of size-1 dimensions address nothing (torch compares tensors' layouts alike)
    significant = [d for d, n in enumerate(out.shape) if n > 1]
    if out.numel() and [out.stride(d) for d in significant] != [expected[d] for d in significant]:
        raise AssertionError(f"output strides {out.stride()}, expected {expected} for an input "
                             f"of strides {x.stride()}")


def relative_error(out, ref):
    """||out - ref|| / ||ref|| in float64; NaN or inf anywhere in out gives inf."""
    return errors(out, ref)[0]


def assert_close(out, ref, dtype=None, what="result"):
    """Fails unless out matches ref within the tolerances of ``dtype`` (default out's), with a
    message giving both errors and where the largest is."""
    dtype = dtype or out.dtype
    tol = tolerance(dtype)
    l2, largest = errors(out, ref)
    if l2 <= tol and largest <= MAX_ERROR_FACTOR * tol:
        return
    where = ""
    if out.shape == ref.shape and out.numel():
        diff = (out.detach().double().cpu() - ref.detach().double().cpu()).abs()
        diff = torch.where(torch.isfinite(diff), diff, torch.full_like(diff, float("inf")))
        index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        where = f"; largest at {index}: {out[index].item():.6g} vs {ref[index].item():.6g}"
    raise AssertionError(
        f"{what} ({str(dtype)[6:]}, shape {list(out.shape)} vs {list(ref.shape)}): relative L2 "
        f"error {l2:.3g} (tolerance {tol:.0e}), largest elementwise error {largest:.3g} "
        f"(tolerance {MAX_ERROR_FACTOR * tol:.0e}){where}")


def layer_shapes(models=None, resolution=224):
    """(model, stage, channels, heads, kernels, window, map size) of each stage's attention
    (the FFN and depthwise convolution of a stage see the same map) of ``models`` (M0-M5 by
    default): the one list of the models' layer shapes."""
    shapes = []
    for name in models or MODEL_CONFIGS:
        cfg = MODEL_CONFIGS[name]
        size = resolution // 16  # the stem's four stride-2 convolutions
        for stage, (C, h) in enumerate(zip(cfg["embed_dim"], cfg["num_heads"])):
            shapes.append((name, stage + 1, C, h, tuple(cfg["kernels"][:h]), min(7, size), size))
            size = (size + 1) // 2  # PatchMerging's stride-2 convolution
    return shapes


def stage_shapes():
    """(name, channels, heads, kernels, window) of every distinct attention stage of M0-M5 at
    224^2."""
    shapes = {}
    for name, stage, C, h, kernels, window, _ in layer_shapes():
        shapes.setdefault((C, h, kernels, window), f"{name}.stage{stage}")
    return [(n, *k) for k, n in shapes.items()]


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


def random_patch_embed_params(channels, seed=0, dtype=torch.float64):
    """(weights, biases) of the convolution chain channels[0] -> channels[1] -> ..., biases
    that ReLU some outputs to 0."""
    g = torch.Generator().manual_seed(seed)
    weights, biases = [], []
    for ci, co in zip(channels, channels[1:]):
        weights.append((torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64)
                        * (9 * ci) ** -0.5).to(dtype))
        biases.append((torch.randn(co, generator=g, dtype=torch.float64) * 0.3).to(dtype))
    return weights, biases


# The memory layouts an op's input may come in: dense in either format, dense in neither
# (permuted), not dense (a strided view), and a channel slice of a channels-last tensor.
LAYOUTS = ("contiguous", "channels_last", "permuted", "strided", "channels_last_slice")


def random_input(B, C, H, W, seed=1, dtype=torch.float64, channels_last=False, layout=None,
                 device="cpu"):
    """A random (B, C, H, W) input in ``layout`` (one of LAYOUTS; ``channels_last=True`` is
    short for that layout), the same values whatever the layout."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return in_layout(x, layout or ("channels_last" if channels_last else "contiguous"))


def in_layout(x, layout):
    """The values of the 4-D ``x`` in ``layout``, one of LAYOUTS."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "permuted":  # dense, with strides ordered (B, H, C, W)
        return x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    B, C, H, W = x.shape
    if layout == "strided":  # every other column of a wider tensor
        wide = torch.zeros(B, C, H, 2 * W, dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "channels_last_slice":  # the first C channels of a channels-last tensor
        wide = torch.zeros(B, C + 3, H, W, dtype=x.dtype, device=x.device).to(memory_format=torch.channels_last)
        wide[:, :C] = x
        return wide[:, :C]
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


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


def profiled_calls(fn):
    """{event name: count} of the CPU profiler's events (ops, kernels, packings) in fn()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


def packings(fn):
    """How many times calling fn packs CPU weights (the packing cache's profiler events)."""
    return sum(count for name, count in profiled_calls(fn).items()
               if name.startswith("efficientvit_cpu::pack ("))
