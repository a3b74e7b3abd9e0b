"""Where a deployed form of the converted model spends its time beyond the converted model's,
on CPU at batch 1, one thread: the exported program's ``.module()`` and ``torch.compile``, each
taken apart into the layers torch puts around the same kernels, all timed in one process in
interleaved rounds.

    python benchmarks/bench_deployed_overhead.py [--models m0,m4] [--seconds 30] [--cold]
        [--out benchmarks/results/cpu_deployed_overhead]

The forms, each the one before it less one layer:
- exported ``.module()``: torch's module for the exported program: its forward hooks (input
  checks), then its forward;
- ``.module().forward``: that forward alone: every weight read through nested attributes (one
  ``nn.Module.__getattr__`` per level of its name), then the graph's ops called from Python;
- graph from Python: the program's graph module, the weights passed in as arguments: the same
  op calls, no attribute reads;
- cpu_graph: the program replayed by one C++ call.
And for ``torch.compile``:
- torch.compile: Inductor, the default (a call without gradients is one op, the replay);
- torch.compile, eager backend: the graph dynamo captured, run as captured;
- frame not compiled: ``torch.compile`` of a module whose forward dynamo skips
  (``torch.compiler.disable``) and calls the converted model: the wrapper's own cost;
- the op: ``efficientvit_cpu.replay`` called directly (the dispatcher's round trip to Python).

Writes <out>.json (device, versions, date) and <out>.md.
"""
import argparse
import os
import sys

import torch
from torch.export.graph_signature import InputKind

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import efficientvit_kernels as K  # noqa: E402
import python_ref as R  # noqa: E402
from bench_replay import batch1_rows, header  # noqa: E402
from efficientvit_kernels.timing import run_metadata, write_results  # noqa: E402

FORMS = ("converted", "exported .module()", ".module().forward", "graph from Python", "cpu_graph",
         "torch.compile", "torch.compile, eager", "frame not compiled", "the op")


def graph_from_python(program):
    """The exported program's graph module called with its weights as arguments."""
    specs = program.graph_signature.input_specs
    args = [None if s.kind == InputKind.USER_INPUT else
            program.constants[s.target] if s.target in program.constants else
            program.state_dict[s.target] for s in specs]
    (at,) = (i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT)

    def run(x):
        args[at] = x
        return program.graph_module(*args)[0]
    return run


class Uncompiled(torch.nn.Module):
    """Calls the model in a frame dynamo does not compile."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @torch.compiler.disable
    def forward(self, x):
        return self.model(x)


def runners(name, x):
    fused = K.convert(R.randomize_(R.build(name)).eval())
    program = torch.export.export(fused, (x,))
    module = program.module()
    replay = torch.ops.efficientvit_cpu.replay.default
    handle = fused._compiled_call_impl._handle
    forms = (fused, module, module.forward, graph_from_python(program), K.cpu_graph(program, x),
             torch.compile(fused), torch.compile(fused, backend="eager"),
             torch.compile(Uncompiled(fused)), lambda t: replay(t, handle))
    out = dict(zip(FORMS, forms))
    expected = fused(x)
    for label, run in out.items():
        for _ in range(2):  # compiles; the replay captures on the second call
            torch.testing.assert_close(run(x), expected, rtol=0, atol=0, msg=label)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="m0,m4")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--cold", action="store_true", help="each call cold (time_interleaved's)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 "cpu_deployed_overhead"))
    args = p.parse_args()
    rows = batch1_rows(runners, args.models.split(","), args.seconds, args.cold)
    meta = dict(run_metadata("cpu"), command="python benchmarks/bench_deployed_overhead.py "
                + " ".join(sys.argv[1:]))
    lines = header(meta, "Deployed forms taken apart") + [
        "Median forward, ms, and over the converted model's, "
        + ("each call cold" if args.cold else "each call finding the caches as the call "
           "before it left them") + "; rounds in shuffled order. Each form is the one before "
        "it less one layer (the script's docstring).", "",
        "| model | " + " | ".join(FORMS) + " |", "|---|" + "---|" * len(FORMS)]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['model'].upper()} | " + " | ".join(
            f"{ms[f]:.2f} ({ms[f] / ms['converted']:.2f})" for f in FORMS) + " |")
    write_results(args.out, dict(meta=meta, rows=rows), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
