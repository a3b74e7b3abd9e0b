"""Triton implementations of the fused ops: ``cga``, ``dwconv``, ``ffn``.

Same arguments and results as :mod:`efficientvit_kernels.ops`, on CUDA tensors (fp32, fp16,
bf16), or on CPU tensors when ``TRITON_INTERPRET=1`` is set before triton is imported.
Importing this package works without triton; calling an op then raises.
"""
try:
    import triton  # noqa: F401
except ImportError:
    triton = None

__all__ = ["available", "cga", "dwconv", "ffn"]


def available():
    """True when triton can be imported."""
    return triton is not None


if available():
    from .cga import cga
    from .dwconv import dwconv
    from .ffn import ffn
else:
    def _missing(name):
        def op(*args, **kwargs):
            raise RuntimeError(f"efficientvit_kernels.triton.{name} needs triton, "
                               "which is not installed")
        op.__name__ = name
        return op

    cga, dwconv, ffn = _missing("cga"), _missing("dwconv"), _missing("ffn")
