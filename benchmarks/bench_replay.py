"""What cpu_replay's per-call check costs: a converted model as called (replayed, its state
checked first, in the C call that runs its program), its captured program's method called
directly (no check), cpu_graph's program (weights packed at capture, nothing checked), the
model module by module, and ONNX Runtime on the folded model; batch 1, one thread, each call
cold (time_interleaved's cold), one interleaved run.

    python benchmarks/bench_replay.py [--models m0,m4] [--seconds 20] [--out PATH]

Writes <out>.json (device, versions, date) and <out>.md.
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import efficientvit_kernels as K  # noqa: E402
import python_ref as R  # noqa: E402
from bench_cpu import onnx_session  # noqa: E402
from efficientvit_kernels.timing import run_metadata, time_interleaved, write_results  # noqa: E402

FORMS = ("onnxruntime", "as called", "its program", "cpu_graph", "module by module")


def runners(name, x):
    model = R.randomize_(R.build(name)).eval()
    fused = K.convert(model)
    fused(x), fused(x)  # the second call captures
    (program,) = fused._compiled_call_impl._programs.values()
    out = dict(zip(FORMS[1:], (fused, program.run, K.cpu_graph(K.convert(model), x),
                               K.convert(model, cpu_replay=False))))
    session = onnx_session(R.fold_batchnorm(model), x)
    if session is not None:
        out["onnxruntime"] = lambda t: session(t)
    return out


def batch1_rows(make_runners, models, seconds, cold):
    """Each model's forms ({form: forward} = make_runners(name, x)) at batch 1, one thread,
    timed in one process in interleaved rounds: a row per model, its forms' median ms."""
    torch.set_num_threads(1)
    rows = []
    with torch.no_grad():
        for name in models:
            inputs = [torch.randn(1, 3, 224, 224) for _ in range(2)]
            t = time_interleaved(make_runners(name, inputs[0]), inputs, warmup=5,
                                 budget_s=seconds, max_rounds=5000, cold=cold)
            rows.append(dict(model=name, ms={k: v.median * 1e3 for k, v in t.items()},
                             rounds=next(iter(t.values())).samples))
    return rows


def header(meta, title):
    """A batch-1 results file's first lines: its title, then the run's device, versions and
    command."""
    return [f"# {title}, {meta['date'][:10]}", "",
            f"{meta['device']}; CPU kernels {meta['cpu_isa']}; torch {meta['torch']}; fp32; "
            f"224x224; batch 1; one thread; commit {(meta['commit'] or '?')[:10]}; "
            f"`{meta['command']}`.", ""]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="m0,m4")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_replay"))
    args = p.parse_args()
    rows = batch1_rows(runners, args.models.split(","), args.seconds, cold=True)
    meta = dict(run_metadata("cpu"), command="python benchmarks/bench_replay.py "
                + " ".join(sys.argv[1:]))
    lines = header(meta, "cpu_replay's check") + [
        "Median forward, ms, each call cold, rounds in shuffled order.", "",
        "| model | " + " | ".join(f for f in FORMS if f in rows[0]["ms"]) + " | check |",
        "|---|" + "---|" * (len(rows[0]["ms"]) + 1)]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['model'].upper()} | " + " | ".join(
            f"{ms[f]:.2f}" for f in FORMS if f in ms)
            + f" | {ms['as called'] - ms['its program']:.2f} |")
    write_results(args.out, dict(meta=meta, rows=rows), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
