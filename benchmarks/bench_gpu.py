"""GPU benchmark of the fused cascaded-group-attention layer (docs/design.md, "Speed").

For the attention layers of M4, M0 and M5 (the residual included) at batch 1, 64, 256 and
2048, fp16 and bf16, times in one process: the CUDA op, the Triton op (if importable), the
reference module in eager mode and torch.compile(mode="max-autotune") of it. Next to them the
floor: max(bytes that must move / measured copy bandwidth, FLOPs / measured matrix rate),
bytes = x read once + y written once + weights once.

Rows are also appended to <out>.jsonl as they are measured, so a run cut short still reports.
Times are medians of triton.testing.do_bench (CUDA events; it also clears L2 before each
call), cycling through several input buffers. Batch 1 is latency: its calls are replayed from
a CUDA graph (torch.compile's max-autotune mode graphs its own calls). max-autotune compiles
are slow, so they run within --compile-budget seconds, fp16 first, and not above
--compile-max-batch; what is skipped is listed.

    python benchmarks/bench_gpu.py --out benchmarks/results/bench_gpu.json
    python benchmarks/bench_gpu.py --smoke      # each op of each backend once, small (for
                                                # compute-sanitizer)
"""
import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import efficientvit_kernels  # noqa: E402,F401  (registers the ops)
import python_ref  # noqa: E402
from efficientvit_kernels.testing import TOLERANCE, cga_args, layer_shapes, relative_error  # noqa: E402
from efficientvit_kernels.timing import time_gpu  # noqa: E402
from efficientvit_kernels.ops import has_compiled_kernels  # noqa: E402
from python_ref.model import LocalWindowAttention, Residual  # noqa: E402

KEY_DIM = 16
# (model, stage, channels, resolution, heads, kernels); windows are min(7, resolution)
SHAPES = [(model, stage, C, size, heads, kernels)
          for model, stage, C, heads, kernels, _, size in layer_shapes(("m4", "m0", "m5"))]
BATCHES = (256, 64, 1, 2048)  # measured in this order: the compile budget goes to 256 first
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def do_bench(fn):
    """Median milliseconds of fn() (efficientvit_kernels.timing.time_gpu)."""
    return time_gpu(fn).median * 1e3


def measure_ceilings(device):
    """Copy bandwidth (bytes read + written per second) and matrix rates (FLOP/s) of this GPU."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    bandwidth = 2 * n / (do_bench(lambda: b.copy_(a)) / 1e3)
    a = b = None  # the 2 GiB go back before the matrices are made
    rates = {}
    for name, dtype in DTYPES.items():
        m = torch.randn(8192, 8192, device=device).to(dtype)
        k = torch.randn(8192, 8192, device=device).to(dtype)
        rates[name] = 2 * 8192 ** 3 / (do_bench(lambda: m @ k) / 1e3)
    return bandwidth, rates


def build_layer(C, resolution, heads, kernels, seed):
    """The reference layer (LocalWindowAttention in a Residual) with random weights and batch
    norm statistics, and the op arguments of its folded form (float32, CPU)."""
    attn = LocalWindowAttention(C, KEY_DIM, heads, attn_ratio=C / (KEY_DIM * heads),
                                resolution=resolution, window_resolution=7, kernels=kernels)
    layer = python_ref.randomize_(Residual(attn), seed=seed)
    return layer, python_ref.cga_params(attn.attn)


def count_work(C, resolution, heads, kernels, batch, elem):
    """(bytes, flops) of one layer call: x once, y once, weights once; the FLOPs of the padded
    windows the layer computes."""
    ws = min(7, resolution)
    N, d, kd = ws * ws, C // heads, KEY_DIM
    windows = batch * math.ceil(resolution / ws) ** 2
    weights = heads * ((2 * kd + d) * (d + 1) + kd * (max(kernels) ** 2 + 1) + ws * ws) + C * (C + 1)
    bytes_ = (2 * batch * C * resolution ** 2 + weights) * elem
    per_window = 2 * N * C * C  # output projection
    for k in kernels[:heads]:
        per_window += 2 * N * d * (2 * kd + d) + 2 * N * kd * k * k + 2 * N * N * (kd + d)
    return bytes_, windows * per_window


def time_backend(fn, xs, graph):
    """Median microseconds per call of fn over the buffers xs (replayed from one CUDA graph
    of a call per buffer when graph is set)."""
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for x in xs[:2]:
                fn(x)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for x in xs:
                fn(x)
        return do_bench(g.replay) * 1e3 / len(xs)
    state = {"i": 0}

    def step():
        fn(xs[state["i"] % len(xs)])
        state["i"] += 1
    return do_bench(step) * 1e3


def gpu_ops():
    """name -> namespace with cga, dwconv and ffn, for each GPU backend that can run here: the
    CUDA kernels where they were built, the Triton kernels where triton imports."""
    out = {}
    if has_compiled_kernels("cuda"):
        out["cuda"] = torch.ops.efficientvit
    try:
        import efficientvit_kernels.triton as tk
        if tk.available():
            out["triton"] = tk
    except ImportError:
        pass
    return out


def backends(layer, params, compile_ok):
    """name -> callable(x) for every backend that can run here."""
    args = cga_args(params)
    out = {name: (lambda x, ops=ops: ops.cga(x, *args, True)) for name, ops in gpu_ops().items()}
    out["eager"] = layer
    if compile_ok:
        out["compile"] = torch.compile(layer, mode="max-autotune", dynamic=False)
    return out


@torch.inference_mode()
def run(args):
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    bandwidth, rates = measure_ceilings(device)
    print(f"{props.name}: copy {bandwidth / 1e12:.2f} TB/s, "
          + ", ".join(f"{k} matmul {v / 1e12:.0f} TFLOP/s" for k, v in rates.items()), flush=True)
    notes = []
    if args.compile_max_batch < max(args.batches):
        notes.append(f"torch.compile max-autotune skipped above batch {args.compile_max_batch} "
                     "(its autotuning takes minutes there; --compile-max-batch)")
    rows, compile_spent, checked = [], 0.0, set()
    jsonl = os.path.splitext(args.out)[0] + ".jsonl" if args.out else None
    if jsonl:
        os.makedirs(os.path.dirname(os.path.abspath(jsonl)), exist_ok=True)
        open(jsonl, "w").close()
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for batch in args.batches:
            for model, stage, C, res, heads, kernels in SHAPES:
                layer, params = build_layer(C, res, heads, kernels, seed=stage)
                layer = layer.to(device=device, dtype=dtype)
                params = {k: v.to(device=device, dtype=dtype) if torch.is_tensor(v) else v
                          for k, v in params.items()}
                want_compile = (dtype_name in args.compile_dtypes and batch <= args.compile_max_batch
                                and args.compile_budget > 0)
                over_budget = compile_spent >= args.compile_budget
                fns = backends(layer, params, want_compile and not over_budget)
                if want_compile and over_budget:
                    notes.append(f"compile skipped (budget spent): {model}.stage{stage} {dtype_name} batch {batch}")
                elem = torch.tensor([], dtype=dtype).element_size()
                n_buf = 32 if batch == 1 else 3
                xs = [torch.randn(batch, C, res, res, device=device).to(dtype) for _ in range(n_buf)]
                if (model, stage, dtype_name) not in checked and "cuda" in fns:
                    checked.add((model, stage, dtype_name))
                    err = relative_error(fns["cuda"](xs[0]), layer.float()(xs[0].float()))
                    layer.to(dtype)
                    if not err < 5 * TOLERANCE[dtype]:
                        notes.append(f"MISMATCH {model}.stage{stage} {dtype_name}: cuda vs reference "
                                     f"relative error {err:.2e}")
                bytes_, flops = count_work(C, res, heads, kernels, batch, elem)
                floor_us = max(bytes_ / bandwidth, flops / rates[dtype_name]) * 1e6
                for name, fn in fns.items():
                    if name == "compile":
                        start = time.perf_counter()
                        fn(xs[0])  # compiles and autotunes
                        torch.cuda.synchronize()
                        compile_spent += time.perf_counter() - start
                    graph = batch == 1 and name != "compile"
                    try:
                        us = time_backend(fn, xs, graph)
                    except Exception as e:  # a backend failing one shape must not stop the run
                        notes.append(f"{name} failed at {model}.stage{stage} {dtype_name} batch {batch}: "
                                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                        continue
                    rows.append(dict(model=model, stage=stage, channels=C, resolution=res, heads=heads,
                                     kernels=list(kernels), dtype=dtype_name, batch=batch, backend=name,
                                     time_us=us, cuda_graph=graph or name == "compile",
                                     bytes=bytes_, flops=flops, bytes_floor_us=bytes_ / bandwidth * 1e6,
                                     flop_floor_us=flops / rates[dtype_name] * 1e6, floor_us=floor_us,
                                     time_over_floor=us / floor_us))
                    if jsonl:
                        with open(jsonl, "a") as f:
                            f.write(json.dumps(rows[-1]) + "\n")
                    print(f"{model}.stage{stage} {dtype_name} b{batch} {name}: {us:.1f} us "
                          f"(floor {floor_us:.1f})", flush=True)
                del layer, xs, fns
                torch.cuda.empty_cache()
    result = dict(device=props.name, sm_count=props.multi_processor_count,
                  torch=torch.__version__, cuda=torch.version.cuda,
                  triton=_version("triton"), date=datetime.datetime.now().isoformat(timespec="seconds"),
                  copy_bandwidth_bytes_per_s=bandwidth, matmul_flops_per_s=rates,
                  compile_seconds=compile_spent, notes=notes, rows=rows)
    table = markdown(rows)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(f"{props.name}, torch {torch.__version__}, {result['date']}\n\n{table}\n")
    for note in notes:
        print("note:", note)
    print(table)


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def markdown(rows):
    """One line per (layer, batch, dtype): each backend's time, the floor, and the ratios."""
    names = ["cuda", "triton", "eager", "compile"]
    keyed = {}
    for r in rows:
        key = (r["dtype"], r["model"], r["stage"], r["batch"])
        keyed.setdefault(key, {"floor": r["floor_us"], "r": r})[r["backend"]] = r["time_us"]
    lines = ["| layer | C | res | dtype | batch | " + " | ".join(f"{n} us" for n in names)
             + " | floor us | cuda/floor | eager/cuda | compile/cuda |",
             "|---" * (5 + len(names) + 4) + "|"]

    def fmt(v):
        return "-" if v is None else f"{v:.1f}"

    def ratio(a, b):
        return "-" if a is None or b is None else f"{a / b:.2f}"
    for (dtype, model, stage, batch), v in sorted(keyed.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                  kv[0][2], kv[0][3])):
        r = v["r"]
        lines.append(f"| {model}.stage{stage} | {r['channels']} | {r['resolution']} | {dtype} | {batch} | "
                     + " | ".join(fmt(v.get(n)) for n in names)
                     + f" | {v['floor']:.1f} | {ratio(v.get('cuda'), v['floor'])} | "
                     f"{ratio(v.get('eager'), v.get('cuda'))} | {ratio(v.get('compile'), v.get('cuda'))} |")
    return "\n".join(lines)


def smoke_calls(device):
    """The smoke run's op calls, small, every dtype path and both layouts: a list of (op, args,
    reference), reference() the float64 result. On "meta" they record what the run launches
    (gpu_precompile.py compiles it beforehand)."""
    from efficientvit_kernels.testing import (cast, random_cga_params, random_dwconv_params,
                                              random_ffn_params, random_input,
                                              random_patch_embed_params)
    from python_ref import functional

    def on_device(tensors, dtype):
        return [t.to(device=device, dtype=dtype) for t in tensors]

    def double(tensors):
        return [t.double() for t in tensors]

    calls = []
    for dtype, C, heads, kernels, ws, (B, H, W), cl in (
            (torch.float16, 64, 4, (7, 5, 3, 3), 7, (2, 14, 14), False),
            (torch.float32, 64, 4, (7, 5, 3, 3), 4, (1, 3, 5), True),  # several windows a block
            (torch.bfloat16, 384, 4, (7, 5, 3, 3), 8, (1, 8, 8), True)):  # CUDA's largest plan
        p = cast(random_cga_params(C, heads, kernels, ws), dtype, device)
        x = random_input(B, C, H, W, channels_last=cl).to(device=device, dtype=dtype)
        calls.append(("cga", (x, *cga_args(p), True), lambda x=x, p=p: functional.cga(
            x.double(), **cast(p, torch.float64, device), residual=True)))
    # 272 channels in fp16: Triton's staged FFN, with more token tiles (289 of 64 tokens, 145 of
    # 128) than an H200 holds programs at once, so that some loop over two
    x = random_input(1, 272, 136, 136, channels_last=True).to(device=device, dtype=torch.float16)
    f = on_device(random_ffn_params(272, 40), torch.float16)
    calls.append(("ffn", (x, *f, True),
                  lambda x=x, f=f: functional.ffn(x.double(), *double(f), True)))
    for dtype, cl in ((torch.float16, True), (torch.float32, False)):
        x = random_input(2, 20, 5, 6, channels_last=cl).to(device=device, dtype=dtype)
        w, b = on_device(random_dwconv_params(20, 3), dtype)
        f = on_device(random_ffn_params(20, 7), dtype)  # 20 channels, 7 hidden
        conv = [*f[:2], *on_device(random_dwconv_params(7, 3), dtype)]  # 20 -> 7, then dwconv
        weights, biases = (on_device(ts, dtype) for ts in random_patch_embed_params([3, 16, 24]))
        image = random_input(2, 3, 13, 10, channels_last=cl).to(device=device, dtype=dtype)
        calls += [
            ("dwconv", (x, w, b, True, True), lambda x=x, w=w, b=b: functional.dwconv(
                x.double(), w.double(), b.double(), True, True)),
            ("ffn", (x, *f, True), lambda x=x, f=f: functional.ffn(x.double(), *double(f), True)),
            ("squeeze_excite", (x, *f),
             lambda x=x, f=f: functional.squeeze_excite(x.double(), *double(f))),
            ("conv1x1", (x, *conv[:2], True, *conv[2:]), lambda x=x, c=conv: functional.conv1x1(
                x.double(), *double(c[:2]), True, *double(c[2:]))),
            ("patch_embed", (image, weights, biases, False),
             lambda x=image, w=weights, b=biases: functional.patch_embed(
                 x.double(), double(w), double(b), False))]
    return calls


@torch.inference_mode()
def smoke():
    """Each op of each GPU backend (gpu_ops) once on small inputs (smoke_calls): a short run for
    compute-sanitizer, which names the kernels it checks. Fails on a launch error, a wrong
    result, or no backend."""
    calls = smoke_calls("cuda")
    backends_run, failed = gpu_ops(), []
    for name, ops in backends_run.items():
        worst = 0.0
        for op, args, reference in calls:
            out = getattr(ops, op)(*args)
            worst = max(worst, relative_error(out, reference()) / TOLERANCE[out.dtype])
        torch.cuda.synchronize()
        print(f"smoke {name}: every op ran; worst error {worst:.2f} x tolerance", flush=True)
        if not worst < 1:  # the other backend still runs: under compute-sanitizer it is checked too
            failed.append(name)
    for name in sorted({"cuda", "triton"} - set(backends_run)):
        print(f"smoke {name}: not available here (skipped)")
    if failed or not backends_run:
        sys.exit(f"smoke: wrong results from {', '.join(failed)}" if failed
                 else "smoke: no GPU backend to run")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "bench_gpu.json"),
                        help="results JSON (a Markdown table is written beside it)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--compile-dtypes", nargs="*", default=["float16"], choices=list(DTYPES))
    parser.add_argument("--compile-budget", type=float, default=90.0,
                        help="seconds of torch.compile autotuning, after which compile is skipped")
    parser.add_argument("--compile-max-batch", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="run each op once and exit")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    if args.smoke:
        smoke()
    else:
        run(args)


if __name__ == "__main__":
    main()
