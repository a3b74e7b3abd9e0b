"""Shared fixtures. ``backend``: every implementation of the fused ops this machine can run,
so each op's tests (tests/test_cga.py, test_dwconv.py, test_ffn.py) run the same cases on
each: the CPU kernels, the Triton kernels in Triton's interpreter (no GPU) or on the GPU, the
CUDA kernels in the CPU emulation (tests/emulation) or on the GPU. ``patch_ops_backend``: the
same for patch_embed, conv1x1 and squeeze_excite, which have CPU and Triton kernels."""
import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/timm_stub.py
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in the interpreter; read when they are decorated,
    # so it must be set before any test module imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from efficientvit_kernels.testing import DTYPES  # noqa: E402  (imports triton: after the above)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = torch.cuda.is_available()
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of the fused ops: ``ops`` has them (cga, dwconv, ffn, dwconv_ffn; from
    ``patch_ops_backend``, patch_embed, conv1x1 and squeeze_excite too), with the public ops'
    arguments; ``dispatcher`` says whether they are torch.ops.efficientvit itself (so opcheck
    applies); ``slow`` backends (interpreted, emulated) take the small cases only."""
    name: str
    device: str
    dtypes: tuple
    ops: object
    dispatcher: bool = False
    slow: bool = False

    def skip_unless_small(self, small):
        if self.slow and not small:
            pytest.skip(f"{self.name} is slow: small cases only")


class EmulatedCuda:
    """The emulated CUDA ops with the public ops' arguments (threads in forward order, the
    real shared-memory target)."""

    def __init__(self, ops):
        self._ops = ops

    def cga(self, x, *args):
        return self._ops.cga(x, *args, 0, 0, self._ops.smem_target())

    def dwconv(self, x, *args):
        return self._ops.dwconv(x, *args, 0, 0)

    def ffn(self, x, *args):
        return self._ops.ffn(x, *args, 0, 0, self._ops.smem_target())

    def dwconv_ffn(self, x, dw_weight, dw_bias, *ffn):
        """The CUDA backend's dwconv_ffn: its dwconv and ffn kernels in turn (ops.py)."""
        return self.ffn(self.dwconv(x, dw_weight, dw_bias, False, True), *ffn, True)


def build_emulation(name, root, build_dir):
    """Compiles the emulated CUDA ops from ``root``'s csrc/ and tests/emulation/ into
    ``build_dir`` and returns their torch.ops namespace (named ``name``)."""
    from torch.utils import cpp_extension
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(
        name=name, sources=[os.path.join(root, "tests", "emulation", "emulated_ops.cpp")],
        extra_include_paths=[os.path.join(root, p)
                             for p in ("csrc", "csrc/cuda", "tests/emulation")],
        # the kernels pun packed 16-bit pairs through uint32_t, which nvcc allows
        extra_cflags=["-O1", "-fno-strict-aliasing", "-DEFFICIENTVIT_EMULATION"],
        build_directory=build_dir, is_python_module=False)
    return getattr(torch.ops, name)


@pytest.fixture(scope="session")
def emul():
    """The emulated CUDA ops, built once (cached in build/emulation or $EFFICIENTVIT_EMUL_BUILD)."""
    build_dir = os.environ.get("EFFICIENTVIT_EMUL_BUILD", os.path.join(ROOT, "build", "emulation"))
    return build_emulation("efficientvit_emul", ROOT, build_dir)


def _triton():
    try:
        import efficientvit_kernels.triton as kernels
    except ImportError:
        return None
    return kernels if kernels.available() else None


BACKENDS = ["cpu", "triton", "cuda"]
PATCH_OPS_BACKENDS = ["cpu", "triton"]


def backend_dtypes(name):
    """The dtypes backend ``name`` runs on this machine (known before any is built)."""
    if name == "cpu":
        return (torch.float32, torch.float64)
    return GPU_DTYPES if GPU or name == "cuda" else (torch.float32,)  # the interpreter: fp32


def pytest_collection_modifyitems(config, items):
    """A (backend, dtype) pair that does not exist here is left out, not collected as a skip."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = params.get("backend", params.get("patch_ops_backend"))
        absent = (name is not None and params.get("dtype") in DTYPES
                  and DTYPES[params["dtype"]] not in backend_dtypes(name))
        (drop if absent else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _backend(request, name):
    import efficientvit_kernels as K
    if name == "cpu":
        return Backend("cpu", "cpu", backend_dtypes(name), torch.ops.efficientvit, dispatcher=True)
    if name == "triton":
        kernels = _triton()
        if kernels is None:
            pytest.skip("triton is not installed")
        if GPU:  # the dispatcher's CUDA kernels where the CUDA ones were not built
            return Backend("triton", "cuda", backend_dtypes(name), kernels,
                           dispatcher=not K.ops.has_compiled_kernels("cuda"))
        return Backend("triton (interpreter)", "cpu", backend_dtypes(name), kernels, slow=True)
    if GPU:
        if not K.ops.has_compiled_kernels("cuda"):
            pytest.skip("the CUDA kernels were not built")
        return Backend("cuda", "cuda", backend_dtypes(name), torch.ops.efficientvit, dispatcher=True)
    return Backend("cuda (emulated)", "cpu", backend_dtypes(name),
                   EmulatedCuda(request.getfixturevalue("emul")), slow=True)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return _backend(request, request.param)


@pytest.fixture(params=PATCH_OPS_BACKENDS)
def patch_ops_backend(request):
    """A backend with kernels of its own for patch_embed, conv1x1 and squeeze_excite (the CUDA
    backend runs the last two's plain-PyTorch definition, and patch_embed's convolutions in
    cuDNN: tests/test_gpu.py and test_cuda_emul.py test its kernel)."""
    return _backend(request, request.param)
