"""The main job: build EfficientViT, convert it, check fused against reference, time both.

    python -m efficientvit_kernels [--model m4|all] [--batch N] [--dtype fp32|fp16|bf16]
        [--device cpu|cuda] [--backend auto] [--resolution 224] [--checkpoint PATH]
        [--threads 1] [--compile] [--cpu-graph] [--json PATH]

Defaults follow the paper's protocols: on CPU one thread, batch 16, fp32; on GPU fp16,
batch 256. Compares the fused model with the eager reference (and, with --compile, with
torch.compile of it; with --cpu-graph, on CPU, adds the fused model replayed by cpu_graph,
the batch-1 path). Prints one table (img/s, latency, speedup, error); exits 1 if a check
fails, 2 (one line on stderr) if an option is wrong.
"""
import argparse
import json
import os
import sys

import torch

import python_ref

from . import convert, cpu_graph
from .modules import BACKENDS, backend_ops
from .testing import errors, tolerance
from .timing import device_name, run_metadata, time_interleaved

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


class _Parser(argparse.ArgumentParser):
    """Reports a bad option in one line (``prog: error: ...``), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse(argv):
    p = _Parser(prog="python -m efficientvit_kernels", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="m4", choices=[*python_ref.MODEL_CONFIGS, "all"])
    p.add_argument("--batch", type=int, help="default: 16 on CPU, 256 on GPU")
    p.add_argument("--dtype", type=lambda s: DTYPE_ALIASES.get(s, s), choices=DTYPES,
                   help="default and the only one on CPU: fp32; on GPU: fp16 (default) or bf16 too")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="triton and cuda need --device cuda")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--checkpoint", help="official or timm checkpoint (default: random weights and BN statistics)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the paper's CPU protocol: 1)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the reference (max-autotune on GPU; compiling "
                        "takes minutes)")
    p.add_argument("--cpu-graph", action="store_true",
                   help="CPU: also time the fused model replayed by cpu_graph (no Python between "
                        "the ops; for small batches)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.cpu_graph and args.device != "cpu":
        p.error("--cpu-graph replays on CPU: use --device cpu (on GPU, cuda_graph serves batch 1)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.batch is None:
        args.batch = 16 if args.device == "cpu" else 256
    if args.batch <= 0:
        p.error(f"--batch must be positive, got {args.batch}")
    if args.resolution < 16:
        p.error(f"--resolution must be at least 16, got {args.resolution}")
    if args.threads <= 0:
        p.error(f"--threads must be positive, got {args.threads}")
    args.dtype = DTYPES[args.dtype or ("fp32" if args.device == "cpu" else "fp16")]
    if args.device == "cpu" and args.dtype != torch.float32:
        p.error(f"--dtype {str(args.dtype)[6:]}: on CPU the kernels take fp32 (fp16 and bf16 "
                "need --device cuda)")
    if args.device == "cpu" and args.backend in ("cuda", "triton"):
        p.error(f"--backend {args.backend} runs on a GPU: add --device cuda, or use --backend "
                "auto or cpu")
    try:
        backend_ops(args.backend)
    except (RuntimeError, ValueError) as e:
        p.error(str(e))
    if args.json:
        _check_writable(p, args.json)
    if args.checkpoint:
        _check_checkpoint(p, args)
    else:
        args.checkpoint_state = None
    return args


def _check_writable(p, path):
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        p.error(f"--json {path}: is a directory")
    if not os.path.isdir(folder):
        p.error(f"--json {path}: no such directory {folder}")
    if not os.access(path if os.path.exists(path) else folder, os.W_OK):
        p.error(f"--json {path}: not writable")


def _check_checkpoint(p, args):
    """Loads the checkpoint into each model the run builds, so a missing, unreadable or
    mismatched file is reported before anything runs; keeps the state dict for the run."""
    if not os.path.isfile(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint}: no such file")
    try:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure: not a checkpoint torch can read
        p.error(f"--checkpoint {args.checkpoint}: not a readable PyTorch checkpoint "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    for name in _model_names(args):
        try:
            python_ref.load_checkpoint(python_ref.build(name), state)
        except (TypeError, ValueError) as e:
            p.error(f"--checkpoint {args.checkpoint}: {str(e).splitlines()[0]}")
    args.checkpoint_state = state


def _model_names(args):
    return list(python_ref.MODEL_CONFIGS) if args.model == "all" else [args.model]


def _build(name, checkpoint):
    model = python_ref.build(name)
    if checkpoint:
        python_ref.load_checkpoint(model, checkpoint)
    else:
        python_ref.randomize_(model)
    return model.eval()


@torch.no_grad()
def _run_model(name, args, progress):
    model = _build(name, args.checkpoint_state)
    device, dtype = torch.device(args.device), args.dtype
    exact_model = python_ref.fold_batchnorm(model).to(device=device, dtype=torch.float64)
    # converted on the device (the CPU conversion also makes the convolutions channels-last)
    fused = convert(model.to(device), backend=args.backend).to(dtype=dtype)
    reference = model.to(dtype=dtype)

    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(args.batch, 3, args.resolution, args.resolution, generator=g).to(device, dtype)
              for _ in range(2)]
    progress(f"{name}: checking fused against the float64 reference")
    exact = exact_model(inputs[0].double())
    out = fused(inputs[0])
    error, max_error = errors(out, exact)

    runners = {"eager": reference}
    if args.compile:
        mode = "max-autotune" if args.device == "cuda" else None
        runners["compile"] = torch.compile(reference, mode=mode)
    runners["fused"] = fused
    if args.cpu_graph:
        progress(f"{name}: capturing the fused model (cpu_graph)")
        runners["cpu_graph"] = cpu_graph(fused, inputs[0])
        # the same kernels on the same weights: the replay gives the fused model's values
        if not torch.equal(runners["cpu_graph"](inputs[0]), out):
            error = max_error = float("inf")
    progress(f"{name}: timing {', '.join(runners)}")
    timings = time_interleaved(runners, inputs)
    return dict(model=name, error=error, max_error=max_error, tolerance=tolerance(dtype),
                passed=error <= tolerance(dtype),
                img_per_s={k: args.batch / t.median for k, t in timings.items()},
                latency_ms={k: t.median * 1e3 for k, t in timings.items()},
                latency_ms_p10_p90={k: [t.p10 * 1e3, t.p90 * 1e3] for k, t in timings.items()})


def _table(rows, args):
    cols = [k for k in ("eager", "compile", "fused", "cpu_graph") if k in rows[0]["img_per_s"]]
    ratios = [(f, b) for f in ("fused", "cpu_graph") for b in ("eager", "compile")
              if f in cols and b in cols]
    head = ["model"] + [f"{c} img/s" for c in cols] + [f"{c} ms" for c in cols] + \
        [f"{f}/{b}" for f, b in ratios] + ["rel. error", "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ips, lat = r["img_per_s"], r["latency_ms"]
        cells = [r["model"].upper()] + [f"{ips[c]:.1f}" for c in cols] + [f"{lat[c]:.2f}" for c in cols]
        cells += [f"{ips[f] / ips[b]:.2f}x" for f, b in ratios]
        cells += [f"{r['error']:.1e}", "pass" if r["passed"] else f"FAIL (> {r['tolerance']:.0e})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = _parse(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    names = _model_names(args)
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(names) * (3 if args.cpu_graph else 2), file=sys.stderr, leave=False)
    except ImportError:
        bar = None

    def progress(step):  # names the step starting; the one before it is done
        if bar is not None:
            if bar.desc:
                bar.update()
            bar.set_description(step)

    rows = [_run_model(n, args, progress) for n in names]
    if bar is not None:
        bar.update()
        bar.close()
    device = device_name(args.device)
    print(f"EfficientViT, {args.resolution}x{args.resolution}, batch {args.batch}, {str(args.dtype)[6:]}, "
          f"{args.device} ({device}), backend {args.backend}, torch {torch.__version__}"
          + (f", {args.threads} thread(s)" if args.device == "cpu" else ""))
    print(_table(rows, args))
    if args.json:
        meta = dict(run_metadata(args.device),
                    **{k: v if isinstance(v, (int, float, bool, type(None))) else str(v)
                       for k, v in vars(args).items() if k not in ("json", "checkpoint_state")})
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=2)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
