"""Times one converted model in a process of its own, for comparing two checkouts (whose
extensions cannot share a process) with a whole-process alternation such as
``farm-bench --vs``: prints the median and the minimum of its timed forwards.

    python benchmarks/time_model.py CHECKOUT MODEL BATCH ROUNDS

CHECKOUT: the repository whose efficientvit_kernels and python_ref to import (built in place).
One thread, fp32, 224x224, random weights and batch-norm statistics (seed 0), 3 warm-up calls.
"""
import statistics
import sys
import time

checkout, name, batch, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, checkout)

import torch  # noqa: E402

import efficientvit_kernels as K  # noqa: E402
import python_ref as R  # noqa: E402

assert K.__file__.startswith(checkout), f"imported {K.__file__}, not from {checkout}"
torch.set_num_threads(1)
torch.manual_seed(0)
fused = K.convert(R.randomize_(R.build(name)).eval())
inputs = [torch.randn(batch, 3, 224, 224) for _ in range(2)]
with torch.no_grad():
    for i in range(3):
        fused(inputs[i % 2])
    seconds = []
    for i in range(rounds):
        start = time.perf_counter()
        fused(inputs[i % 2])
        seconds.append(time.perf_counter() - start)
print(f"{name} b{batch} {statistics.median(seconds) * 1e3:.3f} ms min {min(seconds) * 1e3:.3f}")
