"""A Markdown table of Nsight Compute's counters (``ncu --csv --page raw``, as
``gpu_check.sh --profile`` writes them), one row per kernel and launch shape, largest total time
first: launches, time, launch shape, registers, dynamic shared memory, achieved occupancy, DRAM
and issue-slot use (% of peak), warp instructions per launch and the three largest stall
reasons (cycles a warp waits per instruction it issues).

Reading it: a kernel near 100% DRAM is memory-bound; near 50-70% issue with low DRAM, it runs
out of instruction slots (fewer instructions is the way); low on both, it waits (latency: too
few warps or programs, a dependent chain per step).

    python benchmarks/ncu_table.py ncu_cuda.csv [ncu_triton.csv.gz ...]
"""
import csv
import gzip
import io
import re
import sys

STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio")
TIME_UNITS = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "nsecond": 1e-3, "ms": 1e3, "msecond": 1e3}


def read(path):
    """The kernels of an ncu raw-page CSV: a dict per launch (column -> text), and the units row.
    ncu's own messages (==PROF== lines) are skipped; a .gz file is read as its contents."""
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        rows = list(csv.reader(io.StringIO("".join(line for line in f if line.startswith('"')))))
    if len(rows) < 2:
        return [], {}
    header, units = rows[0], dict(zip(rows[0], rows[1]))
    return [dict(zip(header, r)) for r in rows[2:]], units


def number(text):
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return float("nan")


def short_name(name):
    """The kernel's name without its argument list and template noise."""
    name = re.sub(r"\(.*", "", name)
    name = re.sub(r"^void ", "", name)
    return name[:60]


def rows(launches, units):
    """One row per (kernel, grid): its launches summed, the rest per launch (the first's)."""
    scale = TIME_UNITS.get(units.get("gpu__time_duration.sum", "ns"), 1e-3)
    grouped = {}
    for k in launches:
        key = (short_name(k["Kernel Name"]), k.get("launch__grid_size", ""))
        row = grouped.setdefault(key, dict(k, launches=0, us=0.0))
        row["launches"] += 1
        row["us"] += number(k["gpu__time_duration.sum"]) * scale
    return sorted(grouped.items(), key=lambda kv: -kv[1]["us"])


def stalls(row, n=3):
    waits = [(number(v), m.group(1)) for c, v in row.items() if (m := STALL.fullmatch(c))]
    return ", ".join(f"{name} {v:.1f}" for v, name in sorted(waits, reverse=True)[:n])


def table(path):
    launches, units = read(path)
    if not launches:
        return f"{path}: no kernels\n"
    total = sum(r["us"] for _, r in rows(launches, units))
    out = [f"{path}: {len(launches)} launches, {total:.1f} us of kernel time", "",
           "| kernel | launches | us | share | grid x block | regs | smem | occupancy % | "
           "DRAM % | issue % | warp instr / launch | stalls per issue |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, grid), r in rows(launches, units):
        out.append(
            f"| `{name}` | {r['launches']} | {r['us']:.1f} | {r['us'] / total:.0%} | {grid} x "
            f"{r.get('launch__block_size', '')} | {r.get('launch__registers_per_thread', '')} | "
            f"{r.get('launch__shared_mem_per_block_dynamic', '')} | "
            f"{number(r.get('sm__warps_active.avg.pct_of_peak_sustained_active')):.0f} | "
            f"{number(r.get('gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed')):.0f} | "
            f"{number(r.get('sm__inst_executed.avg.pct_of_peak_sustained_elapsed')):.0f} | "
            f"{number(r.get('smsp__inst_executed.sum')) / 1e6:.2f} M | {stalls(r)} |")
    return "\n".join(out) + "\n"


def main(paths):
    print("\n".join(table(p) for p in paths))


if __name__ == "__main__":
    main(sys.argv[1:])
