"""Whole-model GPU benchmark, fp16 at 224x224: eager, torch.compile and the fused models
(timed as bench_gpu.py times the layers).

For each model (--models; random weights and batch-norm statistics from python_ref.randomize_)
at batch 1 and at the largest power of two up to 2048 that fits (--batches), img/s of
- eager: the reference, ``model.half().cuda().eval()``, NCHW, as the official code runs;
- compile: ``torch.compile`` of eager (--compile-mode), timed after every other row, since
  how long it compiles is not bounded;
- cuda, triton: ``convert(model, backend=...)``, folded in fp32, then ``.half().cuda()``;
  channels-last from the stem on (convert's "channels_last" pass).
Batch 1 is latency: its calls are replayed from a CUDA graph (one call per input buffer), the
compiled model's too. Times are medians of triton.testing.do_bench (CUDA events, warm-up
excluded, L2 cleared), cycling through several input buffers (bench_gpu.time_backend).

Floor: max(bytes / copy bandwidth, FLOPs / fp16 matmul rate), both measured first in the same
process (bench_gpu.measure_ceilings). FLOPs: 2 x python_ref.count_macs (convolutions, linears,
attention matmuls). Bytes (model_traffic): each op of the fused model, that is each fused module
and each other leaf module (folded convolution, ReLU, ...; a squeeze-excite as one op), reads its
inputs and writes its output once, and each weight is read once; the final pooling, which is
no module, is left out.

Correctness: at each batch, every model's output on the first input buffer against the fp32
eager model (TF32 off) on the same input, as relative error. A fused model passes below 1e-2:
the fp16 tolerance of one layer is 2e-3 (tests/test_gpu.py), and a model rounds through about twenty
fused layers and the convolutions between them. Eager fp16's error is shown as the yardstick.

A supervisor runs the measurements in a worker process, which appends each result to
<out>.jsonl as one JSON line as soon as it is measured. At --budget seconds the supervisor stops
the worker (what it had not measured reads "timeout"), then writes the tables to <out>.md.
Exit status: 0 when everything but torch.compile was measured and passed, 1 on a failed check
or error, 124 when the budget ran out before that.

    python benchmarks/bench_models_gpu.py --out /tmp/models [--models m4 m0] [--budget 120]
    python benchmarks/bench_models_gpu.py --render /tmp/models.jsonl   # a results file's tables
"""
import argparse
import copy
import datetime
import json
import os
import signal
import subprocess
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

import gpu_ops  # noqa: E402
import python_ref  # noqa: E402
from bench_gpu import _version, measure_ceilings, time_backend  # noqa: E402
from efficientvit_kernels.testing import relative_error  # noqa: E402
from efficientvit_kernels import convert  # noqa: E402
from efficientvit_kernels.modules import LinearSqueezeExcite, backend_ops  # noqa: E402

# What the check times by default (gpu_precompile.py compiles their launches beforehand). M4
# first: the speed goals' model (the quick check's budget may end before the second).
MODELS = ("m4", "m0")
BATCHES = (1, 2048)
RESOLUTION = 224
FUSED = ("cuda", "triton", "auto")  # auto: per op call, the fastest measured (auto_backend)
COLUMNS = ("eager", "compile") + FUSED
MODEL_TOL = 1e-2  # relative error of a whole fp16 model (module docstring)


def floor_seconds(bytes_, flops, bandwidth, flop_rate):
    """The least time a call can take: its bytes at the copy bandwidth or its FLOPs at the
    matmul rate, whichever takes longer."""
    return max(bytes_ / bandwidth, flops / flop_rate)


def _ops(module):
    """The modules model_traffic counts as one op each (see there)."""
    if isinstance(module, nn.Identity):
        return []
    if isinstance(module, LinearSqueezeExcite) or not module._modules:
        return [module]
    return [op for child in module.children() for op in _ops(child)]


@torch.no_grad()
def model_traffic(model, x):
    """(activation bytes, weight bytes) of ``model(x)``: each op (a module without children,
    Identity aside, or a squeeze-excite as a whole) reads its tensor inputs and writes its output
    once; each weight tensor is read once."""
    moved = [0]

    def count(module, inputs, output):
        moved[0] += sum(t.numel() * t.element_size() for t in (*inputs, output)
                        if torch.is_tensor(t))

    hooks = [op.register_forward_hook(count) for op in _ops(model)]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    weights = {t.data_ptr(): t.numel() * t.element_size()
               for t in (*model.parameters(), *model.buffers())}
    return moved[0], sum(weights.values())


class Results:
    """A JSON-lines file that each result is appended to (and echoed) as soon as it exists."""

    def __init__(self, path):
        self.path = path

    def add(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def read_results(path):
    """The rows of a results file, in the order written."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _inputs(batch, n, seed):
    """``n`` random fp16 images on the GPU, the same for the same seed."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(batch, 3, RESOLUTION, RESOLUTION, generator=g, device="cuda",
                        dtype=torch.float16) for _ in range(n)]


def _fitting_batch(fn, batch):
    """``batch``, or the largest power of two below it at which ``fn`` runs out of memory no
    more."""
    while True:
        x = None
        try:
            x = torch.randn(batch, 3, RESOLUTION, RESOLUTION, device="cuda", dtype=torch.float16)
            fn(x)
            torch.cuda.synchronize()
            return batch
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
        finally:
            x = None
            torch.cuda.empty_cache()


def _fused_models(model, note):
    """backend -> the converted fp16 CUDA model, for the fused backends that can run here;
    ``note(text)`` is told of the others."""
    out = {}
    for backend in FUSED:
        try:
            backend_ops(backend)
        except RuntimeError as e:
            note(f"{backend} not measured: {e}")
            continue
        out[backend] = convert(model, backend=backend).half().cuda()
    return out


def _failed(results, name, batch, backend, e):
    """Records a backend that raised: a row whose status is "failed", and the error."""
    results.add(kind="time", model=name, batch=batch, backend=backend, status="failed")
    results.add(kind="note", text=f"{name} batch {batch}: {backend} failed: {type(e).__name__}: "
                                  f"{str(e)[:200]}")


def _measure_model(name, batches, ceilings, results):
    """Checks and times eager and the fused models of one model; returns the eager model and
    [(batch, work)] for the compile phase (work: the call's bytes and FLOPs)."""
    model = python_ref.randomize_(python_ref.build(name))
    flops_per_image = 2 * python_ref.count_macs(model, RESOLUTION)
    reference = copy.deepcopy(model).cuda()  # fp32
    note = lambda text: results.add(kind="note", text=f"{name}: {text}")  # noqa: E731
    runners = {"eager": copy.deepcopy(model).half().cuda().eval(), **_fused_models(model, note)}
    activations, weights = model_traffic(convert(model, backend="reference").half().cuda(),
                                         _inputs(1, 1, seed=0)[0])
    plan = []
    for wanted in batches:
        # the fp32 reference needs the most memory
        batch = _fitting_batch(lambda x: reference(x.float()), wanted)
        if batch != wanted:
            results.add(kind="note", text=f"{name}: batch {wanted} does not fit; measured {batch}")
        xs = _inputs(batch, 8 if batch == 1 else 3, seed=batch)
        want = reference(xs[0].float())
        work = dict(bytes=batch * activations + weights, flops=batch * flops_per_image)
        plan.append((batch, work))
        for backend, fn in runners.items():
            try:
                err = relative_error(fn(xs[0]), want)
                results.add(kind="check", model=name, batch=batch, backend=backend, error=err,
                            bound=None if backend == "eager" else MODEL_TOL,
                            ok=backend == "eager" or err < MODEL_TOL)
                us = time_backend(fn, xs, graph=batch == 1)
            except Exception as e:  # one backend failing must not stop the others
                _failed(results, name, batch, backend, e)
                continue
            results.add(kind="time", model=name, batch=batch, backend=backend, us=us,
                        img_per_s=batch / us * 1e6, cuda_graph=batch == 1, **work)
        del xs, want
        torch.cuda.empty_cache()
    try:
        _measure_ops(name, model, runners, plan[-1][0], ceilings, results)
    except Exception as e:  # the breakdown is extra: its failure is a note
        results.add(kind="note", text=f"{name}: no op breakdown: {type(e).__name__}: {e}")
    return runners["eager"], plan


def _measure_ops(name, model, runners, batch, ceilings, results):
    """Each runner's time per op kind at ``batch`` beside the kinds' floors and the CUDA and
    Triton kernels' predicted times (benchmarks/gpu_ops.py)."""
    bandwidth, rate = ceilings
    x = _inputs(batch, 1, seed=batch)[0]
    fused = convert(model, backend="reference").half().cuda()
    work = gpu_ops.kind_work(copy.deepcopy(model).half().cuda().eval(), fused, x)
    floor = {k: floor_seconds(b, f, bandwidth, rate) * 1e3 for k, (b, f) in work.items()}
    predict = {
        "cuda": lambda: gpu_ops.cuda_predictions(
            work, gpu_ops.restaged_bytes(runners["cuda"], x), bandwidth, rate,
            gpu_ops.static_rows()),
        "triton": lambda: gpu_ops.triton_predictions(
            gpu_ops.triton_launches(runners["triton"], x), work, bandwidth, rate,
            gpu_ops.static_rows(backend="triton"))}
    predicted = {}
    for backend in predict.keys() & runners.keys():
        try:
            predicted[backend] = predict[backend]()
        except Exception as e:  # a prediction is extra: the measurements go on without it
            results.add(kind="note", text=f"{name}: no {backend} prediction: "
                        f"{type(e).__name__}: {e}")
    for backend, fn in runners.items():
        try:
            ms = gpu_ops.measure_kinds(fn, x)
        except Exception as e:  # the breakdown is extra: its failure is a note
            results.add(kind="note", text=f"{name}: no op breakdown for {backend}: {e}")
            continue
        results.add(kind="ops", model=name, batch=batch, backend=backend, ms=ms, floor_ms=floor,
                    predicted_ms=predicted.get(backend))
    del x, fused
    torch.cuda.empty_cache()


def _compile(eager, mode):
    return torch.compile(eager, mode=None if mode == "default" else mode, dynamic=False)


def _measure_compiled(name, eager, plan, mode, results):
    """Times torch.compile of the eager model at each batch of ``plan``, the largest first."""
    compiled = _compile(eager, mode)
    for batch, work in sorted(plan, key=lambda p: -p[0]):
        xs = _inputs(batch, 8 if batch == 1 else 3, seed=batch)
        try:
            start = time.perf_counter()
            compiled(xs[0])
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            us = time_backend(compiled, xs, graph=batch == 1)
        except Exception as e:  # torch.compile's failure, not this library's: shown, not failed
            _failed(results, name, batch, "compile", e)
            continue
        results.add(kind="time", model=name, batch=batch, backend="compile", us=us,
                    img_per_s=batch / us * 1e6, cuda_graph=batch == 1, compile_s=compile_s, **work)
        del xs
        torch.cuda.empty_cache()


@torch.inference_mode()
def measure(args):
    """The worker: the ceilings, then each model's checks and eager and fused times, then the
    compiled models' times."""
    results = Results(args.jsonl)
    props = torch.cuda.get_device_properties(0)
    bandwidth, rates = measure_ceilings(torch.device("cuda"))
    results.add(kind="meta", device=props.name, sm_count=props.multi_processor_count,
                torch=torch.__version__, cuda=torch.version.cuda, triton=_version("triton"),
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                copy_bandwidth_bytes_per_s=bandwidth, matmul_flops_per_s=rates["float16"],
                dtype="float16", resolution=RESOLUTION,
                layout="eager NCHW, fused channels-last",
                compile_mode=args.compile_mode)
    ceilings = (bandwidth, rates["float16"])
    measured = [(name, *_measure_model(name, args.batches, ceilings, results))
                for name in args.models]
    results.add(kind="phase", phase="compile")
    for name, eager, plan in measured:
        _measure_compiled(name, eager, plan, args.compile_mode, results)


@torch.inference_mode()
def warm_up(args):
    """Runs once what the measurements will compile (the Triton kernels of the fused models at
    each batch, then torch.compile of eager), timing nothing: this fills the on-disk caches of
    Triton and torch.compile, so that a measuring run started later spends its budget measuring.
    Runs in its own process group, so that stopping the group stops its compile workers too."""
    try:
        os.setsid()
    except OSError:  # a group leader already (started by a shell with job control)
        pass
    models = []
    for name in args.models:
        model = python_ref.randomize_(python_ref.build(name))
        eager = copy.deepcopy(model).half().cuda().eval()
        models.append((name, eager, _fused_models(model, print)))
    # Not "auto": its first calls measure each op's backends and keep the choice on disk, which
    # beside the smoke and sanitizer runs would measure them sharing the GPU (in the second H200
    # run, auto's M0 fell from 182,756 to 154,811 img/s, its ops slower than the backends it
    # chose from). Its kernels are the other backends', compiled here by those.
    calls = [(f"{name} {backend}", fn, batch) for name, _, fused in models
             for backend, fn in fused.items() if backend != "auto" for batch in args.batches]
    calls += [(f"{name} compile", _compile(eager, args.compile_mode), batch)
              for name, eager, _ in models for batch in sorted(args.batches, reverse=True)]
    for label, fn, batch in calls:
        start = time.perf_counter()
        try:
            fn(_inputs(batch, 1, seed=batch)[0])
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:  # the measuring run finds the batch that fits
            pass
        print(f"warm-up: {label} batch {batch}: {time.perf_counter() - start:.1f} s", flush=True)


def failures(lines):
    """What fails a run: a fused model beyond its bound, a backend other than torch.compile
    that raised."""
    return ([f"{r['model']} batch {r['batch']} {r['backend']}: error {r['error']:.1e}"
             for r in lines if r["kind"] == "check" and not r["ok"]]
            + [f"{r['model']} batch {r['batch']} {r['backend']}: failed" for r in lines
               if r["kind"] == "time" and r.get("status") == "failed"
               and r["backend"] != "compile"])


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _ratio(a, b):
    """a / b, or "-" where either is missing or b is 0 (a kind predicted to cost nothing)."""
    return "-" if a is None or not b else f"{a / b:.2f}x"


def render(lines):
    """The Markdown report of a results file: header, speed table, correctness table, notes."""
    meta = next((r for r in lines if r["kind"] == "meta"), None)
    times, checks, ops, notes, order = {}, {}, {}, [], {}
    for r in lines:
        if r["kind"] == "ops":
            ops.setdefault((r["model"], r["batch"]), {})[r["backend"]] = r
        elif r["kind"] in ("time", "check"):
            order.setdefault(r["model"], len(order))
            table = times if r["kind"] == "time" else checks
            table.setdefault((r["model"], r["batch"]), {})[r["backend"]] = r
        elif r["kind"] == "note":
            notes.append(r["text"])
    out = []
    if meta:
        out += [f"{meta['device']}; torch {meta['torch']} (CUDA {meta['cuda']}), triton "
                f"{meta['triton']}; {meta['date']}. {meta['dtype']}, {meta['resolution']}^2, "
                f"{meta['layout']}; torch.compile mode {meta['compile_mode']}. Floor: max(bytes / "
                f"{meta['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s copy, FLOPs / "
                f"{meta['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s fp16 matmul).", ""]
    out += ["| model | batch | " + " | ".join(f"{c} img/s" for c in COLUMNS) + " | "
            + " | ".join(f"{f}/{b}" for b in ("eager", "compile") for f in FUSED)
            + " | floor img/s | " + " | ".join(f"{f} of floor" for f in FUSED) + " |",
            "|---" * (2 + len(COLUMNS) + 2 * len(FUSED) + 1 + len(FUSED)) + "|"]
    key = lambda mb: (order[mb[0]], mb[1])  # noqa: E731
    for model, batch in sorted(times, key=key):
        row = times[model, batch]
        img = {c: row[c].get("img_per_s") if c in row else None for c in COLUMNS}
        cells = [row[c]["status"] if "status" in row.get(c, {}) else _fmt(img[c], ".0f")
                 for c in COLUMNS]
        floor = None
        work = next((r for r in row.values() if "bytes" in r), None)
        if meta and work:
            floor = batch / floor_seconds(work["bytes"], work["flops"],
                                          meta["copy_bandwidth_bytes_per_s"],
                                          meta["matmul_flops_per_s"])
        out.append(f"| {model} | {batch} | " + " | ".join(cells) + " | "
                   + " | ".join(_ratio(img[f], img[b]) for b in ("eager", "compile") for f in FUSED)
                   + f" | {_fmt(floor, '.0f')} | "
                   + " | ".join("-" if img[f] is None or floor is None else f"{img[f] / floor:.0%}"
                                for f in FUSED) + " |")
    if checks:
        out += ["", f"Relative error against the fp32 eager model, same input (fused bound "
                f"{MODEL_TOL:g}; eager fp16 for scale):", "",
                "| model | batch | eager fp16 | " + " | ".join(FUSED) + " |",
                "|---" * (3 + len(FUSED)) + "|"]
        for model, batch in sorted(checks, key=key):
            row = checks[model, batch]
            cells = [("-" if c not in row else f"{row[c]['error']:.1e}"
                      + ("" if row[c]["ok"] else " FAIL")) for c in ("eager",) + FUSED]
            out.append(f"| {model} | {batch} | " + " | ".join(cells) + " |")
    for (model, batch), row in ops.items():
        predicting = [b for b in ("cuda", "triton") if (row.get(b) or {}).get("predicted_ms")]
        out += ["", f"{model} at batch {batch}, ms per forward by op kind (benchmarks/gpu_ops.py: "
                "CUDA events around each op; floor per kind; the kernels' time predicted "
                "from their static profile):", "",
                "| op | " + " | ".join(f"{b} ms" for b in row)
                + "".join(f" | {b} predicted ms | {b} / predicted" for b in predicting)
                + " | floor ms |", "|---" * (len(row) + 2 * len(predicting) + 2) + "|"]
        floor = next(iter(row.values()))["floor_ms"]
        for kind in (*gpu_ops.KINDS, "other", "forward"):
            cells = [_fmt(r["ms"].get(kind), ".3f") for r in row.values()]
            for b in predicting:
                p = row[b]["predicted_ms"].get(kind)
                cells += [_fmt(p, ".3f"), _ratio(row[b]["ms"].get(kind), p)]
            out.append(f"| {kind} | " + " | ".join(cells) + f" | {_fmt(floor.get(kind), '.3f')} |")
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def _stop(signum, frame):
    raise KeyboardInterrupt


def supervise(args):
    """Runs the worker within --budget seconds, then writes and prints the report; returns the
    exit status (module docstring)."""
    jsonl = args.out + ".jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(jsonl)), exist_ok=True)
    open(jsonl, "w").close()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--jsonl", jsonl,
           "--models", *args.models, "--batches", *map(str, args.batches),
           "--compile-mode", args.compile_mode]
    # Its own process group, so that stopping it stops its compile workers too.
    worker = subprocess.Popen(cmd, start_new_session=True)
    signal.signal(signal.SIGTERM, _stop)  # a `timeout` around this script stops the worker too
    try:
        rc = worker.wait(timeout=args.budget)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:  # it ended meanwhile
            pass
        worker.wait()
        rc = None
    lines = read_results(jsonl)
    compiling = any(r["kind"] == "phase" for r in lines)
    if rc is None:
        results = Results(jsonl)
        measured = dict.fromkeys((r["model"], r["batch"]) for r in lines if r["kind"] == "time")
        for model, batch in measured:
            if not any(r["kind"] == "time" and r["backend"] == "compile"
                       and (r["model"], r["batch"]) == (model, batch) for r in lines):
                results.add(kind="time", model=model, batch=batch, backend="compile",
                            status="timeout")
        results.add(kind="note", text=f"stopped at the budget ({args.budget:.0f} s) "
                    + ("while torch.compile ran" if compiling else "before the fused models were "
                       "all measured"))
        lines = read_results(jsonl)
    text = render(lines)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(text)
    for failure in failures(lines):
        print("FAILED:", failure)
    if failures(lines) or rc not in (None, 0):
        return 1
    return 0 if compiling else 124


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "models_gpu"),
                   help="results prefix: <out>.jsonl (as measured) and <out>.md (the tables)")
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   choices=list(python_ref.MODEL_CONFIGS))
    p.add_argument("--batches", nargs="+", type=int, default=list(BATCHES),
                   help="each one, or the largest power of two below it that fits")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"])
    p.add_argument("--budget", type=float, default=900.0,
                   help="seconds for all measurements; what is left then reads 'timeout'")
    p.add_argument("--render", metavar="JSONL", help="print the tables of a results file and exit")
    p.add_argument("--warm-up", action="store_true",
                   help="compile what a later run will measure, filling the caches; time nothing")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--jsonl", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.render:
        print(render(read_results(args.render)))
        return 0
    if not torch.cuda.is_available():
        sys.exit("bench_models_gpu.py needs a CUDA GPU")
    # Alike in the worker and in the warm-up, whose torch.compile cache entries the worker is to
    # find (their keys include the matmul precision): the fp32 reference without TF32; room for a
    # graph per model and batch (the models share the code of their forward, and dynamo stops
    # compiling a code object, silently, at its recompile limit).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.cache_size_limit = 64
    if args.warm_up:
        return warm_up(args)
    return measure(args) if args.worker else supervise(args)


if __name__ == "__main__":
    sys.exit(main())
