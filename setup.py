"""Builds efficientvit_kernels._C from csrc/ against the torch already installed.

CPU kernels always; CUDA kernels (csrc/cuda/*.cu) where torch has CUDA and nvcc is found.
Install with ``pip install --no-build-isolation -e .`` so the build reuses the installed torch.
Environment: EFFICIENTVIT_CUDA=0 skips the CUDA kernels, EFFICIENTVIT_PORTABLE=1 builds
the CPU kernels without -march=native. The CUDA kernels are built for sm_80 and sm_90 unless
TORCH_CUDA_ARCH_LIST is set (e.g. "9.0" for an H100/H200): then for exactly that list, as
torch's CUDAExtension builds it (one architecture builds faster).
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _with_cuda():
    if os.environ.get("EFFICIENTVIT_CUDA", "1") == "0":
        return False
    import torch
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    with_cuda = _with_cuda()
    cxx = ["-O3", "-fopenmp", "-DEFFICIENTVIT_PYTHON_MODULE"]
    if os.environ.get("EFFICIENTVIT_PORTABLE", "0") != "1":
        cxx.append("-march=native")
    sources = _sources("csrc/efficientvit.cpp") + _sources("csrc/cpu/*.cpp")
    args = dict(
        name="efficientvit_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
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


setup(
    name="efficientvit_kernels",
    version="0.1.0",
    description="Fused kernels for EfficientViT (cascaded group attention) and a PyTorch reference",
    packages=find_packages(include=["efficientvit_kernels", "efficientvit_kernels.*",
                                    "python_ref", "python_ref.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
)
