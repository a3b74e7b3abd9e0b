"""Every Triton kernel specialization the launchers produce for M0-M5 compiles for sm_90 and
sm_80 without a GPU, and passes the static resource gate (efficientvit_kernels/cuda_static.py:
no spill to local memory, shared memory within the device's per-block limit, a block fits a
multiprocessor).

The specializations are those of the Triton-converted models at 224x224 (batch 1 and 2048)
and 288x288 (windows cut by the map's edge), contiguous and channels-last, in fp32, fp16 and
bf16, with every autotune config that survives the launcher's pruning
(efficientvit_kernels/triton_static.py). Compiling runs in a subprocess without
TRITON_INTERPRET (the other tests run the kernels in the interpreter).

The committed static profile (benchmarks/results/gpu_static.json) vouches for the variants it
holds when it was made from these sources and this Triton (triton_static.sources_digest): its
rows are gated as they are, and only variants it lacks compile. A profile not regenerated after
a kernel or launcher changed fails test_committed_profile_is_current.
"""
import collections
import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from efficientvit_kernels.cuda_static import format_profiles, resource_violations  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "gpu_static.json")


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_static") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "efficientvit_kernels.triton_static",
                           "--arch", "90", "80", "--jobs", "2", "--json", str(out),
                           "--reuse", COMMITTED], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def rows(profile):
    return profile["rows"]


def test_committed_profile_is_current(profile):
    """Every variant the launchers make now is in the committed profile, made from these
    sources: nothing had to compile (else: python benchmarks/gpu_static.py)."""
    with open(COMMITTED) as f:
        committed = json.load(f)
    if committed["triton"] != profile["triton"]:
        pytest.skip(f"the committed profile is of Triton {committed['triton']}, this is "
                    f"{profile['triton']}: everything compiled")
    assert committed.get("triton_sources") == profile["sources"], (
        "benchmarks/results/gpu_static.json was made from other sources: regenerate it")
    assert profile["compiled"] == 0, (
        f"{profile['compiled']} variants are not in benchmarks/results/gpu_static.json: "
        "regenerate it")


# Every Triton kernel of the package.
KERNELS = {"_cga_kernel", "_dwconv_kernel", "_ffn_kernel", "_ffn_staged_kernel",
           "_conv3x3_stride2_kernel", "_conv3x3_stride2_pair_kernel", "_conv1x1_kernel",
           "_channel_mean_kernel", "_squeeze_excite_gate_kernel", "_channel_scale_kernel"}


def test_sanitizer_checks_every_kernel():
    """The quick GPU check's memcheck and racecheck instrument kernels by name: each Triton
    kernel must be among the names, or it would run unchecked."""
    with open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")) as f:
        names = set(re.findall(r"--kernel-name kns=(\w+)", f.read()))
    assert KERNELS <= names, sorted(KERNELS - names)


def test_every_specialization_compiles(rows):
    print(format_profiles([r for r in rows if "error" not in r]), file=sys.stderr)
    assert {r["arch"] for r in rows} == {80, 90}
    assert {r["kernel"] for r in rows} == KERNELS
    errors = [f"{r['kernel']} [{r['variant']}] sm_{r['arch']}: {r['error']}"
              for r in rows if "error" in r]
    assert not errors, "\n".join(errors)


def test_resource_gate(rows):
    named = [dict(r, kernel=f"{r['kernel']} [{r['variant']}]") for r in rows if "error" not in r]
    found = resource_violations(named)
    assert not found, "\n".join(found)


def _sm90_16_bit(rows, kernel):
    """The fp16 and bf16 variants of ``kernel`` on sm_90 (the GPUs and dtypes of the speed
    targets)."""
    found = [r for r in rows if r["kernel"] == kernel and "error" not in r and r["arch"] == 90
             and r["variant"].split()[0] in ("float16", "bfloat16")]
    assert found
    return found


def _one_block(rows):
    return [f"{r['variant']} sm_{r['arch']}: {r['registers']} registers, {r['threads']} threads"
            for r in rows if r["blocks_per_sm"] < 2]


def test_two_blocks_per_multiprocessor(rows):
    """Every fp16 and bf16 attention launch on sm_90 leaves room for a second block on each
    multiprocessor (the launcher caps registers at 128 where that costs no spill), so one
    block's barriers and memory waits overlap another's work. (On sm_80 some attention
    variants take 166-255 registers and spill when capped: one block there.)"""
    one_block = _one_block(_sm90_16_bit(rows, "_cga_kernel"))
    assert not one_block, "\n".join(one_block)


@pytest.mark.parametrize("kernel", ["_ffn_kernel", "_ffn_staged_kernel"])
def test_ffn_offers_two_blocks_per_multiprocessor(rows, kernel):
    """The FFN's launchers choose by measurement (the register-tile kernel's autotuner, the
    staged kernel's run_fastest) among 8-warp tilings, each at two or more blocks a
    multiprocessor on sm_90, and 16-warp ones (one block of as many warps as two, holding
    larger token tiles): every shape they choose for has the former."""
    def shape(variant):  # the variant without its tiling
        return re.sub(r" (BT|BM|BN|num_warps|num_stages|maxnreg)=\d+", "", variant)
    shapes = collections.defaultdict(list)
    for r in _sm90_16_bit(rows, kernel):
        shapes[shape(r["variant"])].append(r)
    without = [s for s, configs in shapes.items()
               if not any(r["threads"] == 256 and r["blocks_per_sm"] >= 2 for r in configs)]
    assert not without, "\n".join(without)
    assert not _one_block([r for c in shapes.values() for r in c if r["threads"] == 256])


def test_staged_ffn_runs_on_wgmma_with_wide_loads(rows):
    """On sm_90 every staged FFN variant (fp16 and bf16) takes Hopper's warpgroup MMA (wgmma)
    on its 64- and 128-token tiles, and loads and stores 128 bits at a time."""
    staged = _sm90_16_bit(rows, "_ffn_staged_kernel")
    without = [r["variant"] for r in staged if not r["warpgroup_mma_instructions"]]
    assert not without, "\n".join(without)
    narrow = [f"{r['variant']}: load {r['widest_global_load_bits']}, store "
              f"{r['widest_global_store_bits']}" for r in staged
              if min(r["widest_global_load_bits"], r["widest_global_store_bits"]) < 128]
    assert not narrow, "\n".join(narrow)


# Runs where TRITON_INTERPRET is unset: compiles the launches of a single stem convolution from
# 24 channels (M5's width, which its pair kernel now takes: no model launches it alone).
CONV_24_CHANNELS = r"""
import json
import torch
from efficientvit_kernels import triton as k, triton_static as s

with s.recording() as launches:
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.empty(8, 24, 56, 56, device="meta", dtype=dtype).to(memory_format=torch.channels_last)
        w = torch.empty(48, 24, 3, 3, device="meta", dtype=dtype).to(memory_format=torch.channels_last)
        k.patch_embed(x, [w], [torch.empty(48, device="meta", dtype=dtype)])
print(json.dumps([s.profile(l, 90) for l in s.unique_launches(launches, 90)]))
"""


def _compiled_rows(script):
    """The sm_90 profile rows of the launches ``script`` records, compiled in a process
    without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_stem_moves_16_bytes_where_strides_allow(rows):
    """Each single stem convolution in fp16/bf16 on sm_90 whose input and weights' pixels lie
    16 bytes' multiples apart (XV=WV=8, as from 8 channels in channels-last) loads 128 bits at
    a time, and each whose output's do (OV=8) stores so: those the models launch, and one
    from 24 channels to 48, whose strides Triton by itself sees as multiples of 8 elements."""
    convs = _sm90_16_bit(rows, "_conv3x3_stride2_kernel") + _compiled_rows(CONV_24_CHANNELS)
    loads = [r for r in convs if " XV=8 WV=8 " in r["variant"]]
    stores = [r for r in convs if " OV=8 " in r["variant"]]
    assert sum(" CI=24 " in r["variant"] for r in loads) == 2  # fp16, bf16
    narrow = ([f"{r['variant']}: load {r['widest_global_load_bits']}" for r in loads
               if r["widest_global_load_bits"] < 128]
              + [f"{r['variant']}: store {r['widest_global_store_bits']}" for r in stores
                 if r["widest_global_store_bits"] < 128])
    assert not narrow, "\n".join(narrow)


# Runs where TRITON_INTERPRET is unset: compiles the launches a channels-last dwconv makes.
DWCONV_CHANNELS_LAST = r"""
import json
import torch
from efficientvit_kernels import triton as k, triton_static as s

with s.recording() as launches:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for C, H in ((128, 14), (384, 4)):
            x = torch.empty(8, C, H, H, device="meta", dtype=dtype, memory_format=torch.channels_last)
            w, b = torch.empty(C, 3, 3, device="meta", dtype=dtype), torch.empty(C, device="meta", dtype=dtype)
            k.dwconv(x, w, b, False, True)
print(json.dumps([s.profile(l, 90) for l in s.unique_launches(launches, 90)]))
"""


def test_dwconv_channels_last_moves_16_bytes():
    """Channels-last with C a multiple of 16 (every EfficientViT width), the Triton dwconv
    loads and stores 128 bits at a time (its C is specialized: without, 16 or 32)."""
    rows = _compiled_rows(DWCONV_CHANNELS_LAST)
    assert rows and all("sxc=1" in r["variant"] for r in rows)
    narrow = [f"{r['variant']}: load {r['widest_global_load_bits']}, store "
              f"{r['widest_global_store_bits']}" for r in rows
              if min(r["widest_global_load_bits"], r["widest_global_store_bits"]) < 128]
    assert not narrow, "\n".join(narrow)
