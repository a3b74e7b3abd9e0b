"""The portable build against a native one, in one run: each model converted and timed by
benchmarks/time_model.py in a process of its own (two builds cannot share one), the builds and
levels taking turns round by round, so a drift of the machine's speed reaches all alike.

    python benchmarks/bench_isa.py --native CHECKOUT [--models m0,m4,m5] [--batches 16,1]
        [--rounds 7] [--calls 20] [--out benchmarks/results/cpu_isa]

CHECKOUT: a second copy of this repository built with EFFICIENTVIT_NATIVE=1 (-march=native).
This checkout, built portable (the default), runs at the level chosen for this CPU and, for
comparison, at the baseline (EFFICIENTVIT_CPU_ISA=baseline). Writes <out>.json and <out>.md:
per model, batch and build, the median over rounds of each round's median forward time, with the
rounds' min and max.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from efficientvit_kernels.timing import run_metadata  # noqa: E402

TIME_MODEL = os.path.join(ROOT, "benchmarks", "time_model.py")


def builds(native):
    """{label: (checkout, environment additions)}."""
    from efficientvit_kernels import ops
    return {f"portable ({ops.cpu_isa()})": (ROOT, {}),
            "portable (baseline)": (ROOT, {"EFFICIENTVIT_CPU_ISA": "baseline"}),
            "native (-march=native)": (native, {})}


def time_once(checkout, env, model, batch, calls):
    proc = subprocess.run([sys.executable, TIME_MODEL, checkout, model, str(batch), str(calls)],
                          capture_output=True, text=True, env=dict(os.environ, **env), check=True)
    return float(proc.stdout.split()[2]) / 1e3  # "<model> b<batch> <median> ms min <min>"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--native", required=True, help="a checkout built with EFFICIENTVIT_NATIVE=1")
    p.add_argument("--models", default="m0,m4,m5")
    p.add_argument("--batches", default="16,1")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=20, help="timed forwards per process")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_isa"))
    args = p.parse_args(argv)
    configs = builds(os.path.abspath(args.native))
    cases = [(m, int(b)) for m in args.models.split(",") for b in args.batches.split(",")]
    seconds = {(label, m, b): [] for label in configs for m, b in cases}
    for r in range(args.rounds):
        for m, b in cases:
            for label, (checkout, env) in configs.items():
                seconds[label, m, b].append(time_once(checkout, env, m, b, args.calls))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    rows = [dict(model=m, batch=b, build=label, ms_median=statistics.median(t) * 1e3,
                 ms_min=min(t) * 1e3, ms_max=max(t) * 1e3, rounds=len(t))
            for (label, m, b), t in seconds.items()]
    meta = dict(run_metadata("cpu"), threads=1, calls_per_round=args.calls,
                command="python benchmarks/bench_isa.py " + " ".join(argv or sys.argv[1:]))
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    labels = list(configs)
    lines = [f"# Portable build against native, {meta['date'][:10]}", "",
             f"{meta['device']}; torch {meta['torch']}; 1 thread; fp32; 224x224; commit "
             f"{(meta['commit'] or '?')[:10]}; `{meta['command']}`.", "",
             "Median over rounds of each round's median forward, ms (rounds' min-max); ratio: "
             "time / native's.", "",
             "| model | batch | " + " | ".join(labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    for m, b in cases:
        native = statistics.median(seconds[labels[-1], m, b])
        cells = []
        for label in labels:
            t = seconds[label, m, b]
            cells.append(f"{statistics.median(t) * 1e3:.2f} ({min(t) * 1e3:.2f}-"
                         f"{max(t) * 1e3:.2f}), {statistics.median(t) / native:.3f}x")
        lines.append(f"| {m} | {b} | " + " | ".join(cells) + " |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
