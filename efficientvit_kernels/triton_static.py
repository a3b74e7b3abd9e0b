"""Static resource profile of the Triton kernels, without a GPU: every specialization the
launchers produce, compiled ahead of time for sm_80 / sm_90, and what its cubin holds.

``recording()`` makes the launchers (``efficientvit_kernels.triton``) record their launches on
meta tensors instead of running them; an autotuned kernel records one launch per config that
survives its pruning. ``model_launches`` runs converted M0-M5 models through them, so the
specializations are the ones real inputs produce. ``compile_launch`` builds one for a target
with Triton's own binder (the same specialization of arguments as a launch on a GPU) and
``profile`` reads registers and stack from ``cuobjdump -res-usage``, shared memory from Triton's
metadata, and the instruction mix from the SASS (``cuda_static.sass_stats``). The rows have the
columns of ``cuda_static``'s, so one gate (``cuda_static.resource_violations``) and one table
serve both backends. cuobjdump does not report spills as such; a Triton kernel has no arrays
of its own in local memory, so its stack frame (``stack_bytes``) is its spilled registers.

Needs Triton's compiler, not its interpreter: run it where ``TRITON_INTERPRET`` is unset (the
command line below; the tests start it in a subprocess).

A row depends on its launch's variant and on the code ``sources_digest`` hashes (the Triton
kernels, their launchers and this profiler, with Triton's version). ``--reuse`` takes the rows
of an earlier result made from the same sources (benchmarks/results/gpu_static.json) instead
of compiling their variants again: only new variants compile.

    python -m efficientvit_kernels.triton_static --arch 90 80 --json out.json [--reuse old.json]
"""
import argparse
import collections
import concurrent.futures
import contextlib
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

__all__ = ["recording", "model_launches", "unique_launches", "compile_launch", "profile",
           "profiles"]

MODELS = ("m0", "m1", "m2", "m3", "m4", "m5")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (batch, image size): batch 1 and the paper's 2048 at 224x224, and 288x288, where every stage
# has windows cut by the map's edge (18 and 9 pixels in 7-pixel windows, 5 in 4-pixel ones).
INPUTS = ((1, 224), (2048, 224), (2, 288))

# grid: the launch's grid (programs along each axis), as the launcher asked for it
Launch = collections.namedtuple("Launch", "kernel args kwargs grid", defaults=(None,))


PACKAGE = os.path.dirname(os.path.abspath(__file__))
# What a profile row depends on beyond its launch's variant
SOURCES = ("triton/*.py", "triton_static.py", "cuda_static.py")


def sources_digest():
    """sha256 of the files in SOURCES (under the package) and Triton's version."""
    import triton
    digest = hashlib.sha256(triton.__version__.encode())
    for pattern in SOURCES:
        for path in sorted(glob.glob(os.path.join(PACKAGE, pattern))):
            digest.update(os.path.relpath(path, PACKAGE).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _triton():
    from . import triton as kernels
    if not kernels.available():
        raise RuntimeError("compiling the Triton kernels needs triton, which is not installed")
    from .triton import _common
    if _common.interpreted(sys.modules[kernels.cga.__module__]._cga_kernel):
        raise RuntimeError("the Triton kernels were built for the interpreter (TRITON_INTERPRET "
                           "is set): compile them in a process without it")
    return _common


@contextlib.contextmanager
def recording():
    """Within: launches of the library's Triton kernels append a ``Launch`` to the yielded
    list instead of running (tensors may be on the meta device; outputs stay unwritten)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    common = _triton()
    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        if callable(grid):  # of the launch's arguments, constexprs included
            grid = grid({**dict(zip(self.arg_names, args)), **kwargs})
        launches.append(Launch(self, args, kwargs, tuple(grid)))

    def run_configs(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    saved = JITFunction.run, Autotuner.run, common.recorder
    JITFunction.run, Autotuner.run, common.recorder = run, run_configs, launches
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run, common.recorder = saved


def model_launches(models=MODELS, dtypes=DTYPES, inputs=INPUTS):
    """The launches of the Triton-converted python_ref models on meta tensors, for every
    model, dtype, (batch, size) and both memory formats (contiguous and channels-last); each
    model converted with every pass and without "dwconv_ffn" (its dwconv and ffn apart, as
    backend "auto" runs them)."""
    import python_ref
    from .convert import PASSES, convert
    launches = []
    unpaired = [p for p in PASSES if p != "dwconv_ffn"]
    for name, passes in itertools.product(models, (PASSES, unpaired)):
        fused = convert(getattr(python_ref, f"efficientvit_{name}")().eval(), backend="triton",
                        passes=passes)
        for dtype in dtypes:
            model = fused.to(device="meta", dtype=dtype)
            for batch, size in inputs:
                for fmt in (torch.contiguous_format, torch.channels_last):
                    x = torch.empty(batch, 3, size, size, device="meta", dtype=dtype,
                                    memory_format=fmt)
                    with recording() as recorded, torch.no_grad():
                        model(x)
                    launches += recorded
    return launches


def _target(arch):
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", arch, 32)


_BINDERS = {}  # (kernel, arch) -> (backend, binder)


def _specialize(launch, arch):
    """(binder's bound args, specialization, options) of a launch, as Triton's launcher
    computes them on a GPU of sm_``arch``."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    key = (launch.kernel, arch)
    if key not in _BINDERS:
        backend = make_backend(_target(arch))
        _BINDERS[key] = backend, create_function_from_signature(
            launch.kernel.signature, launch.kernel.params, backend)
    backend, binder = _BINDERS[key]
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    return backend, kwargs, binder(*launch.args, **kwargs)


def launch_key(launch, arch):
    """What Triton's cache keys a compilation of the launch for sm_``arch`` on (the kernel, its
    specialization of the arguments, its options), hashed short."""
    _, _, (_, specialization, options) = _specialize(launch, arch)
    options = str(sorted(options.items())) if isinstance(options, dict) else str(options)
    key = f"{launch.kernel.fn.__qualname__} {specialization} {options} {arch}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def unique_launches(launches, arch=90):
    """One launch per distinct compiled kernel (``launch_key``)."""
    seen = {}
    for launch in launches:
        seen.setdefault(launch_key(launch, arch), launch)
    return list(seen.values())


def compile_launch(launch, arch):
    """The launch's kernel compiled for sm_``arch`` (a triton CompiledKernel)."""
    import triton
    from triton.compiler import ASTSource
    backend, kwargs, (bound_args, specialization, options) = _specialize(launch, arch)
    options, signature, constexprs, attrs = launch.kernel._pack_args(
        backend, kwargs, bound_args, specialization, options)
    src = ASTSource(launch.kernel, signature, constexprs, attrs)
    return triton.compile(src, target=_target(arch), options=options.__dict__)


_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def variant(launch):
    """A short name for a launch's specialization: its dtype and constexpr values."""
    kernel = launch.kernel
    names = [p.name for p in kernel.params]
    dtype = next(str(a.dtype).split(".")[-1] for a in launch.args if isinstance(a, torch.Tensor))
    consts = {**dict(zip(names, launch.args)), **launch.kwargs}
    shown = [f"{p.name}={consts[p.name]}" for p in kernel.params
             if p.is_constexpr and p.name in consts]
    shown += [f"{k}={v}" for k, v in launch.kwargs.items()
              if k in ("num_warps", "num_stages", "maxnreg")]
    strides = [f"{n}={consts[n]}" for n in names if re.fullmatch(r"s[xo][bchw]", n)
               and consts.get(n) == 1]
    return " ".join([dtype] + shown + strides)


def _cuobjdump(compiled, what):
    from .cuda_static import cuobjdump_path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([cuobjdump_path(), what, f.name], capture_output=True, text=True,
                              check=True).stdout


def _resource_usage(compiled):
    """(registers, stack bytes, static shared bytes) of a compiled kernel."""
    registers, stack, static_shared, _ = map(
        int, _RES_USAGE.search(_cuobjdump(compiled, "-res-usage")).groups())
    return registers, stack, static_shared


def as_launched(launch, arch):
    """The launch as its launcher makes it on a GPU of sm_``arch``: for the kernels whose
    launchers cap registers (``REGISTER_CAPPED``), with the cap ``capped_registers`` chooses
    from this target's compiles."""
    common = _triton()
    if launch.kernel.fn.__name__ not in common.REGISTER_CAPPED:
        return launch

    def compile(kwargs):
        return _resource_usage(compile_launch(launch._replace(kwargs=kwargs), arch))[:2]

    return launch._replace(kwargs=common.capped_registers(dict(launch.kwargs), compile))


def profile(launch, arch):
    """One profile row (cuda_static's columns) of a launch compiled for sm_``arch``, as its
    launcher makes it there (``as_launched``)."""
    from .cuda_static import occupancy, sass_stats
    key = launch_key(launch, arch)
    start = time.perf_counter()
    compile_launch(launch, arch)  # timed: one compilation (a register cap may cost another)
    seconds = time.perf_counter() - start
    launch = as_launched(launch, arch)
    compiled = compile_launch(launch, arch)  # from Triton's cache
    registers, stack, static_shared = _resource_usage(compiled)
    sass = _cuobjdump(compiled, "-sass")
    (stats,) = sass_stats(sass).values()
    threads = compiled.metadata.num_warps * 32
    shared = compiled.metadata.shared  # what the launch asks for: static and dynamic
    return {
        "backend": "triton", "source": launch.kernel.fn.__module__,
        "kernel": launch.kernel.fn.__name__, "variant": variant(launch), "arch": arch,
        "launch_key": key, "registers": registers, "stack_bytes": stack, "spill_store_bytes": None,
        "spill_load_bytes": None, "static_shared_bytes": static_shared,
        "dynamic_shared_bytes": max(shared - static_shared, 0), "threads": threads,
        "blocks_per_sm": occupancy(registers, threads, max(shared, static_shared), arch),
        "sass_instructions": stats["instructions"],
        "tensor_core_instructions": stats["tensor_core"],
        "warpgroup_mma_instructions": stats["warpgroup_mma"],
        "local_memory_instructions": stats["local_memory"],
        "widest_global_load_bits": stats["widest_global_load_bits"],
        "widest_global_store_bits": stats["widest_global_store_bits"],
        "cp_async": stats["cp_async"], "ldmatrix": stats["ldmatrix"],
        "mma_loop_density": stats["mma_loop_density"],
        "compile_seconds": round(seconds, 2),
    }


_WORK = []  # (launch, arch) per task, inherited by the forked workers


def _profile_task(i):
    launch, arch = _WORK[i]
    try:
        return profile(launch, arch)
    except Exception as e:  # a compile error is a finding, reported in its row
        return {"backend": "triton", "source": launch.kernel.fn.__module__,
                "kernel": launch.kernel.fn.__name__, "variant": variant(launch), "arch": arch,
                "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"}


def profiles(launches, archs=(90, 80), jobs=None, reuse=()):
    """Profile rows of every distinct launch for each arch, compiled in ``jobs`` processes;
    ``reuse``: rows made from the same sources (``sources_digest``), taken as they are for
    their variants."""
    known = {r["launch_key"]: r for r in reuse}
    tasks = [(launch, arch) for arch in archs for launch in unique_launches(launches, arch)]
    rows = [known.get(launch_key(launch, arch)) for launch, arch in tasks]
    _WORK[:] = [task for task, row in zip(tasks, rows) if row is None]
    jobs = jobs or os.cpu_count()
    if jobs == 1 or len(_WORK) < 2:
        compiled = [_profile_task(i) for i in range(len(_WORK))]
    else:
        with concurrent.futures.ProcessPoolExecutor(
                jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            compiled = list(pool.map(_profile_task, range(len(_WORK))))
    compiled = iter(compiled)
    return [row or next(compiled) for row in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--json", help="write the rows here (else a table to stdout)")
    parser.add_argument("--reuse", help="an earlier result (its triton_sources or sources key "
                        "the digest of these sources): its rows are not compiled again")
    args = parser.parse_args()
    start = time.perf_counter()
    sources = sources_digest()
    reuse = []
    if args.reuse:
        with open(args.reuse) as f:
            earlier = json.load(f)
        if earlier.get("triton_sources", earlier.get("sources")) == sources:
            reuse = [r for r in earlier["rows"] if "launch_key" in r and "error" not in r]
    rows = profiles(model_launches(args.models), args.arch, args.jobs, reuse)
    if args.json:
        import triton
        reused = {id(r) for r in reuse}
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "sources": sources,
                       "seconds": time.perf_counter() - start,
                       "compiled": sum(id(r) not in reused for r in rows), "rows": rows},
                      f, indent=1)
    else:
        from .cuda_static import format_profiles
        print(format_profiles(rows))


if __name__ == "__main__":
    main()
