"""The Triton launches of a profiled forward (gpu_check.sh --profile: ncu_triton.csv) beside the
static profile (benchmarks/results/gpu_static.json): per launch shape, the warp instructions
ncu counted over the static SASS count times the warps (how often loops run the code), and the
time those instructions take at half the issue slots. Where the measured time is near that,
the kernel is issue-bound; far above it, each warp's chain of steps sets the time.

The launches are recorded again here on meta tensors (efficientvit_kernels.triton_static), in
forward order, and paired with ncu's Triton launches in theirs: run it at the commit the
profile was taken at, or the kernels changed since show wrong ratios.

    python benchmarks/ncu_static.py ncu_triton.csv.gz [--model m0 --batch 256]
"""
import argparse
import copy
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

import gpu_ops  # noqa: E402
import ncu_table  # noqa: E402
import python_ref  # noqa: E402
from efficientvit_kernels import convert, triton_static  # noqa: E402

# H200: multiprocessors, schedulers each, SM clock (Hz); half the issue slots (measured: the
# issue-bound kernels of the first profile ran at 45-65% of them)
SMS, SCHEDULERS, CLOCK, ISSUE_SHARE = 132, 4, 1.98e9, 0.5


def recorded_launches(model_name, batch):
    """The Triton launches of one fp16 forward, autotuners' alternatives dropped."""
    model = python_ref.randomize_(python_ref.build(model_name))
    fused = copy.deepcopy(convert(model, backend="triton").half()).to("meta")
    with triton_static.recording() as launches:
        fused(torch.empty(batch, 3, 224, 224, dtype=torch.float16, device="meta"))
    out = []
    for launch in launches:
        if not gpu_ops.autotune_alternative(out[-1] if out else None, launch):
            out.append(launch)
    return out


def table(path, model_name="m0", batch=256):
    measured, units = ncu_table.read(path)
    measured = [m for m in measured if m["Kernel Name"].startswith("_")]  # Triton's names
    launches = recorded_launches(model_name, batch)
    if len(launches) != len(measured):
        raise SystemExit(f"{len(launches)} launches recorded, {len(measured)} profiled: "
                         "not the same forward")
    static = gpu_ops.static_rows(backend="triton")
    scale = ncu_table.TIME_UNITS.get(units.get("gpu__time_duration.sum", "ns"), 1e-3)
    rows = {}
    for launch, m in zip(launches, measured):
        name = launch.kernel.fn.__name__
        assert m["Kernel Name"].startswith(name), (m["Kernel Name"], name)
        programs = int(ncu_table.number(m["launch__grid_size"]))
        warps = int(ncu_table.number(m["launch__block_size"])) // 32
        key = triton_static.launch_key(launch, 90)
        row = static.get(key)
        r = rows.setdefault((name, programs, warps, key), dict(
            static=row["sass_instructions"] if row else None, executed=[], us=[]))
        r["executed"].append(ncu_table.number(m["smsp__inst_executed.sum"]))
        r["us"].append(ncu_table.number(m["gpu__time_duration.sum"]) * scale)
    out = ["| kernel | programs x warps | static SASS a warp | executed / (static x warps) | "
           "measured us | issue time at 50% us | launches |", "|---|---|---|---|---|---|---|"]
    for (name, programs, warps, _), r in rows.items():
        executed = sum(r["executed"]) / len(r["executed"])
        loops = "-" if r["static"] is None else f"{executed / (r['static'] * programs * warps):.2f}"
        issue_us = executed / (SMS * SCHEDULERS * CLOCK * ISSUE_SHARE) * 1e6
        out.append(f"| `{name}` | {programs} x {warps} | {r['static'] or '-'} | {loops} | "
                   f"{sum(r['us']) / len(r['us']):.1f} | {issue_us:.1f} | {len(r['us'])} |")
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv")
    parser.add_argument("--model", default="m0")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    print(table(args.csv, args.model, args.batch))


if __name__ == "__main__":
    main()
