"""Triton implementations of the fused ops: ``cga``, ``dwconv``, ``ffn``, ``dwconv_ffn``,
``patch_embed``, ``conv1x1``, ``squeeze_excite``.

Same arguments and results as :mod:`efficientvit_kernels.ops`, on CUDA tensors (fp32, fp16,
bf16), or on CPU tensors when ``TRITON_INTERPRET=1`` is set before triton is imported.
Importing this package works without triton; calling an op then raises.
"""
try:
    import triton  # noqa: F401
except ImportError:
    triton = None

OPS = ("cga", "dwconv", "ffn", "dwconv_ffn", "patch_embed", "conv1x1", "squeeze_excite")
__all__ = ["available", *OPS]


def available():
    """True when triton can be imported."""
    return triton is not None


if available():
    from .cga import cga
    from .conv1x1 import conv1x1
    from .dwconv import dwconv
    from .ffn import dwconv_ffn, ffn
    from .patch_embed import patch_embed
    from .squeeze_excite import squeeze_excite
else:
    def _missing(name):
        def op(*args, **kwargs):
            raise RuntimeError(f"efficientvit_kernels.triton.{name} needs triton, "
                               "which is not installed")
        op.__name__ = name
        return op

    globals().update({name: _missing(name) for name in OPS})
