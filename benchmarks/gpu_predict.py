"""The GPU backends' predicted time per op kind, without a GPU: each kind's floor and the time
benchmarks/gpu_ops.py predicts from the committed static profile
(benchmarks/results/gpu_static.json), fp16, at a GPU's copy bandwidth and matrix rate
(default: an H200's, ~4.3 TB/s and ~790 TFLOP/s dense fp16), for the Triton-converted model
with every pass and without "dwconv_ffn" (each dwconv its own launch, as backend "auto" runs
it), and for the CUDA kernels (dwconv, ffn, attention; the stem and PatchMerging are cuDNN's
there, unpredicted: its total is of those three kinds). A GPU run (bench_models_gpu.py)
prints the same predictions beside measured times.

    python benchmarks/gpu_predict.py [--models m0,m4] [--batch 2048] [--out FILE.md]
"""
import argparse
import datetime
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

import torch  # noqa: E402

import gpu_ops  # noqa: E402
import python_ref  # noqa: E402
from efficientvit_kernels import PASSES, convert  # noqa: E402

CONVERSIONS = {"all passes": PASSES,
               "without dwconv_ffn": tuple(p for p in PASSES if p != "dwconv_ffn")}


def table(name, batch, bandwidth, rate):
    """Markdown rows of one model: kind, floor, and the predicted ms of each conversion."""
    reference = python_ref.build(name).eval().half().to("meta")
    unfused = convert(python_ref.build(name).eval(), backend="reference").half().to("meta")
    x = torch.empty(batch, 3, 224, 224, dtype=torch.float16, device="meta")
    work = gpu_ops.kind_work(reference, unfused, x)
    floor = {k: max(b / bandwidth, f / rate) * 1e3 for k, (b, f) in work.items()}
    static = gpu_ops.static_rows(backend="triton")
    predicted = {}
    for label, passes in CONVERSIONS.items():
        fused = convert(python_ref.build(name).eval(), backend="triton", passes=passes).half()
        predicted[f"triton, {label}"] = gpu_ops.triton_predictions(
            gpu_ops.triton_launches(fused, x), work, bandwidth, rate, static)
    # the CUDA backend's fused modules, as backend "reference" converts them, run on x's meta
    # tensors for their weight restaging
    predicted["cuda"] = gpu_ops.cuda_predictions(work, gpu_ops.restaged_bytes(unfused, x),
                                                 bandwidth, rate, gpu_ops.static_rows())
    show = lambda ms: "-" if ms is None else f"{ms:.2f}"
    rows = [f"| {name} | {k} | {floor[k]:.2f} | "
            + " | ".join(show(p[k]) for p in predicted.values()) + " |" for k in gpu_ops.KINDS]
    totals = [sum(v for v in p.values() if v) for p in predicted.values()]
    rows.append(f"| {name} | **total** | {sum(floor.values()):.2f} | "
                + " | ".join(f"{t:.2f}" for t in totals) + " |")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="m0,m1,m2,m3,m4,m5")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes/s")
    p.add_argument("--rate", type=float, default=790e12, help="FLOP/s")
    p.add_argument("--out", help="also write the table to this .md file")
    args = p.parse_args()
    lines = [f"# Triton backend: predicted ms per op kind, fp16, batch {args.batch} "
             f"({datetime.date.today()})", "",
             f"`python benchmarks/gpu_predict.py --batch {args.batch}`: floors and predictions of "
             f"benchmarks/gpu_ops.py from the committed static profile, at "
             f"{args.bandwidth / 1e12:g} TB/s and {args.rate / 1e12:g} TFLOP/s. No GPU ran.", "",
             "| model | kind | floor | "
             + " | ".join(f"triton, {c}" for c in CONVERSIONS)
             + " | cuda (total: its three kinds) |",
             "|---|---|---|" + "---|" * (len(CONVERSIONS) + 1)]
    for name in args.models.split(","):
        lines += table(name, args.batch, args.bandwidth, args.rate)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
