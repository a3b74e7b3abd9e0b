"""Timing helpers shared by the main job and benchmarks/ (DESIGN.md: how speed is measured)."""
import platform
import statistics
import time

import torch

__all__ = ["device_name", "median_time", "tolerance"]

# DESIGN.md: relative error of a fused result against the fp64 reference
_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def tolerance(dtype):
    return _TOLERANCE[dtype]


@torch.no_grad()
def median_time(fn, inputs, warmup=3, min_runs=5, max_runs=100, budget_s=3.0):
    """Median seconds of ``fn(x)``, cycling through ``inputs`` so caches don't flatter.

    On CUDA, each run is timed with CUDA events; warm-up runs are excluded.
    """
    cuda = inputs[0].is_cuda
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    start_all = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start_all < budget_s):
        x = inputs[len(times) % len(inputs)]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_name(device):
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
