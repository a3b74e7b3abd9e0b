"""The CUDA sources compile with nvcc for sm_80 and sm_90, also on machines without a GPU.

setup.py builds csrc/cuda/*.cu only where torch has CUDA, so on a CPU-only CI machine a
syntax or type error in them would land unnoticed; this test compiles each file (`nvcc -c`)
with the flags torch's extension build uses. Skipped only when nvcc is not installed.
"""
import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
ARCHS = ("80", "90")


def _nvcc():
    home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = os.path.join(home, "bin", "nvcc") if home else None
    return candidate if candidate and os.path.exists(candidate) else shutil.which("nvcc")


def _flags():
    # What torch.utils.cpp_extension.BuildExtension passes nvcc for setup.py's CUDAExtension
    # (COMMON_NVCC_FLAGS disable the implicit half conversions, as in torch's own build),
    # plus setup.py's own nvcc flags.
    flags = [f"-I{p}" for p in cpp_extension.include_paths()]
    flags += [f"-I{os.path.join(ROOT, 'csrc')}", "-std=c++17", "-O3", "--use_fast_math",
              "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              "--compiler-options", "-fPIC", "--resource-usage"]
    flags += [f for f in cpp_extension.COMMON_NVCC_FLAGS if f not in flags]
    if "--expt-relaxed-constexpr" not in flags:
        flags.append("--expt-relaxed-constexpr")
    # A CPU-only torch ships c10/cuda headers but not the header its CMake build generates
    # (it only holds the Windows export switch); tell c10 to go without it.
    generated = os.path.join(cpp_extension.include_paths()[0], "c10", "cuda", "impl",
                             "cuda_cmake_macros.h")
    if not os.path.exists(generated):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for arch in ARCHS:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def _compile(nvcc, source, out_dir):
    obj = os.path.join(out_dir, os.path.basename(source) + ".o")
    start = time.perf_counter()
    proc = subprocess.run([nvcc, "-c", source, "-o", obj, *_flags()], capture_output=True,
                          text=True)
    return source, proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def test_cuda_sources_compile():
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    assert SOURCES, "no csrc/cuda/*.cu found"
    with tempfile.TemporaryDirectory() as out_dir:
        # two workers: CI has two cores, and one nvcc call is mostly single-threaded
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(lambda s: _compile(nvcc, s, out_dir), SOURCES))
    failed = []
    for source, code, output, seconds in results:
        name = os.path.relpath(source, ROOT)
        # the resource report (registers, shared memory, spills) is kept for reading under -s
        print(f"--- {name}: exit {code}, {seconds:.0f} s", file=sys.stderr)
        print(output, file=sys.stderr)
        if code != 0:
            failed.append(f"{name} (exit {code}):\n{output[-4000:]}")
    assert not failed, "nvcc failed:\n" + "\n".join(failed)
