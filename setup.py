"""Builds efficientvit_kernels._C from csrc/ against the torch already installed (metadata:
pyproject.toml).

CPU kernels always; CUDA kernels (csrc/cuda/*.cu) where torch has CUDA and nvcc is found.
Install with ``pip install --no-build-isolation .`` (``-e .`` for a checkout you edit) so the
build reuses the installed torch; the wheel then requires that torch's minor version, the one
its binary links against. Environment: EFFICIENTVIT_CUDA=0 skips the CUDA kernels,
EFFICIENTVIT_NATIVE=1 compiles the CPU kernels for the build machine only (-march=native, one
instruction-set level) instead of for every level with the best chosen at run time (the
default: the binary runs on any x86-64; see csrc/cpu/isa.h). The CUDA kernels are
built for sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST is set (e.g. "9.0" for an H100/H200):
then for exactly that list, as torch's CUDAExtension builds it (one architecture builds faster).
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Making an sdist (or only its metadata) compiles nothing and needs no torch.
SOURCE_ONLY = any(command in sys.argv for command in ("sdist", "egg_info")) and not any(
    command in sys.argv for command in ("bdist_wheel", "build_ext", "develop", "editable_wheel"))


def _can_build_wheels():
    """setuptools builds wheels itself from 70.1 on; before, with the wheel package only."""
    import setuptools
    try:
        import wheel  # noqa: F401
        return True
    except ImportError:
        return tuple(int(v) for v in setuptools.__version__.split(".")[:2]) >= (70, 1)


if not SOURCE_ONLY and not _can_build_wheels():  # pip would fail later with "invalid command"
    import setuptools
    sys.exit(f"building a wheel with setuptools {setuptools.__version__} needs the wheel package: "
             "`pip install wheel` (or setuptools>=70.1), then install again with "
             "--no-build-isolation")

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    if not SOURCE_ONLY:
        sys.exit("efficientvit_kernels compiles against your installed torch, which this build "
                 "cannot import: use `pip install --no-build-isolation .` (an isolated build "
                 "would compile against a second torch, downloaded for the build, not the one "
                 "your Python runs), after installing torch if it is not")
    torch = None


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _with_cuda():
    if os.environ.get("EFFICIENTVIT_CUDA", "1") == "0":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _loaded_libstdcxx():
    """The libstdc++ this process (Python, torch) runs with, as a link input, on Linux. A
    compiler with a libstdc++ of its own that links it statically (one in /opt, say) would put a
    second copy in _C: its locale facets are numbered apart from the process's, so formatting a
    number into a C++ error message calls the wrong facet (lost digits, or a crash). Linked
    first, this one defines every symbol it has, and only its SONAME is recorded."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:
        return []
    return sorted(paths)[:1]


def _extension():
    with_cuda = _with_cuda()
    cxx = ["-O3", "-fopenmp"]
    if os.environ.get("EFFICIENTVIT_NATIVE", "0") == "1":
        cxx += ["-march=native", "-DEFFICIENTVIT_NATIVE"]
    sources = _sources("csrc/efficientvit.cpp") + _sources("csrc/python_module.cpp") + _sources(
        "csrc/cpu/*.cpp")
    args = dict(
        name="efficientvit_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=_loaded_libstdcxx() + ["-fopenmp"],
        py_limited_api=False,
    )
    if not with_cuda:
        return cpp_extension.CppExtension(**args)
    args["sources"] = sources + _sources("csrc/cuda/*.cu")
    nvcc = ["-O3", "--use_fast_math", "-std=c++17"]
    # torch adds -gencode flags for TORCH_CUDA_ARCH_LIST only where none are given here
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    args["extra_compile_args"]["nvcc"] = nvcc
    return cpp_extension.CUDAExtension(**args)


def _torch_requirement():
    """The torch a built binary works with: the minor version it was compiled against (libtorch
    keeps no binary compatibility across minor versions). An sdist builds against any torch
    from 2.4 on."""
    if torch is None or SOURCE_ONLY:
        return "torch>=2.4"
    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


setup(
    ext_modules=[] if torch is None else [_extension()],
    cmdclass={} if torch is None else {"build_ext": cpp_extension.BuildExtension},
    install_requires=[_torch_requirement()],
)
