"""The static profile of every GPU kernel variant, without a GPU: registers, spills, shared
memory, resident blocks per multiprocessor, tensor-core instructions and the widest global
load in its SASS, for sm_90 and sm_80.

CUDA kernels: csrc/cuda/*.cu as nvcc compiles them (efficientvit_kernels/cuda_static.py).
Triton kernels: every specialization the launchers produce for M0-M5 (224x224 batch 1 and
2048, 288x288; both layouts; fp32, fp16, bf16; every autotune config kept by the pruning),
compiled ahead of time (efficientvit_kernels/triton_static.py). This is the table the GPU
speed work is steered by until a GPU measures it.

    python benchmarks/gpu_static.py      # writes benchmarks/results/gpu_static.{json,md}
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from efficientvit_kernels import cuda_static  # noqa: E402

# Markdown columns: (row key, header)
COLUMNS = (("registers", "regs"), ("stack_bytes", "local B"), ("static_shared_bytes", "smem B"),
           ("dynamic_shared_bytes", "dyn smem B"), ("threads", "threads"),
           ("blocks_per_sm", "blocks/SM"), ("tensor_core_instructions", "tensor-core"),
           ("warpgroup_mma_instructions", "of them wgmma"), ("sass_instructions", "SASS"),
           ("mma_loop_density", "instr/MMA loop"),
           ("cp_async", "cp.async"), ("ldmatrix", "ldmatrix"),
           ("widest_global_load_bits", "widest load"), ("widest_global_store_bits", "widest store"))


def triton_rows(archs, jobs):
    """Triton profile rows, computed in a process without TRITON_INTERPRET and with an empty
    Triton cache (so that compile_seconds are real compilations, which tests/test_gpu_budget.py
    budgets with)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "triton_static.json")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        subprocess.run([sys.executable, "-m", "efficientvit_kernels.triton_static", "--json", out,
                        "--jobs", str(jobs), "--arch", *map(str, archs)], check=True, env=env,
                       cwd=ROOT)
        with open(out) as f:
            return json.load(f)


def markdown(result):
    lines = [f"# Static profile of the GPU kernels ({result['date']})", "",
             f"nvcc {result['nvcc']}, Triton {result['triton']}, no GPU: what the compilers "
             "report and the SASS holds. `local B`: bytes of local memory per thread (spills: the "
             "kernels have no local arrays; 0 everywhere is the rule); `smem B`/`dyn smem B`: static / dynamic "
             "shared memory per block (CUDA: the planner's target, set at launch); "
             "`blocks/SM`: resident blocks those allow; `tensor-core`: HMMA/HGMMA "
             "instructions; `of them wgmma`: the HGMMA ones (Hopper's warpgroup MMA, a "
             "64-row product each, against HMMA's 16); `instr/MMA loop`: SASS instructions "
             "per tensor-core instruction in "
             "the worst innermost loop holding them (a GEMM main loop's overhead); `cp.async`, "
             "`ldmatrix`: LDGSTS and LDSM instructions; `widest load`/`widest store`: bits per "
             "thread of the widest global load and store.", ""]
    for arch in sorted({r["arch"] for r in result["rows"]}, reverse=True):
        lines += [f"## sm_{arch}", "",
                  "| backend | kernel | variant | " + " | ".join(h for _, h in COLUMNS) + " |",
                  "|---|---|---|" + "---|" * len(COLUMNS)]
        for r in result["rows"]:
            if r["arch"] != arch:
                continue
            if "error" in r:
                cells = [f"compile error: {r['error']}"] + [""] * (len(COLUMNS) - 1)
            else:
                cells = ["-" if r.get(k) is None else f"{r[k]:.1f}" if isinstance(r[k], float)
                         else str(r[k]) for k, _ in COLUMNS]
            lines.append(f"| {r['backend']} | {r['kernel']} | {r.get('variant', '')} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_static"),
                        help="path without extension; .json and .md are written")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    args = parser.parse_args()
    triton = triton_rows(args.arch, args.jobs)
    nvcc = subprocess.run([cuda_static.nvcc_path(), "--version"], capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]
    result = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), nvcc=nvcc,
                  triton=triton["triton"], triton_sources=triton["sources"],
                  triton_compile_seconds=triton["seconds"],
                  rows=cuda_static.cuda_kernel_profiles(tuple(args.arch)) + triton["rows"])
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    print(f"wrote {args.out}.json and .md ({len(result['rows'])} kernel variants)")


if __name__ == "__main__":
    main()
