"""Shared fixtures. ``backend``: every implementation of the fused ops this machine can run,
so each op's tests (tests/test_cga.py, test_dwconv.py, test_ffn.py) run the same cases on
each: the CPU kernels, the Triton kernels in Triton's interpreter (no GPU) or on the GPU, the
CUDA kernels in the CPU emulation (tests/emulation) or on the GPU."""
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
    """One implementation of cga, dwconv and ffn: ``ops`` has the three, with the public ops'
    arguments; ``dispatcher`` says whether they are torch.ops.efficientvit itself (so opcheck
    applies); ``slow`` backends (interpreted, emulated) take the small cases only."""
    name: str
    device: str
    dtypes: tuple
    ops: object
    dispatcher: bool = False
    slow: bool = False

    def dtype(self, name):
        """The dtype named (testing.DTYPES); skips the test where this backend lacks it."""
        dtype = DTYPES[name]
        if dtype not in self.dtypes:
            pytest.skip(f"{self.name} takes {[str(t)[6:] for t in self.dtypes]}")
        return dtype

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


@pytest.fixture(params=BACKENDS)
def backend(request):
    import efficientvit_kernels as K
    name = request.param
    if name == "cpu":
        return Backend("cpu", "cpu", (torch.float32, torch.float64), torch.ops.efficientvit,
                       dispatcher=True)
    if name == "triton":
        kernels = _triton()
        if kernels is None:
            pytest.skip("triton is not installed")
        if GPU:  # the dispatcher's CUDA kernels where the CUDA ones were not built
            return Backend("triton", "cuda", GPU_DTYPES, kernels,
                           dispatcher=not K.ops.has_compiled_kernels("cuda"))
        return Backend("triton (interpreter)", "cpu", (torch.float32,), kernels, slow=True)
    if GPU:
        if not K.ops.has_compiled_kernels("cuda"):
            pytest.skip("the CUDA kernels were not built")
        return Backend("cuda", "cuda", GPU_DTYPES, torch.ops.efficientvit, dispatcher=True)
    return Backend("cuda (emulated)", "cpu", GPU_DTYPES, EmulatedCuda(request.getfixturevalue("emul")),
                   slow=True)
