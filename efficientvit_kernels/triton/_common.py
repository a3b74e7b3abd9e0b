"""Helpers shared by the Triton launchers and kernels."""
import torch
import triton
import triton.language as tl
import triton.testing
from triton.runtime.interpreter import InterpretedFunction

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Set by efficientvit_kernels.triton_static.recording(): launches on meta tensors are recorded
# (to be compiled ahead of time for a GPU that need not be here), not run.
recorder = None


def check_device_dtype(x, kernel):
    """Rejects what the kernels cannot run on, with a message instead of a Triton error."""
    if x.dtype not in _DTYPES:
        raise ValueError(f"efficientvit: the Triton kernels take float32, float16 or bfloat16, "
                         f"got {x.dtype}")
    if x.device.type != "cuda" and not interpreted(kernel) and recorder is None:
        raise ValueError(f"efficientvit: the Triton kernels need a CUDA tensor (or "
                         f"TRITON_INTERPRET=1 set before triton is imported), got {x.device}")


def interpreted(kernel):
    """True when triton.jit built ``kernel`` for the interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(kernel, InterpretedFunction)


def flat_pixels(t):
    """True when pixel (y, x) of ``t`` (B, C, H, W) sits at (y*W + x) * stride_w, as in
    contiguous and channels-last tensors: see :func:`pixel_offsets`."""
    return t.stride(2) == t.shape[3] * t.stride(3)


def flat_batch(t):
    """True when the batch continues the pixel axis, as in channels-last tensors: pixel p of
    image b sits at (b*H*W + p) * stride_w, so the images are one map of B*H*W pixels (whose
    int32 offsets hold while the tensor has fewer than 2**31 elements)."""
    B, _, H, W = t.shape
    return (flat_pixels(t) and (B == 1 or t.stride(0) == H * W * t.stride(3))
            and t.numel() < 2 ** 31)


def padded(n):
    """A block extent for ``n``: a power of two, at least 16 (tl.dot's smallest tile on GPUs)."""
    return max(16, triton.next_power_of_2(n))


@triton.jit
def mm(a, b, DT: tl.constexpr):
    """a @ b accumulated in fp32. fp16/bf16 operands are rounded to the input dtype (tensor
    cores); fp32 stays IEEE (no tf32) so fp32 results meet the 1e-5 tolerance."""
    if DT == tl.float32:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a.to(DT), b.to(DT))
    return c


@triton.jit
def pixel_offsets(p, W, sh, sw, FLAT: tl.constexpr):
    """Offsets of pixels p = y*W + x within an image. FLAT (see flat_pixels) gives p*sw,
    which shows the compiler that consecutive pixels are sw apart: with sw == 1 (NCHW),
    loads along the pixel axis coalesce and vectorize."""
    if FLAT:
        off = p * sw
    else:
        off = (p // W) * sh + (p % W) * sw
    return off


@triton.jit
def dwconv_taps(acc, tile, y, x, H, W, sh, sw, c, pmask, cmask, w_ptr, K: tl.constexpr):
    """acc plus a depthwise KxK convolution (zero padding K//2) of a (pixels x channels) tile
    whose element pointers are ``tile``, pixel (y, x) of an H x W map with rows sh apart and
    columns sw; w_ptr holds the (C, K, K) weights. Taps outside the map, and masked pixels
    and channels, read zero; the products are summed in fp32."""
    for ky in range(K):
        dy = ky - K // 2
        row_ok = pmask & (y + dy >= 0) & (y + dy < H)
        for kx in range(K):
            dx = kx - K // 2
            ok = row_ok & (x + dx >= 0) & (x + dx < W)
            v = tl.load(tile + dy * sh + dx * sw, mask=ok[:, None] & cmask[None, :], other=0.0)
            tap = tl.load(w_ptr + c * (K * K) + (ky * K + kx), mask=cmask, other=0.0)
            acc += v.to(tl.float32) * tap.to(tl.float32)[None, :]
    return acc


@triton.jit
def output_tile(pixel_tiles, n_pixels, n_channels, BP: tl.constexpr, BC: tl.constexpr):
    """A program's tile of a (pixels x channels) output, grid axis 0 over images x pixel tiles,
    axis 1 over channel tiles: (image, as int64 for its offsets; pixels; channels; the masks of
    the pixels and channels that exist)."""
    pid = tl.program_id(0)
    p = (pid % pixel_tiles) * BP + tl.arange(0, BP)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    return (pid // pixel_tiles).to(tl.int64), p, c, p < n_pixels, c < n_channels


@triton.jit
def multiple(n, V: tl.constexpr):
    """n, which the caller knows to be a multiple of V, in a form the compiler knows to be one
    (its loads through n then vectorize; it knows by itself only of multiples of 16)."""
    return n // V * V


@triton.jit
def relu(a):
    # Not tl.maximum: on GPUs it drops NaN (max(NaN, 0) = 0); the reference propagates it.
    return tl.where(a < 0, 0.0, a)


# A multiprocessor's registers, and the count a thread at which two 256-thread blocks share them.
REGISTER_FILE = 65536
TWO_BLOCK_REGISTERS = 128
# The most a thread can have: asked for explicitly where ptxas's own choice spills.
MAX_REGISTERS = 255
# The kernels whose launchers pass their launch arguments through launch_kwargs (the static
# profile, efficientvit_kernels/triton_static.py, makes the same choice for them).
REGISTER_CAPPED = frozenset({"_cga_kernel", "_conv1x1_kernel", "_conv3x3_stride2_pair_kernel",
                             "_ffn_staged_kernel", "_squeeze_excite_gate_kernel"})


def block_limits(threads):
    """Register limits for a launch of ``threads`` a block, one per count of resident blocks,
    most blocks first: from the most that leave a thread 128 registers down to one block, the
    most registers a thread may take (in ptxas's steps of 8, at most 255). 128 threads: 128,
    168, 255 (4, 3, 2 blocks); 256 threads: 128, 255."""
    limits = []
    for blocks in range(REGISTER_FILE // (threads * TWO_BLOCK_REGISTERS), 0, -1):
        limit = min(MAX_REGISTERS, REGISTER_FILE // (blocks * threads) // 8 * 8)
        if limit not in limits:
            limits.append(limit)
    return limits


def capped_registers(kwargs, compile):
    """``kwargs`` with the register limit (``maxnreg``, with ``num_stages`` where that takes
    one) the launch should have; ``compile(kwargs)`` returns the compiled kernel's (registers a
    thread, local-memory bytes a thread). The first of these whose compile spills nothing:
    - for a 256-thread launch that takes more than 128 registers or spills: a limit of 128, a
      second block on each multiprocessor, then the same with two stages of loads in flight
      instead of three (fewer registers held for loads ahead), then one (under Triton 3.6 an
      attention variant that spilled at 128 with two or three stages fit with one); a cap may
      instead trade the second block for local-memory traffic, as some do;
    - where the kernel as written spills: the limits of ``block_limits``, most resident blocks
      first, then the one-block limit with one stage of loads in flight (left to itself, ptxas
      stops some variants at 128 registers and spills a few bytes, the attention's on
      channels-last maps 8-24; an explicit limit schedules differently);
    else as written."""
    registers, spilled = compile(kwargs)
    threads = kwargs["num_warps"] * 32
    choices = []
    if threads == 256 and (registers > TWO_BLOCK_REGISTERS or spilled):
        choices += [{"maxnreg": TWO_BLOCK_REGISTERS, **stages} for stages in
                    ({}, {"num_stages": 2}, {"num_stages": 1})]
    if spilled:
        limits = [{"maxnreg": limit} for limit in block_limits(threads)]
        choices += [c for c in limits if c not in choices]
        # the one-block limit with one stage (255 up to 256 threads; 128 for 512, whose block
        # could not launch with more)
        choices += [{"maxnreg": block_limits(threads)[-1], "num_stages": 1}]
    for choice in choices:
        chosen = {**kwargs, **choice}
        if compile(chosen)[1] == 0:
            return chosen
    return kwargs


def _loaded(kernel, args, kwargs):
    """``kernel`` compiled for the GPU of ``args[0]`` and loaded, which sets its n_regs and
    n_spills (Triton's cache makes a repeat cheap)."""
    compiled = kernel.warmup(*args, grid=(1,), **kwargs)
    compiled._init_handles()
    return compiled


_CAPPED = {}


def launch_kwargs(kernel, args, kwargs):
    """The launch arguments of ``kernel[grid](*args, **kwargs)`` on the GPU: ``kwargs`` with
    the register limit :func:`capped_registers` chooses from the kernel compiled for this GPU
    (once per device and specialization). The interpreter and the static recorder launch
    ``kwargs`` as given (the static profile decides per target)."""
    assert kernel.fn.__name__ in REGISTER_CAPPED, kernel.fn.__name__
    if interpreted(kernel) or recorder is not None:
        return kwargs
    device = args[0].device
    # What Triton specializes a compilation on: the tensors' dtypes, integers equal to 1 or
    # multiples of 16 (a stride of 1 in one layout and not the other), and the constexprs.
    specialization = tuple(a.dtype if isinstance(a, torch.Tensor) else
                           (a == 1, a % 16 == 0) if isinstance(a, int) else None for a in args)
    key = (kernel.fn.__name__, device.index, specialization, tuple(sorted(kwargs.items())))
    if key not in _CAPPED:
        def compile(kw):
            compiled = _loaded(kernel, args, kw)
            return compiled.n_regs, compiled.n_spills
        _CAPPED[key] = capped_registers(kwargs, compile)
    return _CAPPED[key]


_FASTEST = {}


def run_fastest(key, launches):
    """Runs one of ``launches`` (callables computing the same output, such as one kernel's
    launches in different tilings): the one measured fastest on this GPU the first time
    ``key`` came (as triton.autotune measures its configs; ``key`` names what the ranking
    depends on: device, dtype, shape constants, layout). A lone launch just runs; the static
    recorder records every one, as it records each config an autotuner keeps."""
    if recorder is not None or len(launches) == 1:
        for launch in launches:
            launch()
        return
    if key not in _FASTEST:
        times = [triton.testing.do_bench(launch) for launch in launches]
        _FASTEST[key] = times.index(min(times))
    launches[_FASTEST[key]]()


_RESIDENT = {}


def persistent_grid(kernel, n_items, args, scratch=0, **kwargs):
    """Programs for a persistent launch of ``kernel[grid](*args, **kwargs)``: as many as the
    GPU holds at once (limited by the compiled kernel's registers, shared memory and
    threads, as in Triton's fused-softmax tutorial), at most ``n_items``; with ``scratch``
    bytes a program, no more than keep all of it within half the L2 cache, but one a
    multiprocessor at least. Each program loops over items, so per-program scratch stays
    small and hot in cache. The interpreter runs two (one by one), so that the loop over
    items, and the reuse of the scratch, are tested there too; the static recorder one an
    item (as a GPU that holds them all would)."""
    if recorder is not None:
        return n_items
    if interpreted(kernel):
        return min(n_items, 2)
    device = args[0].device
    key = (kernel.fn.__name__, device.index, args[0].dtype, scratch,
           tuple(sorted(kwargs.items())))
    if key not in _RESIDENT:
        compiled = _loaded(kernel, args, kwargs)
        props = triton.runtime.driver.active.utils.get_device_properties(device.index)
        threads = kwargs["num_warps"] * props["warpSize"]
        gpu = torch.cuda.get_device_properties(device)
        per_sm = min(props["max_num_regs"] // max(compiled.n_regs * threads, 1),
                     props["max_shared_mem"] // max(compiled.metadata.shared, 1),
                     gpu.max_threads_per_multi_processor // threads)
        programs = max(per_sm, 1) * props["multiprocessor_count"]
        if scratch:
            programs = min(programs, max(gpu.L2_cache_size // 2 // scratch,
                                         props["multiprocessor_count"]))
        _RESIDENT[key] = programs
    return min(n_items, _RESIDENT[key])
