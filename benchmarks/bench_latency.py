"""CPU latency: each model's forward at batch 1 (and 16) on one thread (and two), fused against
the eager reference, ONNX Runtime on the same folded model, and the fused model as converted
(its calls replayed in C++, cpu_replay), module by module, and in its deployment forms (its
torch.export program replayed by cpu_graph, that program's module, the module of its
export_cpu program (one op), optionally both programs as AOTInductor packages), optionally torch.compile of the reference and of the fused model; all
timed in this process in interleaved rounds. With --timm the models are timm's (converted as users convert them; ONNX
Runtime and the check run on the reference loaded with the same weights, folded).

    python benchmarks/bench_latency.py [--models m0,m1,m2,m3,m4,m5] [--batches 1,16]
        [--threads 1,2] [--seconds 20] [--aoti] [--compile] [--timm] [--cold]
        [--out benchmarks/results/cpu_latency]

Writes <out>.json (device, versions, build, date; every timing's 10th/50th/90th percentiles)
and <out>.md (medians with the 10-90% spread; ratios against ONNX Runtime).
"""
import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # timm_stub: timm without torchvision

import efficientvit_kernels as K  # noqa: E402
import python_ref as R  # noqa: E402
from bench_cpu import onnx_session  # noqa: E402
from efficientvit_kernels.testing import assert_close  # noqa: E402
from efficientvit_kernels.timing import run_metadata, time_interleaved, write_results  # noqa: E402
from timm_stub import import_timm  # noqa: E402


def build(name, args):
    """The model to time, with random weights and batch-norm statistics."""
    if not args.timm:
        return R.randomize_(R.build(name))
    timm = import_timm()
    if timm is None:
        sys.exit("--timm: timm is not installed")
    model = R.randomize_(timm.create_model(f"efficientvit_{name}"))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))  # timm caches its attention biases on a first call
    return model


def runners(model, name, batch, threads, args, workdir):
    """{label: forward} for one model, each checked against the float64 reference first."""
    reference = R.load_checkpoint(R.build(name), model.state_dict()) if args.timm else model
    folded = R.fold_batchnorm(reference)
    x = torch.randn(batch, 3, 224, 224)
    fused = K.convert(model)
    out = {"eager": model}
    if args.compile:
        # Each row's converted models are new: without this, dynamo's recompile limit (8 frames
        # of one function) would leave the later rows' compiled forms uncompiled.
        torch._dynamo.reset()
        out["torch.compile"] = torch.compile(model)
    session = onnx_session(folded, x, threads)
    if session is not None:
        out["onnxruntime"] = lambda t: torch.from_numpy(session(t)[0])
    out["fused"] = fused  # replayed in C++ from its second call (convert's cpu_replay)
    out["fused, modules"] = K.convert(model, cpu_replay=False)
    program = torch.export.export(fused, (x,))
    out["fused, cpu_graph"] = K.cpu_graph(program, x)  # the exported program, replayed in C++
    if args.compile:  # a call without gradients is one op, the replay (cpu_replay)
        out["fused, torch.compile"] = torch.compile(fused)
    out["fused, exported"] = program.module()
    one_op = K.export_cpu(program, x)  # the same program as one op
    out["fused, export_cpu"] = one_op.module()
    if args.aoti:
        for label, exported in (("AOTInductor", program), ("export_cpu, AOTInductor", one_op)):
            path = os.path.join(workdir, f"{name}_b{batch}_{label}.pt2")  # one for all threads
            if not os.path.exists(path):
                torch._inductor.aoti_compile_and_package(exported, package_path=path)
            out[f"fused, {label}"] = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        ref = folded.double()(x.double())
        for label, fn in out.items():
            assert_close(fn(x), ref, torch.float32, what=f"{name} {label}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="m0,m1,m2,m3,m4,m5")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--seconds", type=float, default=20.0, help="timing budget per row")
    p.add_argument("--aoti", action="store_true", help="add an AOTInductor package (compiles)")
    p.add_argument("--compile", action="store_true",
                   help="add torch.compile of the reference and of the fused model")
    p.add_argument("--timm", action="store_true", help="time timm's models (needs timm)")
    p.add_argument("--cold", action="store_true",
                   help="64 MB written before each timed call: every form starts cold "
                        "(time_interleaved's cold)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_latency"))
    args = p.parse_args(argv)
    rows = []
    # Each model made once: its random batch-norm statistics are measured by a forward, whose
    # sums another thread count would round differently (AOTInductor packages are shared).
    models = {name: build(name, args) for name in args.models.split(",")}
    with tempfile.TemporaryDirectory() as workdir, torch.no_grad():
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            for batch in map(int, args.batches.split(",")):
                for name in args.models.split(","):
                    fns = runners(models[name], name, batch, threads, args, workdir)
                    inputs = [torch.randn(batch, 3, 224, 224) for _ in range(2)]
                    timings = time_interleaved(fns, inputs, warmup=5, budget_s=args.seconds,
                                               max_rounds=2000, cold=args.cold)
                    rows.append(dict(model=name, batch=batch, threads=threads, ms_p10_median_p90={
                        k: [v.p10 * 1e3, v.median * 1e3, v.p90 * 1e3] for k, v in timings.items()},
                        rounds=timings["fused"].samples))
                    print(f"{name} b{batch} t{threads}: " + ", ".join(
                        f"{k} {v.median * 1e3:.2f} ms" for k, v in timings.items()),
                        file=sys.stderr)
    meta = dict(run_metadata("cpu"), seconds_per_row=args.seconds, cold=args.cold,
                models="timm" if args.timm else "python_ref",
                command="python benchmarks/bench_latency.py " + " ".join(argv or sys.argv[1:]))
    write_results(args.out, dict(meta=meta, rows=rows), markdown(meta, rows))


# The fused model's deployed forms, each held to the fused model's speed.
DEPLOYED = ("fused, cpu_graph", "fused, AOTInductor", "fused, torch.compile", "fused, exported",
            "fused, export_cpu", "fused, export_cpu, AOTInductor")


def markdown(meta, rows):
    labels = list(rows[0]["ms_p10_median_p90"])
    lines = [f"# CPU latency, {meta['date'][:10]}", "",
             f"{meta['device']}; CPU kernels {meta['cpu_isa']} (built: "
             f"{', '.join(meta['built_isas'])}); torch {meta['torch']}; fp32; 224x224; commit "
             f"{(meta['commit'] or '?')[:10]}; models from {meta.get('models', 'python_ref')}; "
             f"`{meta['command']}`.", "",
             "Median forward, ms (10th-90th percentile), all forms of a row timed in "
             "interleaved rounds (each round's order shuffled)"
             + (", each call cold (64 MB written before it, untimed)" if meta.get("cold") else
                ", each call finding the caches as the call before it left them")
             + "; `fused`: the converted model as called "
             "(replayed in C++, `cpu_replay`), `fused, modules`: the same without replay, module "
             "by module, `fused, cpu_graph`: its exported program (`torch.export`) replayed by "
             "cpu_graph, `fused, exported`: that program's `.module()`, `fused, export_cpu`: the "
             "`.module()` of its `export_cpu` program (one op), `fused, export_cpu, "
             "AOTInductor`: that program as an AOTInductor package; `x ORT`: ONNX Runtime's median over the fused model's, as called, "
             "module by module, replayed by cpu_graph and as an AOTInductor package (above 1: "
             "fused is faster); `/ fused`: a deployed form's median over the fused model's, as "
             "called (the goal: at most 1.10).", "",
             "| model | batch | threads | " + " | ".join(labels)
             + " | x ORT | x ORT, modules | x ORT, cpu_graph | x ORT, AOTI | "
             + " | ".join(f"{form.removeprefix('fused, ')} / fused" for form in DEPLOYED) + " |",
             "|---|---|---|" + "---|" * (len(labels) + 4 + len(DEPLOYED))]
    for r in rows:
        t = r["ms_p10_median_p90"]
        cells = [f"{t[k][1]:.2f} ({t[k][0]:.2f}-{t[k][2]:.2f})" for k in labels]
        for form in ("fused", "fused, modules", "fused, cpu_graph", "fused, AOTInductor"):
            cells.append(f"{t['onnxruntime'][1] / t[form][1]:.2f}"
                         if "onnxruntime" in t and form in t else "-")
        cells += [f"{t[form][1] / t['fused'][1]:.2f}" if form in t else "-" for form in DEPLOYED]
        lines.append(f"| {r['model'].upper()} | {r['batch']} | {r['threads']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
