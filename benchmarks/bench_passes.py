"""What each conversion pass buys on CPU: the model converted with every default pass, against
the same without one pass at a time, and against a second copy of itself (the run's noise),
timed in one run of interleaved rounds (one thread, fp32, 224^2).

    python benchmarks/bench_passes.py [--models m0,m4] [--batches 16,1] [--seconds 30]
        [--out benchmarks/results/cpu_passes]

Writes <out>.json (device, versions, date, every timing's 10th/50th/90th percentiles) and
<out>.md.
"""
import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import efficientvit_kernels as K  # noqa: E402
import python_ref as R  # noqa: E402
from efficientvit_kernels.timing import run_metadata, time_interleaved  # noqa: E402


def variants(model):
    """{label: converted model}: all default passes, a second copy of that, and each without one
    pass (the passes that a CPU model gets by default)."""
    out = {"all passes": K.convert(model), "all passes (copy)": K.convert(model)}
    cpu_passes = [p for p in K.PASSES if p != "dwconv_ffn"]  # that one is for Triton
    for dropped in cpu_passes[1:]:
        out[f"without {dropped}"] = K.convert(model, passes=[p for p in cpu_passes if p != dropped])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="m0,m4")
    p.add_argument("--batches", default="16,1")
    p.add_argument("--seconds", type=float, default=30.0, help="timing budget per model and batch")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_passes"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        model = R.randomize_(R.build(name)).eval()
        runners = variants(model)
        for batch in map(int, args.batches.split(",")):
            x = [torch.randn(batch, 3, 224, 224) for _ in range(2)]
            t = time_interleaved(runners, x, budget_s=args.seconds, max_rounds=10000, min_rounds=10)
            base = t["all passes"].median
            for label, timing in t.items():
                rows.append(dict(model=name.upper(), batch=batch, variant=label,
                                 ms_p10_median_p90=[timing.p10 * 1e3, timing.median * 1e3, timing.p90 * 1e3],
                                 rounds=timing.samples, relative_to_all_passes=timing.median / base))
            print(f"  {name} batch {batch}: " + ", ".join(
                f"{k} {v.median * 1e3:.2f} ms" for k, v in t.items()), file=sys.stderr)
    meta = dict(run_metadata("cpu"), threads=1,
                command="python benchmarks/bench_passes.py " + " ".join(argv or sys.argv[1:]))
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    lines = [f"# Conversion passes on CPU, {meta['date'][:10]}", "",
             f"{meta['device']}; CPU kernels {meta['cpu_isa']} (built: {', '.join(meta['built_isas'])}); torch {meta['torch']}; 1 thread; fp32; 224x224; `{meta['command']}`.",
             "Medians of interleaved rounds; time relative to the model with every default pass "
             "(above 1: slower without the pass). `all passes (copy)` is the same model timed "
             "again: how far two identical runners differ in this run.", "",
             "| model | batch | variant | p10 ms | median ms | p90 ms | relative |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        p10, med, p90 = r["ms_p10_median_p90"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {p10:.2f} | {med:.2f} | "
                     f"{p90:.2f} | {r['relative_to_all_passes']:.3f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
