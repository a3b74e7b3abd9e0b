"""Compiles, before the GPU check's tests, every Triton specialization its quick tests, smoke
run and timed models launch, in parallel processes, into the Triton cache the check's steps share
(TRITON_CACHE_DIR), so that they load kernels instead of compiling them, each test worker on
its own (in the first H200 run the tests did not finish in their 168 s, and the smoke and
sanitizer steps ran out of time compiling).

The launches are recorded on meta tensors (efficientvit_kernels.triton_static.recording) from
the quick cases of tests/test_gpu.py, the smoke run (bench_gpu.smoke_calls) and the models
the check times; the distinct ones are
split among --jobs processes, each of which compiles its share on the GPU: the register limit
the launcher would choose (launch_kwargs, for the kernels that cap registers) and
JITFunction.warmup, on empty CUDA tensors of the recorded shapes and strides. Where a test's
tensor is a view at an offset (so aligned otherwise), its launch compiles again there.
tests/test_gpu_budget.py counts these launches without a GPU and holds them to the check's time.

    python benchmarks/gpu_precompile.py [--jobs 16] [--models-only]
"""
import argparse
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "benchmarks")]

# The models the check times, fp16, at its batches and the profile mode's 256 (gpu_check.sh).
from bench_models_gpu import BATCHES, MODELS, RESOLUTION  # noqa: E402
MODEL_INPUTS = tuple((batch, RESOLUTION) for batch in sorted({*BATCHES, 256}))


def _meta(shape, dtype, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, device="meta", dtype=dtype, memory_format=fmt)


def _test_cases():
    """Calls the Triton ops as the quick GPU tests do (their parameter lists), on meta tensors."""
    import test_gpu as t
    from efficientvit_kernels import triton as k
    from efficientvit_kernels.testing import (cast, cga_args, random_cga_params,
                                              random_dwconv_params, random_ffn_params,
                                              random_patch_embed_params, stage_shapes)

    def cga(C, heads, kernels, window, shape, dtype, channels_last=False, key_dim=16,
            residual=True):
        p = cast(random_cga_params(C, heads, kernels, window, key_dim=key_dim), dtype, "meta")
        k.cga(_meta(shape, dtype, channels_last), *cga_args(p), residual)

    def params(make, dtype, *args):
        return [x.to("meta", dtype) for x in make(*args)]

    for dtype in t.quick(t.DTYPES):
        for _, C, heads, kernels, window in stage_shapes():
            if dtype in t.quick(t.STAGE_DTYPES):
                cga(C, heads, kernels, window, (2, C) + {7: (14, 14), 4: (4, 4)}[window], dtype,
                    channels_last=True)
        for window, H, W in t.quick(t.CGA_PADDED):
            for cl in (False, True):
                cga(64, 4, (7, 5, 3, 3), window, (3, 64, H, W), dtype, cl)
        for batch in (1, 16):
            for residual in (True, False):
                cga(48, 3, (7, 5, 3), 7, (batch, 48, 9, 11), dtype, residual=residual)
        for heads, kernels, kd in t.quick(t.CGA_HEADS):
            cga(heads * 12, heads, kernels, 7, (2, heads * 12, 7, 9), dtype, key_dim=kd)
        p = cast(random_cga_params(32, 2, (5, 5), 7), dtype, "meta")  # a strided x
        k.cga(_meta((2, 32, 16, 12), dtype)[:, :, 1:, ::2], *cga_args(p), True)
        cga(32, 2, (5, 5), 7, (1, 32, 7, 7), dtype)  # test_cga_nan_propagates'
        for C, M in ((8, 16), (64, 128)):  # test_dwconv_ffn_nan_and_empty, graph capture
            w, b = params(random_dwconv_params, dtype, C)
            k.dwconv(_meta((4, C, 14, 14), dtype), w, b, True, C == 64)
            ws = params(random_ffn_params, dtype, C, M)
            k.ffn(_meta((4, C, 14, 14), dtype), *ws, C == 64)
        w, b = params(random_dwconv_params, dtype, 64)  # graph capture
        k.dwconv_ffn(_meta((4, 64, 14, 14), dtype), w, b, *ws)
        cga(64, 4, (7, 5, 3, 3), 7, (4, 64, 14, 14), dtype)  # test_cuda_graph_capture's
        for C, K in t.quick(t.DWCONV_CHANNELS):
            w, b = params(random_dwconv_params, dtype, C, K)
            for H, W in t.quick(t.DWCONV_SIZES):
                for cl in (False, True):
                    for relu in (False, True):
                        for residual in (False, True):
                            k.dwconv(_meta((2, C, H, W), dtype, cl), w, b, relu, residual)
        for C, M in t.quick(t.FFN_CHANNELS):
            ws = params(random_ffn_params, dtype, C, M)
            w, b = params(random_dwconv_params, dtype, C)
            for B, H, W in t.quick(t.FFN_SIZES):
                for cl in (False, True):
                    for residual in (False, True):
                        k.ffn(_meta((B, C, H, W), dtype, cl), *ws, residual)
                    k.dwconv_ffn(_meta((B, C, H, W), dtype, cl), w, b, *ws)
        for cl in (False, True):
            for channels in t.quick(t.PATCH_EMBED_CHANNELS):
                ws, bs = ([x.to("meta", dtype) for x in xs]
                          for xs in random_patch_embed_params(channels))
                k.patch_embed(_meta((2, 3, 61, 48), dtype, cl), ws, bs, False)
            for C, Co, depthwise in t.quick(t.CONV1X1_CHANNELS):
                w, b = params(random_ffn_params, dtype, C, Co)[:2]
                dw = params(random_dwconv_params, dtype, Co) if depthwise else []
                k.conv1x1(_meta((2, C, 15, 14), dtype, cl), w, b, True, *dw)
            for C, R in t.quick(t.SQUEEZE_EXCITE_CHANNELS):
                k.squeeze_excite(_meta((2, C, 7, 7), dtype, cl), *params(random_ffn_params,
                                                                          dtype, C, R))


def _smoke_cases():
    """Calls the Triton ops as the smoke run does (bench_gpu.smoke_calls: the memcheck and
    racecheck steps run it, too slowly under the sanitizers to compile there)."""
    import bench_gpu
    from efficientvit_kernels import triton as k
    for op, args, _ in bench_gpu.smoke_calls("meta"):
        getattr(k, op)(*args)


def recorded(models_only):
    """(the quick tests' and smoke run's launches, none if ``models_only``; the timed models'
    launches), recorded on meta tensors."""
    from efficientvit_kernels import triton_static as s
    tests = []
    if not models_only:
        with s.recording() as tests:
            _test_cases()
            _smoke_cases()
        tests += s.model_launches(("m0",), (torch.float16,), ((2, 64),))  # test_converted_model's
    models = s.model_launches(MODELS, (torch.float16,), MODEL_INPUTS)
    return tests, models


def _signature(launch):
    """A launch's arguments as plain values: launches alike in these compile alike."""
    def arg(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", a.dtype, tuple(a.shape), a.stride())
        return a
    return (launch.kernel.fn.__name__, tuple(arg(a) for a in launch.args),
            tuple(sorted(launch.kwargs.items())))


def distinct(launches, arch):
    """One launch per compilation for sm_``arch`` (triton_static.launch_key, which follows
    Triton's own specialization; where this Triton's internals differ from what it follows,
    one per distinct signature: more launches, each compilation still once per process)."""
    from efficientvit_kernels import triton_static as s
    try:
        key = lambda launch: s.launch_key(launch, arch)  # noqa: E731
        key(launches[0])
    except Exception as e:  # noqa: BLE001
        print(f"grouping by signature ({type(e).__name__}: {e})")
        key = _signature
    seen = {}
    for launch in launches:
        seen.setdefault(key(launch), launch)
    return list(seen.values())


def compile_on_gpu(launch):
    """The launch compiled as its launcher would compile it on this GPU, into the cache."""
    from efficientvit_kernels.triton._common import REGISTER_CAPPED, launch_kwargs
    args = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda")
            if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = launch.kwargs
    if launch.kernel.fn.__name__ in REGISTER_CAPPED:
        kwargs = launch_kwargs(launch.kernel, args, kwargs)  # compiles the choices it weighs
    launch.kernel.warmup(*args, grid=(1,), **kwargs)


def compile_share(shard, jobs, models_only, started):
    # One thread each: the workers share the cores, and 16 of them each running torch's thread
    # pool on 16 cores to record the launches took 97 s on the H200 machine (here: 8 workers
    # on 2 cores, 37 s with two threads each, 21 s with one).
    torch.set_num_threads(1)
    tests, models = recorded(models_only)
    major, minor = torch.cuda.get_device_capability()
    # the models' first: a step stopped by its time leaves what the models step times compiled
    launches = distinct(models + tests, 10 * major + minor)[shard::jobs]
    print(f"shard {shard}/{jobs}: {len(launches)} launches to compile after "
          f"{time.time() - started:.0f} s starting", flush=True)
    failed = []
    for i, launch in enumerate(launches):
        start = time.time()
        try:
            compile_on_gpu(launch)
        except Exception as e:  # noqa: BLE001  one launch failing must not stop the others
            failed.append(f"{launch.kernel.fn.__name__}: {type(e).__name__}: {str(e)[:200]}")
        torch.cuda.empty_cache()
        # each launch's time, so that a step stopped by its time still says where it went
        print(f"shard {shard}/{jobs}: {i + 1}/{len(launches)} {launch.kernel.fn.__name__} "
              f"{time.time() - start:.1f} s", flush=True)
    print(f"shard {shard}/{jobs}: {len(launches) - len(failed)} compiled, {len(failed)} failed "
          f"in {time.time() - started:.0f} s", flush=True)
    for line in failed[:5]:
        print("  " + line)
    return 1 if failed else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 16))
    parser.add_argument("--models-only", action="store_true",
                        help="only the models' launches (the profile mode's)")
    parser.add_argument("--shard", type=int, help=argparse.SUPPRESS)  # a worker's share
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)  # the workers' start
    args = parser.parse_args()
    if args.shard is not None:
        return compile_share(args.shard, args.jobs, args.models_only, args.started)
    start = time.time()
    workers = [subprocess.Popen([sys.executable, __file__, "--jobs", str(args.jobs),
                                 "--shard", str(i), "--started", str(start)]
                                + (["--models-only"] if args.models_only else []))
               for i in range(args.jobs)]
    status = max(w.wait() for w in workers)
    print(f"{args.jobs} processes done in {time.time() - start:.0f} s"
          + ("" if status == 0 else " (some launches failed: see above)"))
    return status


if __name__ == "__main__":
    sys.exit(main())
