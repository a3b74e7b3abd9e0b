"""The one timing harness of the main job and benchmarks/ (docs/design.md: how speed is
measured). ``time_interleaved`` times several runners against each other in interleaved
rounds (CPU: wall clock; CUDA: events per call); ``time_gpu`` times one CUDA callable with
``triton.testing.do_bench`` (L2 cleared before each call). Both return ``Timing``: quantiles,
not only the median, so the spread of a run is reported with it. ``run_metadata`` and
``write_results`` make a run's results files."""
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import time
from typing import NamedTuple

import torch

__all__ = ["Timing", "device_name", "run_metadata", "time_interleaved", "time_gpu",
           "write_results"]


class Timing(NamedTuple):
    """Seconds per call: the median, the 10th and 90th percentiles, and the number of calls timed
    (None where the timer does not say)."""
    median: float
    p10: float
    p90: float
    samples: int | None

    @classmethod
    def of(cls, seconds):
        q = statistics.quantiles(seconds, n=10, method="inclusive") if len(seconds) > 1 else seconds * 9
        return cls(statistics.median(seconds), q[0], q[-1], len(seconds))

    def spread(self):
        """(p90 - p10) / median: the run's noise, relative."""
        return (self.p90 - self.p10) / self.median


@torch.no_grad()
def time_interleaved(runners, inputs, warmup=3, min_rounds=5, max_rounds=100, budget_s=3.0,
                     cold=False):
    """``{name: Timing}`` of ``fn(x)`` for each ``{name: fn}`` in ``runners``, cycling through
    ``inputs`` so caches don't flatter.

    ``cold`` (CPU): before each timed call, untimed, 64 MB are written (twice the L3 this
    machine reports), so that a runner's weights, code and interpreter state are mostly out of
    cache, as when other work runs between calls; otherwise a runner finds what the one before
    it left (after one that shares its weights, in cache; after one that does not, evicted).
    (Even cold, a runner right after another form of the same model ran faster here.)

    The runners are timed in interleaved rounds (each called once per round, in an order
    shuffled per round), so a slow or fast spell of a shared machine affects them alike and
    their ratios hold, and no runner always follows the same one (a runner can slow the next:
    the one after ONNX Runtime took 0.4 ms more of M4's 6 ms at batch 1, cold or not). Rounds
    run until ``min_rounds`` are done and ``budget_s`` seconds have passed (at most
    ``max_rounds``). On CUDA, each call is timed with CUDA events. Warm-up calls are excluded.
    """
    cuda = inputs[0].is_cuda
    evict = torch.zeros(16 * 2**20) if cold and not cuda else None  # 64 MB: twice an L3
    for fn in runners.values():
        for i in range(warmup):
            fn(inputs[i % len(inputs)])
    times = {name: [] for name in runners}
    start_all = time.perf_counter()
    rounds = 0
    order = list(runners.items())
    shuffle = random.Random(0).shuffle
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start_all < budget_s):
        x = inputs[rounds % len(inputs)]
        shuffle(order)
        for name, fn in order:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(x)
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                if cold:
                    evict.add_(1)
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: Timing.of(t) for name, t in times.items()}


def time_gpu(fn):
    """``Timing`` of fn() on CUDA by ``triton.testing.do_bench``, with warm-up and repetitions
    scaled to one call's time (at least ~10 samples however slow fn is)."""
    from triton.testing import do_bench
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    estimate = start.elapsed_time(end)
    median, p10, p90 = do_bench(fn, warmup=max(5, 2 * estimate), rep=max(25, 10 * estimate),
                                quantiles=[0.5, 0.1, 0.9])
    return Timing(median / 1e3, p10 / 1e3, p90 / 1e3, None)


def device_name(device):
    """The GPU's name, or the CPU's model name with its family, model and clock (from
    /proc/cpuinfo where there is one): a virtual machine may give CPUs of different generations
    one name ("AMD EPYC" on hosts that ran the same models 1.4-2.3x apart)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's fields
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    if "model name" not in fields:
        return platform.processor() or platform.machine()
    details = [f"family {fields['cpu family']} model {fields['model']}"] if (
        "cpu family" in fields and "model" in fields) else []
    if "cpu MHz" in fields:
        details.append(f"{float(fields['cpu MHz']):.0f} MHz")
    return fields["model name"] + (f" ({', '.join(details)})" if details else "")


def _commit():
    """The git commit of the checkout this package runs from, or None."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__),
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata(device):
    """What a results file records about the run: the device, the library's version, commit and
    build (CPU instruction-set levels built and the one running), torch and Python versions,
    date and time."""
    from . import __version__, ops
    return dict(device=device_name(device), efficientvit_kernels=__version__, commit=_commit(),
                built_isas=ops.built_isas(), cpu_isa=ops.cpu_isa(), torch=torch.__version__,
                python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def write_results(out, data, text):
    """A run's results file pair: ``data`` (with run_metadata's record in it) as <out>.json,
    ``text`` (its markdown) as <out>.md; the text is printed too."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(data, f, indent=2)
    with open(out + ".md", "w") as f:
        f.write(text)
    print(text, end="")
