"""Where a model's GPU time goes, op kind by op kind, beside each kind's floor and, for the CUDA
kernels, a time predicted from their static profile (benchmarks/results/gpu_static.json), so
that one GPU run says where the prediction is wrong. Used by bench_models_gpu.py at each
model's largest batch; its pieces run on CPU (tests/test_bench_gpu_helpers.py).

Kinds: the stem (patch embedding), dwconv (a residual depthwise convolution), ffn, attention
(the residual local-window attention), patch merging (with its squeeze-excite), head; what the
forward does outside them (pooling, flatten) is "other". A reference model and its converted
(fused) form split into the same ops.

Per kind, over one forward at the measured batch:
- measured: the sum of its ops' times, each between CUDA events recorded by forward hooks;
- floor: max(bytes / copy bandwidth, FLOPs / matmul rate): bytes as model_traffic counts
  them (inputs and output once, weights once), FLOPs as torch's FlopCounterMode counts the
  reference op;
- predicted (the CUDA backend's fused kinds: dwconv, ffn, attention; every kind of the Triton
  backend but the head): the larger of
    FLOPs / (matmul rate x its MMA's share)         tensor-core time (fp16 / bf16)
    (bytes + restaged weight bytes / L2_OVER_DRAM) / copy bandwidth
  divided by min(1, resident warps per multiprocessor / WARPS_TO_HIDE_LATENCY), resident warps
  from the kernel's fp16 sm_90 row of the static profile. The MMA's share of the matmul rate:
  WGMMA_SHARE where the row's tensor-core instructions include Hopper's wgmma (HGMMA, which
  Triton emits for tiles of 64 rows and more; where a kernel has both, its wgmma, 64 rows an
  instruction against mma.sync's 16, do the bulk of the products), else MMA_SYNC_SHARE
  (mma.sync: the CUDA kernels, and Triton's smaller tiles); a kind of several launches takes
  the least share among those with tensor-core instructions (MMA_SYNC_SHARE where none has
  any). Restaged weights: each block reads the weights it needs once.
  CUDA: the op's weights, a block each (ffn: 64 pixel rows a block from 256 channels up, else
  128; attention: 64 token rows a block, one 7x7 window or four 4x4), as the planners' design
  point has it.
  Triton: from the launches the kind makes at this input (recorded on meta tensors, as the
  static profile records them, so no GPU is needed; each finds its row by the compilation it
  makes, triton_static.launch_key): each program reads the weights among its
  arguments, the convolutions' programs only their tile of output channels, and the staged
  FFN's its hidden activation, written to scratch and read back per tile of output columns,
  counts as restaged (L2) bytes too; a kind of several
  launches (the stem's convolutions, PatchMerging's five) also writes each launch's output
  and reads it back in each launch that reads it, bytes added to its own; each dwconv runs inside
  the FFN launch after it (dwconv_ffn), so the dwconv kind predicts 0. FLOPs: the
  reference's, or where more, the products the launches compute with their tiles' padding
  and recomputation (triton_product_flops: conv1x1 and ffn). A kind's warps are
  those of its launch with the fewest; where autotuning chooses among configs, the prediction
  takes the config with the least restaged traffic per busy share, the one it should pick.
  Triton, and at least: the instructions its launches issue, counted as the static SASS of
  each program's kernel times its warps and programs, at ISSUE_RATE (an H200's issue slots at
  half use). The first GPU profile (benchmarks/results/gpu_first_run_2026-12-04.md) measured
  the issue-bound kernels near that rate; it counts each instruction once, so kernels whose
  loops run their code many times (the attention's heads, the FFN's hidden chunks: 2-21x
  there) and kernels with too few programs to fill the machine run slower than predicted.
The constants are leads, to be corrected by measurement: mma.sync reaching half the rate of
the library's matrix product (wgmma on Hopper) and wgmma all of it, L2 serving restaged
weights at 2.5x the copy bandwidth, and 16 warps (two blocks of 8) hiding a multiprocessor's
latencies. The first GPU run measured every kind 4-40x above the predictions made without the
instruction count.
"""
import collections
import copy
import inspect
import json
import math
import os

import torch
from torch import nn

import python_ref
from efficientvit_kernels.modules import (FusedCGA, FusedDWConv, FusedDWConvFFN, FusedFFN,
                                         FusedPatchMerging)
from python_ref.model import FFN, Conv2d_BN, LocalWindowAttention, PatchMerging, Residual

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATIC = os.path.join(ROOT, "benchmarks", "results", "gpu_static.json")

KINDS = ("stem", "dwconv", "ffn", "attention", "patch merging", "head")
MMA_SYNC_SHARE = 0.5
WGMMA_SHARE = 1.0
L2_OVER_DRAM = 2.5
WARPS_TO_HIDE_LATENCY = 16
# Warp instructions an H200 issues a second at half its issue slots: 132 multiprocessors x 4
# schedulers x 1.98 GHz x 0.5 (its issue-bound kernels ran at 45-65% of them).
ISSUE_RATE = 132 * 4 * 1.98e9 * 0.5
# The CUDA kernel of each fused kind, as the static profile names its fp16 variant
KERNELS = {"dwconv": "dwconv_kernel<c10::Half, int, 8>", "ffn": "ffn_kernel<c10::Half>",
           "attention": "cga_kernel<c10::Half>"}
# The Triton kernels whose grid axis 1 runs over tiles of output channels: each of those
# programs reads only its tile's share of the weights.
CHANNEL_TILED = ("_conv3x3_stride2_kernel", "_conv1x1_kernel")
# A dwconv the Triton backend fused into the FFN after it runs as that FFN's kind.
_CLASSES = ((FFN, "ffn"), (FusedFFN, "ffn"), (FusedDWConvFFN, "ffn"),
            (LocalWindowAttention, "attention"), (FusedCGA, "attention"), (FusedDWConv, "dwconv"), (PatchMerging, "patch merging"),
            (FusedPatchMerging, "patch merging"))


def op_kind(module):
    """The kind of a module of a reference or fused EfficientViT body, None for a container."""
    inner = module.m if isinstance(module, Residual) else module
    for cls, kind in _CLASSES:
        if isinstance(inner, cls):
            return kind
    if isinstance(inner, Conv2d_BN) and inner.c.groups == inner.c.in_channels > 1:
        return "dwconv"
    return None


def ops_of(model):
    """[(kind, module)] of an EfficientViT (reference or converted), in forward order."""
    out = []

    def walk(module):
        for child in module.children():
            kind = op_kind(child)
            if kind:
                out.append((kind, child))
            else:
                walk(child)

    for name, child in model.named_children():
        if name in ("patch_embed", "head"):
            out.append(("stem" if name == "patch_embed" else "head", child))
        else:
            walk(child)
    return out


@torch.no_grad()
def kind_work(reference, fused, x):
    """{kind: (bytes, FLOPs)} of one forward of ``fused`` on x: bytes as model_traffic counts
    them, per op; FLOPs of the same ops of ``reference`` (the unfused model x came for), which
    FlopCounterMode can see into."""
    from torch.utils.flop_counter import FlopCounterMode
    moved = {}

    def count(kind, module):
        weights = sum(t.numel() * t.element_size()
                      for t in (*module.parameters(), *module.buffers()))

        def hook(_, inputs, output):
            moved[kind] = moved.get(kind, 0) + weights + sum(
                t.numel() * t.element_size() for t in (*inputs, output) if torch.is_tensor(t))
        return module.register_forward_hook(hook)

    calls = []  # (kind, reference op, its inputs): counted after the forward, hooks removed

    def capture(kind, module):
        return module.register_forward_hook(lambda _, inputs, out: calls.append(
            (kind, module, inputs)))

    hooks = [count(k, m) for k, m in ops_of(fused)]
    hooks += [capture(k, m) for k, m in ops_of(reference)]
    try:
        fused(x)
        reference(x.to(next(reference.parameters()).dtype))
    finally:
        for h in hooks:
            h.remove()
    flops = {}
    for kind, module, inputs in calls:
        with FlopCounterMode(display=False) as counter:
            module(*inputs)
        flops[kind] = flops.get(kind, 0) + counter.get_total_flops()
    return {k: (moved.get(k, 0), flops.get(k, 0)) for k in KINDS}


@torch.no_grad()
def measure_kinds(model, x, repeats=3):
    """{kind: milliseconds} of ``model(x)`` on the GPU (median of ``repeats`` forwards), and
    "other": the forward's time outside the ops, and "forward": all of it."""
    spans = []

    def timed(kind, module):
        def pre(*_):
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            spans.append([kind, start, None])

        def post(*_):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            next(s for s in reversed(spans) if s[0] == kind and s[2] is None)[2] = end
        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    hooks = [h for k, m in ops_of(model) for h in timed(k, m)]
    runs = []
    try:
        for _ in range(repeats + 1):  # the first warms up
            spans.clear()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            times = {k: 0.0 for k in KINDS}
            for kind, s, e in spans:
                times[kind] += s.elapsed_time(e)
            times["forward"] = begin.elapsed_time(end)
            times["other"] = times["forward"] - sum(times[k] for k in KINDS)
            runs.append(times)
    finally:
        for h in hooks:
            h.remove()
    return {k: sorted(r[k] for r in runs[1:])[len(runs[1:]) // 2] for k in runs[1]}


def static_rows(path=STATIC, backend="cuda"):
    """The static profile's sm_90 rows of ``backend`` ({} if the file is missing): CUDA's fp16
    ones by kernel, Triton's by launch_key (efficientvit_kernels.triton_static)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = json.load(f)["rows"]
    rows = [r for r in rows if r["backend"] == backend and r["arch"] == 90 and "error" not in r]
    if backend == "cuda":
        return {r["kernel"]: r for r in rows}
    return {r["launch_key"]: r for r in rows if "launch_key" in r}


def restaged_weight_bytes(kind, module, x):
    """Bytes of weights the CUDA kernel's blocks read over all, for the fused op ``module`` on
    input x: each block reads them once (the module docstring's design point)."""
    if kind not in ("ffn", "attention"):  # no kernel of ours (the head's input is 2-D)
        return 0
    weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    B, C, H, W = x.shape
    if kind == "ffn":
        blocks = -(-B * H * W // (64 if C >= 256 else 128))
    else:
        ws = module.window_size
        windows_per_block = max(1, 64 // (-(-ws * ws // 16) * 16))
        blocks = -(-B * -(-H // ws) * -(-W // ws) // windows_per_block)
    return blocks * weights


@torch.no_grad()
def restaged_bytes(fused, x):
    """{kind: restaged_weight_bytes over one forward of ``fused`` on x}."""
    out = {}

    def hook(kind):
        def count(module, inputs, _):
            out[kind] = out.get(kind, 0) + restaged_weight_bytes(kind, module, inputs[0])
        return count

    hooks = [m.register_forward_hook(hook(k)) for k, m in ops_of(fused)]
    try:
        fused(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def predict_ms(bytes_, flops, restaged, warps, bandwidth, matmul_rate, share=MMA_SYNC_SHARE):
    """Predicted milliseconds of a fused kind (the module docstring's model): ``warps``
    resident a multiprocessor, ``restaged`` weight bytes read beyond ``bytes_``, its MMA at
    ``share`` of the matmul rate."""
    busy = min(1.0, warps / WARPS_TO_HIDE_LATENCY)
    seconds = max(flops / (matmul_rate * share), (bytes_ + restaged / L2_OVER_DRAM) / bandwidth)
    return seconds / busy * 1e3


def resident_warps(row):
    """Warps of a static-profile row's kernel resident on a multiprocessor (None without)."""
    if not row or not row.get("blocks_per_sm"):
        return None
    return row["blocks_per_sm"] * row["threads"] // 32


def mma_share(row):
    """The share of the matmul rate a static-profile row's tensor-core instructions reach
    (None for a kernel without any)."""
    if not row.get("tensor_core_instructions"):
        return None
    return WGMMA_SHARE if row.get("warpgroup_mma_instructions") else MMA_SYNC_SHARE


def cuda_predictions(work, restaged, bandwidth, matmul_rate, static):
    """{kind: predicted ms on the CUDA backend, None where it runs no kernel of ours}."""
    out = {}
    for kind, (bytes_, flops) in work.items():
        row = static.get(KERNELS.get(kind))
        warps = resident_warps(row)
        out[kind] = warps and predict_ms(bytes_, flops, restaged.get(kind, 0), warps,
                                         bandwidth, matmul_rate,
                                         mma_share(row) or MMA_SYNC_SHARE)
    return out


@torch.no_grad()
def triton_launches(fused, x):
    """{kind: [[[launch, its alternatives...] per kernel launch] per call of a module of the
    kind]} of one forward of the Triton-converted ``fused`` on x, recorded on meta-tensor copies
    (efficientvit_kernels.triton_static), with each launch's weights: [(Launch, weight bytes it
    reads)]. Consecutive launches of one kernel on the same arguments are an autotuner's
    configs."""
    from efficientvit_kernels import triton_static
    model = copy.deepcopy(fused).to("meta")
    spans = []
    with triton_static.recording() as launches:
        def mark(kind, module):
            weights = {id(t): t.numel() * t.element_size()
                       for t in (*module.parameters(), *module.buffers())}
            return [module.register_forward_pre_hook(
                        lambda *_: spans.append([kind, weights, len(launches), None])),
                    module.register_forward_hook(
                        lambda *_: spans[-1].__setitem__(3, len(launches)))]
        hooks = [h for k, m in ops_of(model) for h in mark(k, m)]
        try:
            model(x.to("meta"))
        finally:
            for h in hooks:
                h.remove()
    out = {}
    for kind, weights, start, end in spans:
        calls = []
        out.setdefault(kind, []).append(calls)
        previous = None
        for launch in launches[start:end]:
            read = sum(weights.get(id(a), 0) for a in launch.args)
            if autotune_alternative(previous, launch):
                calls[-1].append((launch, read))
            else:
                calls.append([(launch, read)])
            previous = launch
    return out


def autotune_alternative(previous, launch):
    """Whether a recorded launch is another config of the one before it (an autotuner tries
    each config on the same arguments)."""
    return previous is not None and previous.kernel is launch.kernel and all(
        a is b for a, b in zip(previous.args, launch.args))


def triton_restaged(launch, weight_bytes):
    """Bytes a Triton launch's programs move through L2 beyond its inputs and output once (the
    module docstring's model): the weights each program reads, and the staged FFN's hidden
    activation, written to its scratch and read back once per tile of output columns."""
    programs = math.prod(launch.grid)
    name = launch.kernel.fn.__name__
    if name in CHANNEL_TILED:
        programs //= launch.grid[1]
    staged = 0
    if name == "_ffn_staged_kernel":
        kw = launch.kwargs
        rows = kw["BT"] * kw["MP"] * _argument(launch, "x_ptr").element_size()
        staged = programs * rows * (1 + math.ceil(kw["C"] / kw["BN"]))
    return programs * weight_bytes + staged


def _argument(launch, name):
    """A launch's argument ``name`` (x_ptr: its input, out_ptr: its output)."""
    return launch.args[list(inspect.signature(launch.kernel.fn).parameters).index(name)]


def triton_intermediate_bytes(calls):
    """Bytes the Triton launches of one module call (``triton_launches``' list for it) move
    between each other: each output that others of its launches read (the stem's convolutions
    after the first, PatchMerging's steps), written once and read once by each; 0 for a module
    of one launch."""
    launches = [alternatives[0][0] for alternatives in calls]
    readers = collections.Counter(id(_argument(launch, "x_ptr")) for launch in launches)
    outputs = {id(t): t for t in (_argument(launch, "out_ptr") for launch in launches)}
    return sum(t.numel() * t.element_size() * (1 + readers[i]) for i, t in outputs.items()
               if readers[i])


def triton_product_flops(launch):
    """FLOPs of the matrix products a Triton launch's programs compute, their tiles' padding
    and recomputation included: conv1x1 reduces over whole BK steps and, with the depthwise
    convolution, computes y at each of the nine taps of an output; ffn's output columns are
    one tile of a power of two (CP) and its hidden width whole BM chunks; the staged ffn's
    hidden width is MP, its reduction over the channels whole BK steps and its output columns
    whole BN tiles. 0 for the kernels not modelled here (a kind's reference FLOPs stand for
    them)."""
    kw, programs = launch.kwargs, math.prod(launch.grid)
    name = launch.kernel.fn.__name__

    def whole(n, step):
        return math.ceil(n / step) * step
    if name == "_conv1x1_kernel":
        reduced = whole(_argument(launch, "C"), kw["BK"])
        return programs * 2 * kw["BP"] * kw["BN"] * reduced * (9 if kw["DEPTHWISE"] else 1)
    if name == "_ffn_kernel":  # two products over the hidden width
        return programs * 4 * kw["BT"] * kw["CP"] * whole(kw["M"], kw["BM"])
    if name == "_ffn_staged_kernel":
        columns = whole(kw["C"], kw["BK"]) + whole(kw["C"], kw["BN"])
        return programs * 2 * kw["BT"] * kw["MP"] * columns
    return 0


def triton_predictions(launches, work, bandwidth, matmul_rate, static):
    """{kind: predicted ms on the Triton backend} from ``triton_launches``, None for a kind
    with a launch the static profile lacks (or with no launch: the head), 0 for a kind no
    module of the model runs as (dwconv, where each runs in the FFN's kernel after it). A
    kind's FLOPs: its reference FLOPs, or the products its launches compute
    (``triton_product_flops``) where those are more."""
    from efficientvit_kernels import triton_static
    out = {}
    for kind, (bytes_, flops) in work.items():
        if kind not in launches:
            out[kind] = 0.0
            continue
        restaged, products, warps, shares, instructions = 0, 0, [], [], 0
        for alternatives in (a for call in launches.get(kind, []) for a in call):
            options = []
            for launch, weight_bytes in alternatives:
                row = static.get(triton_static.launch_key(launch, 90))
                w = resident_warps(row)
                if w:
                    options.append((triton_restaged(launch, weight_bytes), w,
                                    triton_product_flops(launch), mma_share(row),
                                    issued_instructions(launch, row)))
            if not options:
                warps = None
                break
            r, w, f, share, issued = min(
                options, key=lambda o: o[0] / min(1.0, o[1] / WARPS_TO_HIDE_LATENCY))
            restaged += r
            products += f
            warps.append(w)
            shares.append(share)
            instructions += issued
        moved = bytes_ + sum(map(triton_intermediate_bytes, launches.get(kind, [])))
        share = min((s for s in shares if s), default=MMA_SYNC_SHARE)
        out[kind] = (max(predict_ms(moved, max(flops, products), restaged, min(warps),
                                    bandwidth, matmul_rate, share),
                         instructions / ISSUE_RATE * 1e3) if warps else None)
    return out


def issued_instructions(launch, row):
    """Warp instructions a Triton launch issues, counting each of its kernel's static SASS
    instructions once per warp of each program (a lower bound where loops repeat code)."""
    programs = math.prod(launch.grid or (1,))
    return programs * row["threads"] // 32 * row["sass_instructions"]
