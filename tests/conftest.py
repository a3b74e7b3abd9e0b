import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/cases.py, tests/timm_stub.py
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in the interpreter; read when they are decorated,
    # so it must be set before any test module imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")
