"""Timing helpers shared by the main job and benchmarks/ (docs/design.md: how speed is measured)."""
import platform
import statistics
import time

import torch

__all__ = ["device_name", "median_time", "median_times", "tolerance"]

# docs/design.md: relative error of a fused result against the fp64 reference
_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def tolerance(dtype):
    return _TOLERANCE[dtype]


@torch.no_grad()
def median_times(runners, inputs, warmup=3, min_rounds=5, max_rounds=100, budget_s=3.0):
    """Median seconds of ``fn(x)`` for each ``{name: fn}`` in ``runners``, cycling through
    ``inputs`` so caches don't flatter.

    The runners are timed in interleaved rounds (each called once per round, in turn), so a
    slow or fast spell of a shared machine affects them alike and their ratios hold. Rounds
    run until ``min_rounds`` are done and ``budget_s`` seconds have passed (at most
    ``max_rounds``). On CUDA, each call is timed with CUDA events. Warm-up calls are excluded.
    """
    cuda = inputs[0].is_cuda
    for fn in runners.values():
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
    times = {name: [] for name in runners}
    start_all = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start_all < budget_s):
        x = inputs[rounds % len(inputs)]
        for name, fn in runners.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(x)
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(t) for name, t in times.items()}


def median_time(fn, inputs, **kwargs):
    """Median seconds of ``fn(x)`` alone (see ``median_times``)."""
    return median_times({"fn": fn}, inputs, **kwargs)["fn"]


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
