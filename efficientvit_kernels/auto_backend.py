"""``backend="auto"`` on a GPU: each fused op call runs on the backend measured fastest for it.

The first call of an op with a new signature (op, device, dtype, shapes and layout of its
tensors, its flags) times every backend that can run it: the CUDA kernels (where built), the
Triton kernels (where triton imports) and the plain-PyTorch definition (backend "reference",
``python_ref.functional``: eager PyTorch, cuDNN and cuBLAS), and keeps the fastest. So a
converted model on ``auto`` is never slower, op by op, than eager PyTorch on the same ops.
The choices form a small table per device, kept for the process and in a JSON file per device
and library version (``$EFFICIENTVIT_CACHE_DIR``, else ``~/.cache/efficientvit_kernels``), so
later processes measure nothing already measured; a module called again on an input of the
same shape, dtype and strides skips the table.

Nothing is measured while a CUDA graph is captured or ``torch.compile`` / ``torch.export``
traces: under a capture, a signature already in the table runs its choice, any other the
dispatcher's kernel (``torch.ops.efficientvit``); under a trace, the dispatcher's kernel. On
CPU, ``auto`` is the CPU kernels and never comes here.
"""
import functools
import json
import os
import statistics
import tempfile
import weakref

import torch

import python_ref.functional

from . import __version__, ops

__all__ = ["BackendTable", "call", "signature", "table"]

CALLS_TIMED = 5  # after one untimed call (which compiles and autotunes a Triton kernel)


def signature(op, x, args):
    """The table's key for ``op(x, *args)``: what a kernel's speed depends on."""
    parts = [op, str(x.dtype), str(tuple(x.shape)), str(ops.output_memory_format(x))]
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(str(tuple(a.shape)))
        elif isinstance(a, (list, tuple)):
            parts.append(str([tuple(t.shape) for t in a]))
        else:
            parts.append(repr(a))
    return " ".join(parts)


# The ops the compiled CUDA kernels implement (conv1x1 and squeeze_excite are their plain-PyTorch
# definition on CUDA; patch_embed is cuDNN's convolutions with this library's bias-and-ReLU
# kernel).
CUDA_KERNEL_OPS = ("cga", "dwconv", "ffn", "dwconv_ffn", "patch_embed")


@functools.lru_cache(maxsize=None)
def _candidates(op):
    """{backend name: op callable} of the backends that can run ``op`` on CUDA here, the
    plain-PyTorch definition last."""
    out = {}
    if ops.has_compiled_kernels("cuda") and op in CUDA_KERNEL_OPS:
        out["cuda"] = getattr(torch.ops.efficientvit, op).default
    from . import triton as triton_kernels
    if triton_kernels.available():
        out["triton"] = getattr(triton_kernels, op)
    out["reference"] = getattr(python_ref.functional, op)
    return out


def _time_cuda(fn):
    """Median milliseconds of fn() over CALLS_TIMED calls after one untimed call."""
    fn()
    times = []
    for _ in range(CALLS_TIMED):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class BackendTable:
    """Per-device choices: {signature: backend name}, measured on a miss (``choose``) and kept
    in ``path`` (JSON) when one is given."""

    def __init__(self, path=None, timer=_time_cuda):
        self.path, self.timer = path, timer
        self.choices = {}
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    self.choices = json.load(f)["choices"]
            except (OSError, ValueError, KeyError):  # unreadable: measured again and rewritten
                self.choices = {}

    def choose(self, key, candidates, call):
        """The backend for ``key``: the table's, else the fastest of ``candidates`` ({name:
        op}) at ``call(op)``, recorded. A candidate that raises (a shape its kernel cannot
        hold) is left out; the last one (the plain-PyTorch definition) must run."""
        name = self.choices.get(key)
        if name in candidates:
            return name
        times, last = {}, next(reversed(candidates))
        for name, op in candidates.items():
            try:
                times[name] = self.timer(lambda op=op: call(op))
            except (RuntimeError, ValueError):
                if name == last:
                    raise
        self.choices[key] = min(times, key=times.get)
        self._save()
        return self.choices[key]

    def _save(self):
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        # written whole and renamed: a reader never sees half a file
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(self.path), delete=False,
                                         suffix=".tmp") as f:
            json.dump({"efficientvit_kernels": __version__, "choices": self.choices}, f, indent=1)
        os.replace(f.name, self.path)


_TABLES = {}


def table(device):
    """The table of CUDA device ``device`` (a torch.device), loaded once per process."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _TABLES:
        name = torch.cuda.get_device_name(index).replace(" ", "_").replace("/", "_")
        root = os.environ.get("EFFICIENTVIT_CACHE_DIR") or os.path.join(
            os.path.expanduser("~"), ".cache", "efficientvit_kernels")
        _TABLES[index] = BackendTable(os.path.join(root, f"backends-{name}-{__version__}.json"))
    return _TABLES[index]


# module -> (what its last CUDA input's signature depends on besides the module's weights, the
# op it ran on): a repeat call skips the signature (tens of microseconds of Python, as much as
# a small kernel) and the table.
_LAST = weakref.WeakKeyDictionary()


def call(module, op, x, args):
    """``op(x, *args)`` for fused module ``module`` on CUDA, on the backend the device's table
    holds for it, measured first where it holds none (see the module docstring for captures
    and traces)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return getattr(torch.ops.efficientvit, op).default(x, *args)
    input_key = (x.shape, x.dtype, x.device, x.stride())
    last = _LAST.get(module)
    if last is not None and last[0] == input_key:
        return last[1](x, *args)
    candidates = _candidates(op)
    key = signature(op, x, args)
    device_table = table(x.device)
    if torch.cuda.is_current_stream_capturing():
        name = device_table.choices.get(key)
        if name not in candidates:  # not measured: the dispatcher's kernel, nothing kept
            return getattr(torch.ops.efficientvit, op).default(x, *args)
    else:
        name = device_table.choose(key, candidates, lambda fn: fn(x, *args))
    _LAST[module] = (input_key, candidates[name])
    return candidates[name](x, *args)
