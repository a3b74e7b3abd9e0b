"""Batch-1 FFNs on CPU as a stream of weights: a chain of L FFN layers (``x + W2 relu(W1 x + b1)
+ b2``) at one stage's token count, ``torch.ops.efficientvit.ffn`` against ONNX Runtime's
Conv-Relu-Conv-Add on the same weights, timed in interleaved rounds on one thread.

With few tokens each weight element serves few multiply-adds (16 tokens: 16), so an FFN runs
as fast as its weights arrive. Few layers keep the weights in cache (warm); enough layers to
exceed the last-level cache bring every weight from memory (cold), as a whole model at batch 1
does (M4: 35 MB of fp32 weights). The warm and cold times of the two runtimes say whether a gap
between them is in the arithmetic or in streaming the weights.

    python benchmarks/bench_weight_stream.py [--shapes 384x16,256x49,128x196] [--warm-layers 2]
        [--cold-mb 40] [--seconds 10] [--out benchmarks/results/cpu_weight_stream]

Shapes: CxT, C channels (hidden 2C, as EfficientViT's FFNs) at T tokens (a square map); per
shape a warm chain of --warm-layers and a cold one of at least --cold-mb of weights.
Writes <out>.json and <out>.md (device, versions, date; medians and 10-90% spreads).
"""
import argparse
import copy
import io
import json
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import efficientvit_kernels  # noqa: E402,F401  (registers the ops)
from efficientvit_kernels.testing import assert_close  # noqa: E402
from efficientvit_kernels.timing import run_metadata, time_interleaved  # noqa: E402


class Chain(torch.nn.Module):
    """L FFN layers as 1x1 convolutions, each with its residual."""

    def __init__(self, C, layers):
        super().__init__()
        self.up = torch.nn.ModuleList(torch.nn.Conv2d(C, 2 * C, 1) for _ in range(layers))
        self.down = torch.nn.ModuleList(torch.nn.Conv2d(2 * C, C, 1) for _ in range(layers))
        for p in self.parameters():  # scaled so that activations stay O(1) down the chain
            p.data.normal_(0, 1 / math.sqrt(2 * C))

    def forward(self, x):
        for up, down in zip(self.up, self.down):
            x = x + down(torch.relu(up(x)))
        return x


def runners(chain, x):
    """{label: forward} for the chain: the fused op per layer, ONNX Runtime on the whole chain."""
    import onnxruntime as ort
    weights = [(u.weight[:, :, 0, 0].contiguous(), u.bias, d.weight[:, :, 0, 0].contiguous(), d.bias)
               for u, d in zip(chain.up, chain.down)]

    def fused(t):
        for w in weights:
            t = torch.ops.efficientvit.ffn(t, *w, True)
        return t

    buf = io.BytesIO()
    torch.onnx.export(chain, (x,), buf, input_names=["x"], dynamo=False, opset_version=17)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    return {"fused": fused,
            "onnxruntime": lambda t: torch.from_numpy(session.run(None, {"x": t.numpy()})[0])}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="384x16,256x49,128x196")
    p.add_argument("--warm-layers", type=int, default=2)
    p.add_argument("--cold-mb", type=float, default=40.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_weight_stream"))
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    with torch.no_grad():
        for shape in args.shapes.split(","):
            C, T = map(int, shape.split("x"))
            side = math.isqrt(T)
            layer_mb = 2 * C * 2 * C * 4 / 1e6
            for layers in (args.warm_layers, math.ceil(args.cold_mb / layer_mb)):
                torch.manual_seed(0)
                chain = Chain(C, layers).eval()
                inputs = [torch.randn(1, C, side, side) for _ in range(2)]
                fns = runners(chain, inputs[0])
                ref = copy.deepcopy(chain).double()(inputs[0].double())
                for label, fn in fns.items():
                    assert_close(fn(inputs[0]), ref, torch.float32, what=f"{shape} x{layers} {label}")
                t = time_interleaved(fns, inputs, budget_s=args.seconds, max_rounds=100000)
                rows.append(dict(C=C, tokens=side * side, layers=layers, weights_mb=layers * layer_mb,
                                 us_per_layer={k: [v.median / layers * 1e6, v.p10 / layers * 1e6,
                                                   v.p90 / layers * 1e6] for k, v in t.items()}))
                print(rows[-1], flush=True)
    meta = run_metadata("cpu")
    meta["command"] = "python benchmarks/bench_weight_stream.py " + " ".join(sys.argv[1:])
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# FFN weight streaming at batch 1, {meta['date'][:10]}", "",
             f"{meta['device']}; CPU kernels {meta['cpu_isa']}; torch {meta['torch']}; one thread; "
             f"fp32; `{meta['command']}`.", "",
             "Microseconds per FFN layer, median (10th-90th percentile), both runtimes timed in "
             "interleaved rounds; `fused / ORT` above 1: the fused op is slower.", "",
             "| C | tokens | layers | weights MB | fused us | ONNX Runtime us | fused / ORT |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        f, o = r["us_per_layer"]["fused"], r["us_per_layer"]["onnxruntime"]
        lines.append(f"| {r['C']} | {r['tokens']} | {r['layers']} | {r['weights_mb']:.1f} | "
                     f"{f[0]:.0f} ({f[1]:.0f}-{f[2]:.0f}) | {o[0]:.0f} ({o[1]:.0f}-{o[2]:.0f}) | "
                     f"{f[0] / o[0]:.2f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
