"""One fused forward for a profiler: the model converted for --backend, fp16, warmed up, then a
single forward between torch.cuda.profiler.start() and stop(), so that a profiler started with
its own capture off (ncu --profile-from-start off) records that forward's kernels and nothing
else. gpu_check.sh --profile runs it under ncu; its table (ncu_table.py) says, kernel by kernel,
where the time goes: instructions executed, warps resident, stall reasons, bytes moved.

    ncu --profile-from-start off ... python benchmarks/gpu_profile.py --model m0 --backend cuda
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

import python_ref  # noqa: E402
from efficientvit_kernels import convert  # noqa: E402

RESOLUTION = 224


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="m0", choices=sorted(python_ref.MODEL_CONFIGS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--backend", default="cuda", choices=("cuda", "triton", "eager"))
    args = parser.parse_args()
    model = python_ref.randomize_(python_ref.build(args.model))
    if args.backend != "eager":
        model = convert(model, backend=args.backend)
    model = model.half().cuda().eval()
    x = torch.randn(args.batch, 3, RESOLUTION, RESOLUTION, device="cuda", dtype=torch.float16)
    for _ in range(2):  # compiles, autotunes, fills the allocator's cache
        model(x)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    model(x)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"{args.model} batch {args.batch} {args.backend}: one forward profiled")


if __name__ == "__main__":
    main()
