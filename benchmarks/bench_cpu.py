"""CPU benchmark by the paper's protocol: one thread, batch 16, fp32, 224^2.

1. CGA layer: the reference layer (Residual(LocalWindowAttention), eager, as trained) and
   its folded functional form against the fused op, for the attention stages of M0/M4/M5.
   The FFN and the token interaction (residual dwconv) of the same stages: their folded
   functional form against the fused module.
2. Whole model img/s for M0-M5: eager reference, torch.compile of the reference, ONNX
   Runtime on the exported reference, and the fused model, all measured in this process.

    python benchmarks/bench_cpu.py [--models m0,m4] [--batch 16] [--out benchmarks/results/cpu]

Writes <out>.json (device, versions, date) and <out>.md.
"""
import argparse
import io
import json
import os
import sys

import torch

import efficientvit_kernels as K
import python_ref as R
from efficientvit_kernels.testing import layer_shapes, random_dwconv_params, random_ffn_params, relative_error
from efficientvit_kernels.timing import run_metadata, time_interleaved


def median_times(runners, inputs, **kwargs):
    """{name: median seconds} of time_interleaved."""
    return {k: v.median for k, v in time_interleaved(runners, inputs, **kwargs).items()}


def attention_layers(name):
    """(label, Residual(LocalWindowAttention), input size) of one layer per stage of a model."""
    model = R.randomize_(R.build(name))
    seen, layers = set(), []
    for module in model.modules():
        if isinstance(module, R.EfficientViTBlock):
            attn = module.mixer.m
            if attn.dim not in seen:
                seen.add(attn.dim)
                layers.append((f"{name.upper()} {attn.dim}x{attn.resolution}x{attn.resolution} "
                               f"h{attn.num_heads}", module.mixer, attn.resolution))
    return layers


def machine_rates():
    """Bytes/s of a large copy, and fp32 multiply-adds/s of the fastest matrix product measured
    on this thread: oneDNN's 1024² matmul, or the fused FFN's GEMM (C 256, hidden 512, 96
    tokens) on data in cache, which is faster on this core. Each is the best of five timings, so
    that a slow spell of a shared machine does not lower the floors."""
    def best(fn, inputs):
        return min(median_times({"fn": fn}, inputs, min_rounds=10, budget_s=0.3)["fn"]
                   for _ in range(5))
    src = torch.randn(64 * 2**20 // 4)
    dst = torch.empty_like(src)
    copy_s = best(lambda t: dst.copy_(t), [src])
    a = torch.randn(1024, 1024)
    onednn = 1024 ** 3 / best(lambda t: t @ a, [a])
    C, M = 256, 512
    ffn = K.FusedFFN(torch.randn(M, C), torch.randn(M), torch.randn(C, M), torch.randn(C),
                     residual=False)
    x = torch.randn(6, C, 4, 4).contiguous(memory_format=torch.channels_last)  # 96 tokens, one tile
    ffn_gemm = 2 * M * C * 96 / best(ffn, [x])
    return 2 * src.numel() * 4 / copy_s, max(onednn, ffn_gemm), onednn, ffn_gemm


def cga_floor(layer, batch, res, rates):
    """Seconds the layer needs at least: bytes (x read, y written, weights once) over the copy
    bandwidth, or multiply-adds over the matmul rate, whichever is larger."""
    attn = layer.m.attn
    C, heads, kd, d = layer.m.dim, attn.num_heads, attn.key_dim, attn.d
    ws = attn.resolution
    n_windows = batch * (-(-res // ws)) ** 2
    N = ws * ws
    kernel = max(m.c.kernel_size[0] for m in attn.dws)
    macs = n_windows * (heads * (N * (2 * kd + d) * d + N * kd * kernel * kernel + N * N * (kd + d)) + N * C * C)
    weights = sum(b.numel() for b in K.convert(layer, backend="reference").buffers())
    bytes_ = 4 * (2 * batch * C * res * res + weights)
    return max(bytes_ / rates[0], macs / rates[1]), macs, bytes_


def bench_layers(models, batch, rates):
    rows = []
    for name in models:
        for label, layer, res in attention_layers(name):
            x = [torch.randn(batch, layer.m.dim, res, res) for _ in range(2)]
            fused = K.convert(layer)
            spec = K.convert(layer, backend="reference")
            with torch.no_grad():
                err = relative_error(fused(x[0]), layer.double()(x[0].double()))
                layer.float()
            t = median_times({"eager": layer, "folded reference": spec, "fused": fused}, x)
            floor, macs, bytes_ = cga_floor(layer, batch, res, rates)
            rows.append(dict(layer=label, ms={k: v * 1e3 for k, v in t.items()},
                             speedup=t["eager"] / t["fused"], error=err, floor_ms=floor * 1e3,
                             macs=macs, bytes=bytes_, floor_fraction=floor / t["fused"]))
            print(f"  {label}: eager {t['eager'] * 1e3:.2f} ms, fused {t['fused'] * 1e3:.2f} ms "
                  f"({rows[-1]['speedup']:.1f}x)", file=sys.stderr)
    return rows


def bench_ffn_dwconv(models, batch, rates):
    """FFN (hidden 2C) and residual dwconv 3x3 of every stage, on channels-last input: functional
    spec vs fused module, with each op's floor (bytes: x read, output written, weights once;
    multiply-adds)."""
    rows = []
    for name, _, C, _, _, _, res in layer_shapes(models) if models else ():  # [] is none, not all
        # channels-last, the layout these ops see in a model converted for the CPU
        x = [torch.randn(batch, C, res, res).to(memory_format=torch.channels_last) for _ in range(2)]
        activations = 2 * batch * C * res * res
        w1, b1, w2, b2 = random_ffn_params(C, 2 * C, dtype=torch.float32)
        w, b = random_dwconv_params(C, dtype=torch.float32)
        ops = {
            "ffn": (lambda t: R.functional.ffn(t, w1, b1, w2, b2, True),
                    K.FusedFFN(w1, b1, w2, b2, residual=True),
                    batch * res * res * 2 * C * 2 * C, 4 * (activations + 4 * C * C + 3 * C)),
            "dwconv": (lambda t: R.functional.dwconv(t, w, b, False, True),
                       K.FusedDWConv(w, b, relu=False, residual=True),
                       batch * res * res * C * 9, 4 * (activations + 10 * C)),
        }
        for op, (spec, fused, macs, bytes_) in ops.items():
            t = median_times({"folded reference": spec, "fused": fused}, x)
            floor = max(bytes_ / rates[0], macs / rates[1])
            rows.append(dict(layer=f"{name.upper()} {op} {C}x{res}x{res}",
                             ms={k: v * 1e3 for k, v in t.items()},
                             speedup=t["folded reference"] / t["fused"], floor_ms=floor * 1e3,
                             macs=macs, bytes=bytes_, floor_fraction=floor / t["fused"]))
    return rows


def onnx_session(model, x, threads=1):
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, input_names=["x"], output_names=["y"], dynamo=False,
                      opset_version=17)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    # Its worker threads would otherwise spin for a while after each run, on the core the next
    # runner of an interleaved round needs (that doubled the fused model's time at 2 threads).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    return lambda t: session.run(None, {"x": t.numpy()})


def model_floor(model, batch, resolution, rates):
    """Seconds a forward needs at least: multiply-adds over the matmul rate, or the bytes of
    the input, the weights and the logits over the copy bandwidth, whichever is larger."""
    macs = batch * R.count_macs(model, resolution)
    bytes_ = 4 * (batch * 3 * resolution ** 2 + R.count_params(model) + batch * 1000)
    return max(bytes_ / rates[0], macs / rates[1]), macs


def bench_models(models, batch, resolution, compile_reference, rates):
    rows = []
    for name in models:
        model = R.randomize_(R.build(name))
        floor, macs = model_floor(model, batch, resolution, rates)
        fused = K.convert(model)
        x = [torch.randn(batch, 3, resolution, resolution) for _ in range(2)]
        with torch.no_grad():
            err = relative_error(fused(x[0]), R.fold_batchnorm(model).double()(x[0].double()))
        runners = {"eager": model}
        if compile_reference:
            runners["torch.compile"] = torch.compile(model)
        ort_run = onnx_session(model, x[0])
        if ort_run is not None:
            runners["onnxruntime"] = ort_run
        runners["fused"] = fused
        # A minute of rounds per model: with 20 s the ratios moved by 2-3% between runs here.
        timings = time_interleaved(runners, x, budget_s=60.0, max_rounds=300)
        t = {k: v.median for k, v in timings.items()}
        rows.append(dict(model=name.upper(), img_per_s={k: batch / v for k, v in t.items()}, error=err,
                         ms_p10_median_p90={k: [v.p10 * 1e3, v.median * 1e3, v.p90 * 1e3]
                                            for k, v in timings.items()},
                         macs=macs, floor_img_per_s=batch / floor, floor_fraction=floor / t["fused"]))
        print(f"  {name}: " + ", ".join(f"{k} {batch / v:.1f} img/s" for k, v in t.items()), file=sys.stderr)
    return rows


def markdown(meta, layers, ffn_dwconv, models):
    out = [f"# CPU benchmark, {meta['date']}", "",
           f"{meta['device']}; CPU kernels {meta['cpu_isa']} (built: {', '.join(meta['built_isas'])}); torch {meta['torch']}; {meta['threads']} thread; batch {meta['batch']}; fp32; "
           f"median of timed runs after warm-up, two inputs alternated; the runners of a row are "
           f"timed in interleaved rounds (one call each per round), so their ratios hold on a "
           f"machine whose speed drifts.", "",
           f"Command: `{meta['command']}`", ""]
    if layers:
        cols = list(layers[0]["ms"])
        out += ["## CGA layer (attention + residual)", "",
                f"Floor: max(bytes / copy bandwidth, multiply-adds / matmul rate), both measured on this "
                f"thread (copy {meta['copy_bytes_per_s'] / 1e9:.1f} GB/s; matmul "
                f"{meta['matmul_macs_per_s'] / 1e9:.1f} GMAC/s, the faster of oneDNN's 1024² matmul, "
                f"{meta['onednn_matmul_macs_per_s'] / 1e9:.1f}, and the fused FFN's GEMM on data in "
                f"cache, {meta['ffn_gemm_macs_per_s'] / 1e9:.1f}; each the best of five timings); "
                "'of floor' is floor / fused time.", "",
                "| layer | " + " | ".join(f"{c} ms" for c in cols) +
                " | floor ms | of floor | fused vs eager | rel. error |",
                "|---|" + "---|" * (len(cols) + 4)]
        out += [f"| {r['layer']} | " + " | ".join(f"{r['ms'][c]:.2f}" for c in cols) +
                f" | {r['floor_ms']:.2f} | {100 * r['floor_fraction']:.0f}% | {r['speedup']:.2f}x"
                f" | {r['error']:.1e} |" for r in layers]
        out.append("")
    if ffn_dwconv:
        out += ["## FFN and token interaction (residual dwconv 3x3), per stage, channels-last input", "",
                "| op | folded reference ms | fused ms | floor ms | of floor | fused vs reference |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['layer']} | {r['ms']['folded reference']:.2f} | {r['ms']['fused']:.2f} | "
                f"{r['floor_ms']:.2f} | {100 * r['floor_fraction']:.0f}% | {r['speedup']:.2f}x |"
                for r in ffn_dwconv]
        out.append("")
    if models:
        cols = list(models[0]["img_per_s"])
        base = [c for c in cols if c != "fused"]
        out += [f"## Whole model, {meta['resolution']}x{meta['resolution']}", "",
                "| model | " + " | ".join(f"{c} img/s" for c in cols) + " | " +
                " | ".join(f"fused / {c}" for c in base) + " | floor img/s | fused of floor | rel. error |",
                "|---|" + "---|" * (len(cols) + len(base) + 3)]
        out += [f"| {r['model']} | " + " | ".join(f"{r['img_per_s'][c]:.1f}" for c in cols) + " | " +
                " | ".join(f"{r['img_per_s']['fused'] / r['img_per_s'][c]:.2f}x" for c in base) +
                f" | {r['floor_img_per_s']:.0f} | {100 * r['floor_fraction']:.0f}% | {r['error']:.1e} |"
                for r in models]
        out += ["", "Floor of a model: max(its multiply-adds over the matmul rate, its input, "
                "weights and logits over the copy bandwidth)."]
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="m0,m1,m2,m3,m4,m5")
    p.add_argument("--layer-models", default="m0,m4,m5")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default="benchmarks/results/cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    layer_models = [m for m in args.layer_models.split(",") if m]
    rates = machine_rates()
    layers = bench_layers(layer_models, args.batch, rates)
    ffn_dwconv = bench_ffn_dwconv(layer_models, args.batch, rates)
    whole = bench_models(models, args.batch, args.resolution, not args.no_compile, rates)
    import importlib.metadata as md
    versions = {}
    for pkg in ("onnxruntime", "triton"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    meta = dict(run_metadata("cpu"), **versions,
                threads=args.threads, batch=args.batch, resolution=args.resolution,
                copy_bytes_per_s=rates[0], matmul_macs_per_s=rates[1],
                onednn_matmul_macs_per_s=rates[2], ffn_gemm_macs_per_s=rates[3],
                command="python " + " ".join(sys.argv))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, layers=layers, ffn_dwconv=ffn_dwconv, models=whole), f, indent=2)
    text = markdown(meta, layers, ffn_dwconv, whole)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
